"""BLIP through the real config and runner: a tiny BLIP saved with save_pretrained, loaded by model.pretrained=DIR."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BlipForConditionalGeneration, BlipProcessor, pipeline

from framework.config import model_settings
from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning.hf import HFCaptioner, family_settings
from tests.helpers.captioning import OVERFIT, TEST_KEYS, check_module_captions, train_items
from tests.helpers.captioning import OVERFIT_EPOCHS as EPOCHS
from tests.helpers.config import CONF, compose_config, read_metrics

# blip_run (tests/conftest.py): the tiny BLIP (tests.helpers.tiny_models) trained on four images for EPOCHS epochs.


@pytest.mark.slow
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


@pytest.mark.slow
def test_overfitted_captions_equal_the_training_captions_in_module_export_and_pipeline(blip_run, data_dir):
    images, captions = check_module_captions(HFCaptioner, blip_run, data_dir)
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


@pytest.mark.slow
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
        r"in the Hugging Face cache.*`python scripts/download_models.py nobody-has/this-model`",
    ):
        run(cfg)


def test_bad_generation_setting_names_the_key(tiny_blip, tmp_path, data_dir):
    cfg = compose_config(
        ["task=blip_shapes", "mode=eval", f"model.pretrained={tiny_blip}", *OVERFIT, "+model.generation.beams=3"],
        tmp_path,
        data_dir,
    )
    with pytest.raises(UserError, match=r"model.generation.beams is not a setting of model.generation \(did you mean"):
        run(cfg)


def test_freeze_vision_and_gradient_checkpointing(tiny_blip):
    settings = model_settings("blip", scheduler=None, pretrained=str(tiny_blip))
    module = HFCaptioner(**{**settings, "freeze_vision": True, "gradient_checkpointing": True})
    assert not any(p.requires_grad for p in module.model.vision_model.parameters())
    assert all(p.requires_grad for p in module.model.text_decoder.parameters())
    assert module.model.is_gradient_checkpointing


def test_paper_recipe_and_sweep_compose(tmp_path, data_dir):
    cfg = compose_config(["experiment=blip_coco_paper"], tmp_path, data_dir)
    assert cfg.model.prompt is None and cfg.model.label_smoothing == 0.1  # the prompt: the family's (blip.yaml)
    assert family_settings("blip")["prompt"] == "a picture of "
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
