"""BLIP through the real config and runner: a tiny BLIP saved with save_pretrained, loaded by model.pretrained=DIR."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    pipeline,
)

from datamodules.captions import CaptionBatch
from datamodules.shapes import COLOURS, PAIR_TEMPLATES, RELATIONS, SHAPES, SINGLE_TEMPLATES, SIZES
from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning.blip import BLIPCaptioner
from tests.conftest import CONF, compose_config, read_metrics

TEST_KEYS = {"test/BLEU-1", "test/BLEU-2", "test/BLEU-3", "test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr"}
IMAGE_SIZE = 32
EPOCHS = 40
# Four training images with one caption each, so that "its training caption" is well defined.
OVERFIT = [
    "data.num_train=4",
    "data.num_val=2",
    "data.num_test=2",
    "data.captions_per_image=1",
    f"data.image_size={IMAGE_SIZE}",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
]


def shapes_words() -> list[str]:
    """Every word a shapes caption can have (templates, shapes, colours, sizes, relations)."""
    text = " ".join(
        [
            *SINGLE_TEMPLATES,
            *PAIR_TEMPLATES,
            *SHAPES,
            *COLOURS,
            *SIZES,
            *(phrase for phrases in RELATIONS.values() for phrase in phrases[:2]),
        ]
    )
    return sorted(
        {word for word in text.replace("{", " ").replace("}", " ").split() if word not in ("a", "b", "rel", "rel_is")}
        | {"a"}
    )


def save_tiny_blip(directory: Path) -> Path:
    """A BLIP with 2-layer 32-wide towers, 32 px images and a BERT tokenizer over the shapes words."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *shapes_words()]) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")  # BLIP's decoder BOS, as in its checkpoints
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    processor = BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer)
    processor.save_pretrained(directory)
    return directory


# The trained run is shared with test_captioner_api. It lives next to the session's data folder and is reused
# once finished there: a fixture imported into another test module would run again for that module.
def tiny_blip_dir(data_dir: Path) -> Path:
    directory = data_dir.parent / "tiny_blip"
    return directory if (directory / "config.json").is_file() else save_tiny_blip(directory)


def blip_run_dir(data_dir: Path) -> Path:
    """Train the tiny BLIP on four images until it knows their captions; test and export the last weights."""
    run_dir = data_dir.parent / "blip_run"
    if (run_dir / "metrics.json").is_file():
        return run_dir
    return overfit(
        ["task=blip_shapes", f"model.pretrained={tiny_blip_dir(data_dir)}", "logger=many"], EPOCHS, run_dir, data_dir
    )


def overfit(args: list[str], epochs: int, run_dir: Path, data_dir: Path) -> Path:
    """Train on the four OVERFIT images for `epochs` (constant lr, no weight decay), validating and saving
    last.ckpt only at the end; then test and export."""
    run(
        compose_config(
            [
                *OVERFIT,
                "model.optimizer.lr=0.006",
                "model.scheduler=null",
                "model.optimizer.weight_decay=0.0",
                f"trainer.max_epochs={epochs}",
                f"trainer.check_val_every_n_epoch={epochs}",
                f"callbacks.last_checkpoint.every_n_epochs={epochs}",
                "trainer.log_every_n_steps=1",
                "callbacks.model_checkpoint=null",
                *args,
            ],
            run_dir,
            data_dir,
        )
    )
    return run_dir


@pytest.fixture(scope="session")
def tiny_blip(data_dir) -> Path:
    return tiny_blip_dir(data_dir)


@pytest.fixture(scope="session")
def blip_run(data_dir) -> Path:
    return blip_run_dir(data_dir)


def train_items(data_dir: Path) -> list[tuple[Path, str]]:
    (annotations,) = data_dir.glob(f"shapes_s0_4-2-2_{IMAGE_SIZE}px_1c/dataset_shapes.json")
    images = json.loads(annotations.read_text())["images"]
    return [
        (annotations.parent / i["filepath"] / i["filename"], " ".join(i["sentences"][0]["tokens"]))
        for i in images
        if i["split"] == "train"
    ]


def test_training_lowers_the_loss_and_logs_metrics_and_media(blip_run):
    with open(blip_run / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == EPOCHS and losses[-1] < 0.5 * losses[0], losses
    metrics = read_metrics(blip_run)
    assert TEST_KEYS | {"val/CIDEr", "val/loss"} <= set(metrics)
    board = EventAccumulator(str(blip_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    board.Reload()
    assert any(tag.startswith("val/captions/") for tag in board.Tags()["images"])
    assert "val/predictions/text_summary" in board.Tags()["tensors"]
    assert (blip_run / "test_predictions.json").is_file()


def check_module_captions(module_class, run_dir: Path, data_dir: Path) -> tuple[list, list[str]]:
    """The run's LightningModule, from its checkpoint alone (config and processor travel in it), captions the
    training images with their training captions; returns (images, captions) for checking the export."""
    items = train_items(data_dir)
    images = [Image.open(path).convert("RGB") for path, _ in items]
    captions = [caption for _, caption in items]
    module = module_class.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    ).eval()
    pixels = torch.stack([module.image_transform()(image) for image in images])
    assert module.caption_batch(CaptionBatch(size=len(pixels), images=pixels)) == captions
    return images, captions


def test_overfitted_captions_equal_the_training_captions_in_module_export_and_pipeline(blip_run, data_dir):
    images, captions = check_module_captions(BLIPCaptioner, blip_run, data_dir)
    # transformers' own classes on the export.
    export = blip_run / "export"
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()
    model, processor = BlipForConditionalGeneration.from_pretrained(export), BlipProcessor.from_pretrained(export)
    inputs = processor(images=images, text=["a picture of "] * len(images), return_tensors="pt")
    settings = model.generation_config  # the run's; BLIP's generate needs it passed (its text decoder has its own)
    assert (settings.num_beams, settings.max_length, settings.min_length) == (3, 20, 5)
    ids = model.generate(**inputs, generation_config=settings)[:, inputs.input_ids.shape[1] - 1 :]
    assert [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)] == captions
    # transformers' pipeline: BLIP is an image-text-to-text model; the prompt is the text, the caption what follows.
    captioner = pipeline("image-text-to-text", model=str(export))
    outputs = captioner(
        images,
        text=["a picture of "] * len(images),
        return_full_text=False,
        generate_kwargs={"generation_config": settings},
    )
    assert [output["generated_text"].strip() for output in outputs] == captions


def test_predict_and_export_through_the_runner(blip_run, tmp_path, data_dir):
    """mode=predict on the export (no checkpoint) captions a folder; mode=export from the checkpoint re-exports it."""
    paths, captions = zip(*train_items(data_dir))
    folder = tmp_path / "images"
    folder.mkdir()
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    run(
        compose_config(
            [
                "task=blip_shapes",
                "mode=predict",
                f"model.pretrained={blip_run / 'export'}",
                *OVERFIT,
                f"data.images={folder}",
            ],
            tmp_path / "predict",
            data_dir,
        )
    )
    rows = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert [(Path(r["image"]).name, r["caption"]) for r in rows] == [(p.name, c) for p, c in zip(paths, captions)]
    run(
        compose_config(
            ["task=blip_shapes", "mode=export", f"ckpt_path={blip_run / 'checkpoints' / 'last.ckpt'}", *OVERFIT],
            tmp_path / "export",
            data_dir,
        )
    )
    exported = BlipForConditionalGeneration.from_pretrained(tmp_path / "export" / "export").state_dict()
    trained = BlipForConditionalGeneration.from_pretrained(blip_run / "export").state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_eval_of_the_pretrained_model_without_checkpoint_logs_every_metric(tiny_blip, tmp_path, data_dir):
    run(
        compose_config(
            [
                "task=blip_shapes",
                "mode=eval",
                f"model.pretrained={tiny_blip}",
                *OVERFIT,
                "model.generation.num_beams=1",
                "model.generation.max_length=8",
            ],
            tmp_path,
            data_dir,
        )
    )
    assert TEST_KEYS <= set(read_metrics(tmp_path))


def test_missing_pretrained_says_how_to_get_it(tmp_path, data_dir):
    cfg = compose_config(
        ["task=blip_shapes", "model.pretrained=nobody-has/this-model", *OVERFIT, "trainer.fast_dev_run=true"],
        tmp_path,
        data_dir,
    )
    with pytest.raises(
        UserError,
        match=r"model.pretrained=nobody-has/this-model is neither a local directory nor "
        r"in the Hugging Face cache.*scripts/download_models.py blip-base",
    ):
        run(cfg)


def test_bad_generation_setting_names_the_key(tiny_blip, tmp_path, data_dir):
    cfg = compose_config(
        ["task=blip_shapes", "mode=eval", f"model.pretrained={tiny_blip}", *OVERFIT, "+model.generation.beams=3"],
        tmp_path,
        data_dir,
    )
    with pytest.raises(UserError, match=r"model.generation: beams"):
        run(cfg)


def test_freeze_vision_and_gradient_checkpointing(tiny_blip):
    module = BLIPCaptioner(pretrained=str(tiny_blip), freeze_vision=True, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in module.model.vision_model.parameters())
    assert all(p.requires_grad for p in module.model.text_decoder.parameters())
    assert module.model.is_gradient_checkpointing


def test_paper_recipe_and_sweep_compose(tmp_path, data_dir):
    cfg = compose_config(["experiment=blip_coco_paper"], tmp_path, data_dir)
    assert cfg.model.prompt == "a picture of " and cfg.model.label_smoothing == 0.1
    assert (cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay) == (1e-5, 0.05)
    assert dict(cfg.model.generation) == {"num_beams": 3, "max_length": 20, "min_length": 5}
    assert cfg.data.batch_size == 256 and cfg.trainer.devices == 8  # global batch, 32 per GPU
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sweep = compose("config", overrides=["task=blip_coco", "hparams_search=blip_optuna"], return_hydra_config=True)
    assert sweep.optimized_metric == "val/CIDEr" and sweep.hydra.sweeper.direction == "maximize"
    assert set(sweep.hydra.sweeper.params) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.label_smoothing",
    }
