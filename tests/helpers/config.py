"""The real config tree composed as run.py composes it and shrunk to seconds on a CPU; what an in-process run left."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# A captioner and a shapes set small enough for seconds on a CPU.
TINY_MODEL = [
    "model.encoder.width=8",
    "model.decoder.embed_dim=16",
    "model.decoder.hidden_dim=32",
    "model.decoder.attention_dim=16",
    "model.max_len=16",
]
TINY_DATA = [
    "data.num_train=48",
    "data.num_val=16",
    "data.num_test=16",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
]
TINY_SHAPES = [*TINY_MODEL, *TINY_DATA]


def compose_config(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """The real config tree, composed as run.py would, with paths pointed at temporary folders (for in-process unit
    tests: commands run in a tests.helpers.cli.Workspace, as typed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"paths.root_dir={ROOT}",
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={output_dir}",
                f"paths.output_dir={output_dir}",
                *overrides,
            ],
        )


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


def run_here(run_dir: Path, data_dir: Path, args: list[str]) -> dict[str, float]:
    """run.py's work in this process (the CLI costs seconds of imports per run), into `run_dir`; its metrics.json."""
    from framework.runner import run

    run(compose_config(args, run_dir, data_dir))
    return read_metrics(run_dir)


def prepared(module: L.LightningModule) -> L.LightningModule:
    """`module` ready to use outside a Trainer: its preparation step run, then set up as trainer.predict does."""
    module.prepare_data()
    module.setup("predict")
    return module


@contextmanager
def fake_gpus(count: int, bf16: bool = True):
    """A machine with `count` CUDA GPUs (with or without bfloat16) as torch and Lightning see it."""
    with (
        mock.patch.object(torch.cuda, "device_count", return_value=count),
        mock.patch.object(torch.cuda, "is_available", return_value=count > 0),
        mock.patch.object(torch.cuda, "is_bf16_supported", return_value=bf16),
        mock.patch("lightning.fabric.accelerators.cuda.num_cuda_devices", return_value=count),
    ):
        yield
