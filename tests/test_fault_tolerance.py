"""Preemption and divergence: SIGTERM or Ctrl-C saves a checkpoint at a batch boundary, resume=auto finds the run
and finishes it with the weights of an uninterrupted one, a NaN loss or non-finite weights stop the run with its step
and the last finite weights."""

import json
import logging
import math
import os
import re
import shutil
import signal as signals
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.signals import StopOnSignal
from framework.errors import UserError
from framework.files import locked_run_dir
from framework.resume import ResumeAuto
from framework.runner import run
from tests.helpers.callbacks import SignalAtStep
from tests.helpers.cli import one_error_line
from tests.helpers.config import CONF, TINY_SHAPES, compose_config, read_metrics
from tests.helpers.trainer import quiet_trainer

STEPS_PER_EPOCH = 6  # 48 training images, batches of 8
ARGS = [*TINY_SHAPES, "trainer.max_epochs=2", "logger=csv", "data.num_workers=1"]


def last_checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(make_workspace) -> dict[str, torch.Tensor]:
    """The weights of the run the interrupted ones must end with."""
    return last_checkpoint(make_workspace().run(ARGS).run_dir)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "exit_code"), [("SIGTERM", 0), ("SIGINT", 130)])
def test_a_signal_mid_epoch_saves_and_resume_auto_finds_the_run_and_finishes_it(
    signal, exit_code, uninterrupted, workspace
):
    # As typed: the runs go to the repository's outputs/shapes_captioning/runs/<time>.
    fault = ["+callbacks.fault._target_=tests.helpers.callbacks.SignalAtStep", f"+callbacks.fault.signal={signal}"]
    command = [*ARGS, *fault, f"+callbacks.fault.step={STEPS_PER_EPOCH + 2}"]
    killed = workspace.run(command, check=False)
    assert killed.returncode == exit_code, killed.stderr[-2000:]
    assert f"Received {signal}: stopping at the next batch boundary" in killed.stdout + killed.stderr
    runs = workspace.outputs / "shapes_captioning" / "runs"
    [run_dir] = runs.iterdir()
    interrupted = last_checkpoint(run_dir)
    assert (interrupted["epoch"], interrupted["global_step"]) == (1, STEPS_PER_EPOCH + 2)
    progress = interrupted["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["started"] == progress["completed"] == STEPS_PER_EPOCH + 2  # stopped between two batches
    assert not (run_dir / "metrics.json").exists()  # the run did not finish
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"status": "interrupted", "error": f"{signal} at a batch boundary"}
    if signal == "SIGINT":
        return  # what follows does not depend on the signal that stopped the run: SIGTERM's case runs it

    # Beside it: an older unfinished run of the same command, newer ones of another command or finished.
    record = Path(".hydra/overrides.yaml")
    started = (run_dir / record).stat().st_mtime
    decoys = {name: runs / name for name in ("older", "other", "finished")}
    for name, decoy in decoys.items():
        shutil.copytree(run_dir, decoy)
        os.utime(decoy / record, (started - 100,) * 2 if name == "older" else (started + 100,) * 2)
    with open(decoys["other"] / record, "a") as overrides:
        overrides.write("- seed=7\n")
    (decoys["finished"] / "metrics.json").write_text("{}")
    (decoys["finished"] / "status.json").write_text('{"status": "ok"}')

    resumed = workspace.run([*command, "resume=auto"])
    output = resumed.stdout + resumed.stderr
    assert f"resume=auto: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    assert "dataloader is not resumable" not in output and "training order came from seed" not in output
    assert sorted(runs.iterdir()) == sorted([run_dir, *decoys.values()])  # no new run dir
    assert last_checkpoint(run_dir)["global_step"] == 2 * STEPS_PER_EPOCH
    assert "test/CIDEr" in read_metrics(run_dir)
    assert not (decoys["older"] / "metrics.json").exists() and not (decoys["other"] / "metrics.json").exists()

    # The same weights as a run that was never interrupted: same batches, same captions, same dropout.
    for name, tensor in last_checkpoint(run_dir)["state_dict"].items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)


def fit_until_signal(checkpoints, signal: str) -> L.Trainer:
    """A tiny Lightning run with the framework's signal handling, sent `signal` after step 2: it stops there."""
    last = ModelCheckpoint(dirpath=checkpoints, filename="last", save_on_exception=True)
    trainer = quiet_trainer(
        max_steps=10, callbacks=[StopOnSignal(), last, SignalAtStep(2, signal)], enable_checkpointing=True
    )
    with pytest.raises(SystemExit) as stop:
        trainer.fit(BoringModel())
    assert stop.value.code == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    return trainer


def test_slurm_requeue_signal_saves_last_ckpt_at_a_batch_boundary_then_requeues_the_job(tmp_path, monkeypatch):
    # A SLURM job with Lightning's auto-requeue; scontrol records its arguments and what checkpoints/ held then.
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    record = tmp_path / "requeued"
    scontrol.write_text(f'#!/bin/sh\nls {tmp_path}/checkpoints > {record}; echo "$@" >> {record}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    fit_until_signal(tmp_path / "checkpoints", "SIGUSR1")
    assert record.read_text() == "last.ckpt\nrequeue 4242\n"  # requeued once last.ckpt was saved


def test_a_launchers_preemption_handler_runs_once_last_ckpt_is_saved(tmp_path):
    calls = []

    def requeue(signum, frame):  # as submitit's on SIGUSR2 (requeue the job, exit), installed before the run
        calls.append((signum, (tmp_path / "last.ckpt").exists()))

    previous = signals.signal(signals.SIGUSR2, requeue)
    try:
        fit_until_signal(tmp_path, "SIGUSR2")
        assert calls == [(signals.SIGUSR2, True)]
        assert signals.getsignal(signals.SIGUSR2) is requeue  # given back after the run
    finally:
        signals.signal(signals.SIGUSR2, previous)


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_its_step(workspace):
    result = workspace.run(
        [*ARGS, "+callbacks.fault._target_=tests.helpers.callbacks.NanLossAtStep", "+callbacks.fault.step=3"],
        check=False,
    )
    assert result.returncode != 0
    assert "train/loss is nan at global step 3 (epoch 0, batch 3)" in result.stdout + result.stderr
    saved = last_checkpoint(result.run_dir)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


@pytest.mark.slow
def test_a_step_that_makes_the_weights_non_finite_stops_the_run_with_the_weights_before_it(workspace):
    fault = ["+callbacks.fault._target_=tests.helpers.callbacks.InfiniteGradientAtStep", "+callbacks.fault.step=0"]
    result = workspace.run([*ARGS, *fault], check=False, full_error=False)
    error = one_error_line(result)
    assert "the weights are not finite after the optimizer step at global step 0 (epoch 0, batch 0; " in error
    saved = last_checkpoint(result.run_dir)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="framework.runner"):
        run(compose_config([*TINY_SHAPES, "trainer.fast_dev_run=true", "resume=auto"], tmp_path, data_dir))
    assert f"resume=auto: no unfinished run with these overrides, starting fresh in {tmp_path}" in caplog.text
    assert math.isfinite(read_metrics(tmp_path)["test/CIDEr"])


def test_resume_auto_continues_the_newest_unfinished_grid_sweep_with_the_same_overrides(tmp_path):
    overrides = [f"paths.log_dir={tmp_path}", "trainer.max_epochs=3", "seed=1"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = compose("config", overrides=[*overrides, "resume=auto"], return_hydra_config=True)
    sweeps = tmp_path / "shapes_captioning" / "multiruns"
    now = time.time()
    for name, recorded, age in [
        ("older", overrides, 100),
        ("newest", overrides[::-1], 0),  # in another order
        ("finished", overrides, -100),
        ("other", [*overrides[:2], "seed=2"], -100),
    ]:
        (sweeps / name).mkdir(parents=True)
        (sweeps / name / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": recorded}}}))
        os.utime(sweeps / name / "multirun.yaml", (now - age, now - age))
    (sweeps / "finished" / "summary.csv").write_text("job\n")

    optuna = config.copy()
    optuna.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    ResumeAuto().on_multirun_start(optuna)  # its job N would have other parameters: a new sweep
    assert optuna.hydra.sweep.dir != str(sweeps / "newest") and not optuna.hydra.overrides.hydra

    ResumeAuto().on_multirun_start(config)  # its jobs are composed with the hydra overrides
    assert config.hydra.sweep.dir == str(sweeps / "newest")
    assert list(config.hydra.overrides.hydra) == [f"hydra.sweep.dir={sweeps / 'newest'}"]


def in_use(run_dir: Path) -> str:
    """What a run says of `run_dir` while this process holds it."""
    return f"run dir {run_dir} is in use: the run of process {os.getpid()} on {socket.gethostname()} is writing"


def test_a_run_dir_holds_one_run_at_a_time(tmp_path, data_dir):
    fast = [*TINY_SHAPES, "trainer.fast_dev_run=true"]
    with locked_run_dir(tmp_path):  # as a run writing tmp_path holds it
        with pytest.raises(UserError, match=re.escape(in_use(tmp_path))):
            run(compose_config(fast, tmp_path, data_dir))
        assert not (tmp_path / "config.yaml").exists()  # stopped before writing
    run(compose_config(fast, tmp_path, data_dir))
    with locked_run_dir(tmp_path):  # released when the run ended
        assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_a_command_into_a_run_dir_in_use_stops_with_one_error(workspace):
    """`resume=auto` continues the newest unfinished run of the command: while another run (this process) holds
    that dir, the command stops before writing anything there."""
    command = [*TINY_SHAPES, "trainer.max_epochs=1", "resume=auto"]
    unfinished = workspace.outputs / "shapes_captioning" / "runs" / "2026-01-01_00-00-00"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(command))
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "last.ckpt").write_bytes(b"")
    with locked_run_dir(unfinished):  # as a run writing it holds it
        result = workspace.run(command, check=False, full_error=False)
        assert result.run_dir == unfinished
        assert in_use(unfinished) in one_error_line(result)
        assert not (unfinished / "config.yaml").exists()  # stopped before writing


def test_unknown_resume_value(tmp_path, data_dir):
    with pytest.raises(UserError, match=r"^resume=always: takes one of auto \(or null\)$"):
        run(compose_config([*TINY_SHAPES, "trainer.fast_dev_run=true", "resume=always"], tmp_path, data_dir))


def test_a_crash_in_a_loader_worker_names_the_failing_image(tmp_path):
    from PIL import Image
    from torch.utils.data import DataLoader

    from datamodules.images import ImageFolderDataset

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)

    def transform(image):  # a bug that only one sample triggers
        if image.getpixel((0, 0)) == (255, 0, 0):
            raise ValueError("unexpected colour")
        return torch.zeros(1)

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "b.png")
    loader = DataLoader(ImageFolderDataset(tmp_path, transform), batch_size=1, num_workers=1)
    with pytest.raises(RuntimeError, match=r"preparing image .*b\.png failed: ValueError: unexpected colour"):
        list(loader)
