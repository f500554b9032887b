"""Building a task's data module and LightningModule has no side effects: no file appears, no process starts.

Work that writes belongs to the runner's steps before and between (training a required run, such as the shapes
classifier to explain: framework/prerequisites.py) and to `prepare_data` (generating data), which the runner and
Lightning run once per node while the other ranks wait. Every task of tests.helpers.tasks (the tasks
tests/test_every_task.py runs) is built from its composed config as the runner builds it, those steps in between.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate

from framework.preparation import model_inputs
from framework.prerequisites import provide_required_runs
from tests.helpers.config import ROOT, compose_config
from tests.helpers.tasks import TASKS, shapes_classifier_checkpoint


def files_under(*folders: Path) -> set[Path]:
    """Every file under `folders`, leaving out .git, .venv and Python's bytecode caches (written on import)."""
    skipped = {".git", ".venv", "__pycache__"}
    found = set()
    for folder in folders:
        for directory, subdirectories, files in os.walk(folder):
            subdirectories[:] = [name for name in subdirectories if name not in skipped]
            found.update(Path(directory, name) for name in files)
    return found


def refuse_process(*args, **kwargs):
    raise AssertionError(f"a constructor started a process: {args[:1]}")


@pytest.mark.parametrize("task", list(TASKS))
def test_building_a_task_writes_nothing_and_starts_nothing(task, tmp_path, data_dir, monkeypatch):
    args = [*TASKS[task](tmp_path, data_dir), "logger=csv"]
    if "classifier" in compose_config(args, tmp_path / "run", data_dir).model:  # a checkpoint to explain, untrained
        args.append(f"model.classifier.checkpoint={shapes_classifier_checkpoint(tmp_path / 'classifier.ckpt')}")
    cfg = compose_config(args, tmp_path / "run", data_dir)
    provide_required_runs(cfg)
    temp = tmp_path / "temp"  # the temporary folder of this process, watched with the others
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    watched = (ROOT, data_dir, tmp_path)

    def build(target, **inputs):
        before = files_under(*watched)
        with pytest.MonkeyPatch.context() as patch:
            for owner, name in ((subprocess, "Popen"), (subprocess, "run"), (os, "system")):
                patch.setattr(owner, name, refuse_process)
            built = instantiate(target, **inputs)
        new = files_under(*watched) - before
        assert not new, f"building {target._target_} wrote {sorted(map(str, new))}"
        return built

    datamodule = build(cfg.data)
    inputs = model_inputs(get_class(cfg.model._target_), datamodule)  # the data's preparation may write
    build(cfg.model, **inputs)
