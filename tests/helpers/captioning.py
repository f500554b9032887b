"""The tiny Hugging Face captioners overfitted on four shapes images (in this process, through the runner): the runs
the BLIP, ViT-GPT2 and Captioner API tests read, and how they check that a module says the training captions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers.config import CONF, compose_config
from tests.helpers.tiny_models import IMAGE_SIZE, save_tiny_vit_gpt2, tiny_blip_dir

TEST_KEYS = {"test/BLEU-1", "test/BLEU-2", "test/BLEU-3", "test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr"}
OVERFIT_EPOCHS = 40
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


def overfit(args: list[str], epochs: int, run_dir: Path, data_dir: Path) -> Path:
    """Train on the four OVERFIT images for `epochs` (constant lr, no weight decay), validating and saving
    last.ckpt only at the end; then test and export."""
    from framework.runner import run

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


def blip_run_dir(data_dir: Path) -> Path:
    """Train the tiny BLIP on four images until it knows their captions; test and export the last weights."""
    run_dir = data_dir.parent / "blip_run"
    if (run_dir / "metrics.json").is_file():
        return run_dir
    return overfit(
        ["task=blip_shapes", f"model.pretrained={tiny_blip_dir(data_dir)}", "logger=many"],
        OVERFIT_EPOCHS,
        run_dir,
        data_dir,
    )


def vit_gpt2_run_dir(data_dir: Path) -> Path:
    """Train the tiny ViT-GPT2 on four images until it knows their captions; test and export the last weights."""
    run_dir = data_dir.parent / "vit_gpt2_run"
    if (run_dir / "metrics.json").is_file():
        return run_dir
    model = save_tiny_vit_gpt2(data_dir.parent / "tiny_vit_gpt2")
    return overfit(
        ["task=vit_gpt2_shapes", f"model.pretrained={model}", "data.batch_size=2", "logger=csv"],
        OVERFIT_EPOCHS,
        run_dir,
        data_dir,
    )


def train_items(data_dir: Path, count: int = 4) -> list[tuple[Path, str]]:
    """The OVERFIT set's training images (`count`: its data.num_train) with their one caption each."""
    (annotations,) = data_dir.glob(f"shapes_s0_{count}-2-2_{IMAGE_SIZE}px_1c/dataset_shapes.json")
    images = json.loads(annotations.read_text())["images"]
    return [
        (annotations.parent / i["filepath"] / i["filename"], " ".join(i["sentences"][0]["tokens"]))
        for i in images
        if i["split"] == "train"
    ]


def check_module_captions(module_class, run_dir: Path, data_dir: Path) -> tuple[list, list[str]]:
    """The run's LightningModule, from its checkpoint alone (config and processor travel in it), captions the
    training images with their training captions; returns (images, captions) for checking the export."""
    from datamodules.batches import CaptionBatch

    items = train_items(data_dir)
    images = [Image.open(path).convert("RGB") for path, _ in items]
    captions = [caption for _, caption in items]
    module = module_class.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    ).eval()
    pixels = torch.stack([module.image_transform()(image) for image in images])
    assert module.caption_batch(CaptionBatch(size=len(pixels), images=pixels)) == captions
    return images, captions


def read(data: str, skip_bad_images: bool = False, **values):
    """The splits conf/data/<data>.yaml's reader (its `source`) reads, called as the data module calls it: its settings
    from the YAML, `values` replacing some (the paths, which the YAML gives under paths.data_dir)."""
    source = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{data}.yaml").source, resolve=False)
    settings = {key: value for key, value in source.items() if not key.startswith("_")} | values
    unresolved = [key for key, value in settings.items() if isinstance(value, str) and "${" in value]
    assert not unresolved, f"give {unresolved}"
    return get_object(source["_target_"])(**settings, skip_bad_images=skip_bad_images)


def caption_data(source=None, **values):
    """A CaptionDataModule with conf/data/_captioning.yaml's settings, `values` replacing some; `source`: a reader (a
    partial of one, e.g. `partial(read_caption_folder, folder, ...)`) or None for a predict-only module."""
    from datamodules.captions import CaptionDataModule

    settings = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "_captioning.yaml"))
    settings = {key: value for key, value in settings.items() if not key.startswith("_")} | values
    return CaptionDataModule(source=source, **settings)
