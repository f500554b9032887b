"""What every run dir records, whatever the end: status.json (ok, failed with its one line, interrupted),
manifest.json (code, environment, data, seeds, hardware), no .lock left; a config checked before anything runs; a
full disk; a diverging loss."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from framework.errors import UserError
from framework.manifest import git_state
from framework.runner import run
from tests.helpers.config import TINY_SHAPES, compose_config

ONE_EPOCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHRINK = [*ONE_EPOCH, "trainer.limit_test_batches=1", "data.num_train=48", "data.num_val=16", "data.num_test=16"]


def test_a_finished_run_records_ok_and_its_manifest(tmp_path, data_dir):
    run(compose_config([*TINY_SHAPES, *ONE_EPOCH, "logger=csv"], tmp_path, data_dir))
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "ok"}
    assert not (tmp_path / ".lock").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["git"]["commit"] and isinstance(manifest["git"]["dirty"], bool)
    assert manifest["environment"]["packages"]["torch"] and manifest["environment"]["python"]
    assert manifest["seed"] == 12345 and manifest["determinism"]["trainer.deterministic"] is False
    assert manifest["hardware"]["accelerator"] == "cpu" and manifest["hardware"]["precision"] == "32-true"
    # the data read: the generated shapes set, hashed
    (shapes,) = manifest["data"]
    assert Path(shapes).is_relative_to(data_dir) and len(manifest["data"][shapes]["sha256"]) == 64


def test_a_failed_run_records_its_error_and_leaves_no_lock(tmp_path, data_dir):
    with pytest.raises(UserError):
        run(compose_config([*TINY_SHAPES, "model.beam_size=0"], tmp_path, data_dir))
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "model.beam_size=0" in status["error"]
    assert "\n" not in status["error"] and not (tmp_path / ".lock").exists()
    assert (tmp_path / "manifest.json").is_file()


def test_git_state_names_the_commit_and_whether_the_tree_differs(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c")
    clean = git_state.__wrapped__(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff_sha256"] is None
    (tmp_path / "code.py").write_text("x = 2\n")
    edited = git_state.__wrapped__(tmp_path)
    assert edited["commit"] == clean["commit"] and edited["dirty"] is True and len(edited["diff_sha256"]) == 64
    (tmp_path / "new.py").write_text("")
    assert git_state.__wrapped__(tmp_path)["diff_sha256"] != edited["diff_sha256"]  # untracked files count
    assert git_state.__wrapped__(tmp_path / "no-repo-here")["commit"] is None


# --------------------------------------------------------------------------------------------- as typed (CLI)
@pytest.mark.slow
def test_an_edited_tracked_file_makes_the_run_dirty(workspace):
    """The clean case: test_git_state_names_the_commit_and_whether_the_tree_differs."""

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(workspace.root), *args], check=True, capture_output=True).stdout

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "copy")
    (workspace.root / "README.md").write_text("edited\n")
    run_dir = workspace.run(SHRINK).run_dir
    recorded = json.loads((run_dir / "manifest.json").read_text())["git"]
    assert recorded["dirty"] is True and recorded["commit"] == git("rev-parse", "HEAD").decode().strip()
    hparams = (run_dir / "tensorboard" / "hparams.yaml").read_text()
    assert f"git.commit: {recorded['commit']}" in hparams and "git.dirty: true" in hparams


@pytest.mark.slow
def test_a_checked_config_fails_before_any_run_dir_is_made(workspace):
    result = workspace.run(["data.skip_bad_images=no", "--cfg", "job"], check=False, full_error=False)
    assert result.returncode == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "error" in line] == [
        "config error: data.skip_bad_images=no: takes true or false"
    ]
    result = workspace.run(["data.skip_bad_images=no", "seed=-1"], check=False, full_error=False)
    assert result.returncode == 1 and not result.created and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("config error: ")]) == 2


def on_a_small_disk(workspace, args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """`python run.py ARGS` in `workspace` with its outputs/ on a 400 KB tmpfs of the command's own (a mount
    namespace: nothing to clean up; the outputs are copied out before it ends), or, where this machine cannot mount
    one, with a 400 KB file-size limit (writes past it fail with EFBIG, as a full disk fails them with ENOSPC)."""
    (workspace.root / "outputs").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "HYDRA_FULL_ERROR")}
    typed = " ".join(shlex.quote(a) for a in [sys.executable, "run.py", *args])
    script = f"mount -t tmpfs -o size=400k tmpfs outputs || exit 99\n{typed}; rc=$?\ncp -a outputs kept\nexit $rc"
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        if shutil.which(prefix[0]) is None:
            break
        command = [*prefix, "sh", "-c", script]
        result = subprocess.run(command, cwd=workspace.root, env=env, capture_output=True, text=True)
        if result.returncode != 99 and "unshare: " not in result.stderr:
            return result, workspace.root / "kept"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    result = subprocess.run(
        [sys.executable, "run.py", *args], cwd=workspace.root, env=env, capture_output=True, text=True, preexec_fn=limit
    )
    return result, workspace.root / "outputs"


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_truncated_file(workspace):
    result, outputs = on_a_small_disk(workspace, SHRINK)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower() and "[INFO]" not in line]
    assert result.returncode == 1 and len(errors) == 1 and "cannot write" in errors[0], output[-4000:]
    assert "No space left on device" in errors[0] or "File too large" in errors[0]
    assert "Traceback" not in output
    files = [p for p in outputs.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".ckpt", ".tmp") or p.name.endswith(".tmp")], files
    for path in files:  # what was written is whole
        if path.suffix == ".json":
            json.loads(path.read_text())


def test_a_diverging_loss_stops_the_run_naming_the_step_and_the_learning_rate(tmp_path, data_dir):
    diverging = [*TINY_SHAPES, *ONE_EPOCH, "trainer.limit_train_batches=6", "model.optimizer.lr=1e6", "logger=csv"]
    with pytest.raises(UserError, match=r"train/loss reached .* at global step \d+ .*diverged.*model\.optimizer\.lr"):
        run(compose_config(diverging, tmp_path / "run", data_dir))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    run(compose_config([*diverging, "callbacks.nonfinite_loss.divergence_factor=null"], tmp_path / "off", data_dir))
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["train/loss"] > 1000
