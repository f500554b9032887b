"""Every task shrunk to seconds (the tiny models and data of the helpers here; one epoch or a few steps), with global
batches that two processes can share: the overrides the every-task, constructor and GPU tests run each task with."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from lightning_modules.generation.tiny import save_tiny_sdxl
from tests.helpers.captioning import OVERFIT
from tests.helpers.config import TINY_SHAPES, read_metrics
from tests.helpers.dreambooth import RESOLUTION, save_images, tiny_args
from tests.helpers.images import write_image
from tests.helpers.tiny_models import save_tiny_vit_gpt2, tiny_blip_dir

# The shapes classifier the explaining tasks explain (tests/conftest.py's `shapes_checkpoint`): the default shapes
# data (3,000 / 200 / 200 images, about half with one object) and fewer epochs.
CLASSIFIER_TRAINING = ("trainer.max_epochs=4", "logger=csv")
# task=saliency with few images and cheap settings; the figures in the README come from the defaults on 32 images.
SALIENCY = [
    "data.num_predict=12",
    "data.eval_batch_size=12",
    "model.smoothgrad_samples=8",
    "model.ig_steps=16",
    "model.deletion_steps=8",
    "model.contact_sheet_images=4",
]
# task=fast_style with a tiny transformer network on 32 px images.
FAST_STYLE = [
    "model.net.width=8",
    "model.net.residual_blocks=2",
    "model.content_layers=[relu2_2]",
    "model.style_layers={relu1_2: 1.0, relu2_2: 1.0}",
    "data.image_size=32",
    "data.batch_size=2",
    "data.num_workers=0",
]


def fast_style_args(root: Path) -> list[str]:
    (root / "content").mkdir()
    for i in range(4):
        write_image(root / "content" / f"c{i}.png", (48, 40), seed=i)
    style = write_image(root / "style.png", (64, 64), seed=99)
    return [
        "task=fast_style",
        *FAST_STYLE,
        f"data.folder={root / 'content'}",
        f"data.style={style}",
        "trainer.max_epochs=1",
    ]


# task=adain_style with a narrow decoder on 32 px crops.
ADAIN = ["model.decoder.width=8", "data.image_size=32", "data.batch_size=2", "data.num_workers=0"]


def adain_args(root: Path) -> list[str]:
    for kind in ("content", "styles"):
        (root / kind).mkdir()
        for i in range(3):
            write_image(root / kind / f"{kind[0]}{i}.png", (48, 40), seed=i + 50 * len(kind))
    return [
        "task=adain_style",
        *ADAIN,
        f"data.folder={root / 'content'}",
        f"data.style_folder={root / 'styles'}",
        "data.num_val_styles=1",
        "trainer.max_epochs=1",
    ]


# TASKS[task](root, data_dir): the task's overrides, its files made under `root` (the tiny BLIP next to data_dir).
TASKS = {
    "shapes_captioning": lambda root, data: ["task=shapes_captioning", *TINY_SHAPES, "trainer.max_epochs=1"],
    "blip_shapes": lambda root, data: [
        "task=blip_shapes",
        f"model.pretrained={tiny_blip_dir(data)}",
        *OVERFIT,
        "trainer.max_epochs=1",
    ],
    "vit_gpt2_shapes": lambda root, data: [
        "task=vit_gpt2_shapes",
        f"model.pretrained={save_tiny_vit_gpt2(root / 'm')}",
        *OVERFIT,
        "data.batch_size=2",
        "trainer.max_epochs=1",
    ],
    "sdxl_dreambooth": lambda root, data: tiny_args(
        save_tiny_sdxl(root / "sdxl", RESOLUTION),
        save_images(root / "dog", 2),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.batch_size=2",
        "data.test_prompts=[]",
    ),
    "shapes_classifier": lambda root, data: ["task=shapes_classifier", "trainer.max_epochs=1"],
    "saliency": lambda root, data: ["task=saliency", *SALIENCY],
    "adversarial": lambda root, data: ["task=adversarial", "model.attack=pgd", "data.num_predict=4"],
    "class_visualisation": lambda root, data: ["task=class_visualisation", "model.steps=5", "data.targets=[0,3]"],
    "style_transfer": lambda root, data: [
        "task=style_transfer",
        "data.image_size=48",
        "data.iterations=4",
        "model.image_every_n_steps=2",
    ],
    "fast_style": lambda root, data: fast_style_args(root),
    "adain_style": lambda root, data: adain_args(root),
}


def check_finished(run_dir: Path, **trainer: object) -> None:
    """The run used the trainer settings and every figure it wrote is finite."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert {key: config[key] for key in trainer} == trainer
    metrics = read_metrics(run_dir)
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics


def shapes_batch(data_dir: Path, count: int) -> dict:
    """`count` images of the shape classes (task=shapes_classifier's data) in one batch."""
    from framework.config import compose
    from framework.runner import instantiate

    overrides = [f"paths.data_dir={data_dir}", f"data.num_predict={count}", f"data.eval_batch_size={count}"]
    datamodule = instantiate(compose(["task=shapes_classifier", *overrides]).data)
    return next(iter(datamodule.predict_dataloader()))


def shapes_classifier_checkpoint(path: Path, image_size: int | None = 64) -> Path:
    """A (random) shapes classifier saved as Lightning saves it, recording the image size it was trained on."""
    import lightning as L
    import torch

    from datamodules.shapes import SHAPES
    from framework.config import model_settings
    from lightning_modules.explain.classifier import ShapesClassifier

    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    settings = model_settings("shapes_classifier", optimizer=optimizer, scheduler=None, width=4)
    module = ShapesClassifier(list(SHAPES), **settings, image_size=image_size)
    record = {"name": "shapes_classifier", "module": "lightning_modules.explain.classifier.ShapesClassifier"}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "task": record,
        },
        path,
    )
    return path
