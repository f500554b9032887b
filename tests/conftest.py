"""Shared test helpers: compose the real config and shrink it; run run.py as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A captioner and a shapes set small enough for seconds on a CPU.
TINY_MODEL = [
    "model.encoder.width=8",
    "model.decoder.embed_dim=16",
    "model.decoder.hidden_dim=32",
    "model.decoder.attention_dim=16",
    "model.max_len=16",
]
TINY_SHAPES = [
    *TINY_MODEL,
    "data.num_train=48",
    "data.num_val=16",
    "data.num_test=16",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the whole session: generated shapes sets are reused between tests."""
    return tmp_path_factory.mktemp("data")


def compose_config(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """The real config tree, composed as run.py would, with paths pointed at temporary folders."""
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


def run_cli(
    args: list[str],
    run_dir: Path | None,
    data_dir: Path,
    multirun: bool = False,
    check: bool = True,
    timeout: int = 600,
    full_error: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess, its run dir (or sweep dir) at `run_dir` (None: where Hydra names it, under
    paths.log_dir); with `full_error` (HYDRA_FULL_ERROR=1) a failure prints its whole traceback, without it as a user
    sees it; `env`: variables to add to the environment."""
    where = [] if run_dir is None else [f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}"]
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        *(["-m"] if multirun else []),
        f"paths.data_dir={data_dir}",
        *where,
        *args,
    ]
    environment = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    environment |= {"PYTHONUNBUFFERED": "1", **(env or {})}
    if full_error:
        environment["HYDRA_FULL_ERROR"] = "1"
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def one_error_line(result: subprocess.CompletedProcess, run_dir: Path) -> str:
    """What a run stopped by a UserError prints (run_cli with full_error=False): exit code 1, no traceback, and one
    line that mentions an error, the message with the run dir (besides INFO lines, e.g. Lightning's saying that it
    saved last.ckpt on that error)."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    info = ("INFO:", "[INFO]")
    errors = [line for line in output.splitlines() if "error" in line.lower() and not any(i in line for i in info)]
    assert len(errors) == 1 and errors[0].endswith(f"; run dir: {run_dir}"), output[-3000:]
    assert "Traceback" not in output
    return errors[0]


def prepared(module: L.LightningModule) -> L.LightningModule:
    """`module` ready to use outside a Trainer: its preparation step run, then set up as trainer.predict does."""
    module.prepare_data()
    module.setup("predict")
    return module


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


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


def pytest_terminal_summary(terminalreporter) -> None:
    """How many README commands tests/test_readme_commands.py ran as typed and how many it only composed."""
    readme_test = next((m for name, m in sys.modules.items() if name.endswith("test_readme_commands")), None)
    if readme_test is not None:
        terminalreporter.write_line(readme_test.coverage_line())
