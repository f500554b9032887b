"""Building a task's data module and LightningModule has no side effects: no file appears, no process starts.

Work that writes (generating data, training the shapes classifier to explain) belongs to the preparation step,
`prepare_data`, which Lightning runs once per node while the other ranks wait; loading belongs to `setup`. Every
task of tests/test_every_task.py is built from its composed config, with the data prepared in between.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hydra.utils import instantiate

from framework.runner import model_inputs
from tests.conftest import ROOT, compose_config
from tests.test_every_task import TASKS


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
    cfg = compose_config([*TASKS[task](tmp_path, data_dir), "logger=csv"], tmp_path / "run", data_dir)
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
    inputs = model_inputs(datamodule)  # the data's preparation step: it may write (e.g. generate the shapes)
    build(cfg.model, **inputs)
