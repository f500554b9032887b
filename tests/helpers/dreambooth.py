"""SDXL DreamBooth LoRA shrunk to the tiny SDXL pipeline (lightning_modules.generation.tiny): its instance images,
the task's overrides, the module built with conf/model/sdxl_lora.yaml's settings, the data module with
task=sdxl_dreambooth's data settings, and what its exports hold."""

from __future__ import annotations

import copy
import functools
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from framework.config import compose, model_settings
from tests.helpers.config import compose_config

RESOLUTION = 64
# conf/model/sdxl_lora.yaml's settings for modules built here: no training schedule, model card or fidelity models.
SDXL = model_settings("sdxl_lora", resolution=RESOLUTION, scheduler=None, card=None, fidelity=None)


def save_images(folder: Path, count: int, size: int = RESOLUTION, seed: int = 0) -> Path:
    """Blobs of colour on a plain background (size x size+8 px): something a tiny model can overfit."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = np.full((size, size + 8, 3), rng.integers(0, 255, 3), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        image[top : top + size // 2, left : left + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return folder


def tiny_args(pipeline: Path, instance: Path, *extra: str) -> list[str]:
    """task=sdxl_dreambooth shrunk to the tiny pipeline: CPU, fp32, 64 px, two inference steps, no fidelity models."""
    return [
        "task=sdxl_dreambooth",
        f"model.pretrained={pipeline}",
        "model.vae=null",
        "model.fidelity.clip=null",
        "model.fidelity.dino=null",
        "model.inference.num_inference_steps=2",
        "trainer.precision=32-true",
        f"data.source.folder={instance}",
        f"data.resolution={RESOLUTION}",
        "data.center_crop=true",
        "data.seeds=[0]",
        "trainer.log_every_n_steps=1",
        "~callbacks.model_summary",
        "logger=csv",
        *extra,
    ]


def sdxl_lora(pipeline: Path, lora: dict | None = None, inference: dict | None = None, **settings):
    """DreamBoothLoRA on `pipeline` with SDXL's settings; `lora` and `inference` update those blocks."""
    from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA

    blocks = {"lora": {**SDXL["lora"], **(lora or {})}, "inference": {**SDXL["inference"], **(inference or {})}}
    return DreamBoothLoRA(**{**SDXL, "pretrained": str(pipeline), **blocks, **settings})


@functools.cache
def _task_data() -> dict:
    """task=sdxl_dreambooth's data settings (conf/data/dreambooth_folder.yaml), composed as run.py composes them."""
    data = OmegaConf.to_container(compose(["task=sdxl_dreambooth"]).data, resolve=True)
    return {key: value for key, value in data.items() if not key.startswith("_") and key != "source"}


def dreambooth_data(folder: Path | None, prompt: str = "a photo of sks dog", **settings):
    """DreamBoothDataModule with task=sdxl_dreambooth's data settings (the one home of their defaults), the images of
    `folder` with `prompt` as its training examples (data.source), `settings` replacing some."""
    from datamodules.dreambooth import DreamBoothDataModule, read_instance_folder

    source = partial(read_instance_folder, folder, prompt)
    return DreamBoothDataModule(**{**copy.deepcopy(_task_data()), "source": source, **settings})


def build(tmp_path: Path, data_dir: Path, args: list[str]):
    """The configured model and data module, in this process, as the runner builds them (the model takes its
    resolution from the data: framework.preparation.model_inputs)."""
    from hydra.utils import get_class

    from framework.preparation import model_inputs
    from framework.runner import instantiate

    cfg = compose_config(args, tmp_path, data_dir)
    data = instantiate(cfg.data)
    return instantiate(cfg.model, **model_inputs(get_class(cfg.model._target_), data)), data


def lora_keys(path: Path) -> list[str]:
    from safetensors.torch import load_file

    return sorted(load_file(str(path)))


def generate(pipeline, prompt: str = "a photo of sks dog", seed: int = 0) -> np.ndarray:
    return pipeline(
        prompt,
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
