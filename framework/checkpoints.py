"""Checkpoints checked before Lightning loads them (eval/predict/export, resuming, a classifier to explain).

A missing file, a file that is no checkpoint, a truncated one or one of another task is one UserError naming the
file and what to do, instead of whatever breaks inside torch.load or the module's __init__.

Checkpoints record the task and the module class that wrote them (`TaskRecord`, in every callbacks config that
saves checkpoints). For a checkpoint without that record (written before it existed, or with callbacks=none), the
module's required __init__ arguments are looked for in the checkpoint's hyperparameters instead.

trainer=fsdp writes sharded checkpoints: a torch.distributed.checkpoint directory (weights and optimizer states, one
file per rank) with Lightning's `meta.pt` (everything else). They are checked by their `meta.pt`, and `load_module`
loads one on a single process (eval, predict, export, the Captioner API).
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from framework.errors import UserError
from framework.files import atomic_write

RECORD = "task"  # checkpoint[RECORD] = {"name": task_name, "module": "package.module.Class"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


class TaskRecord(L.Callback):
    """Writes the task name and the LightningModule's class into every checkpoint."""

    def __init__(self, task_name: str):
        self.task_name = task_name

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        module = type(pl_module)
        checkpoint[RECORD] = {"name": self.task_name, "module": f"{module.__module__}.{module.__qualname__}"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written whole or not at all: to a temporary name, then renamed (Lightning's own save writes
    the file in place, so a full disk leaves a truncated checkpoint); a failed write is one UserError naming it."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options=None) -> None:
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # its refusal
        # Serialised in memory first, as Lightning does: torch.save into a full disk fails inside its zip writer with
        # a RuntimeError, writing bytes fails with the OSError that names the cause.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda file: file.write(buffer.getbuffer()), mode="wb")


def read_checkpoint(path: str | os.PathLike, key: str | None = "ckpt_path") -> dict:
    """A Lightning checkpoint's contents, its tensors memory-mapped (so reading it before Lightning does costs little
    even for big files); a UserError naming the file (and the config `key` that gave it) when it cannot be one."""
    path = Path(path)
    named = f"{path} ({key})" if key else str(path)
    if path.is_dir():
        return read_sharded_metadata(path, named)
    if not path.is_file():
        raise UserError(f"checkpoint {named} does not exist{_alternatives(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{named} holds Python objects besides tensors and plain values, which are not loaded "
            f"(weights_only): it is not a checkpoint of this project ({str(error).splitlines()[0]})"
            f"{_alternatives(path)}"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch.load's errors for bad files are RuntimeError, EOFError, ...
        with open(path, "rb") as file:
            if file.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                raise UserError(
                    f"{named} is not a checkpoint (torch.save did not write it: a text file? "
                    f"{path.stat().st_size} bytes){_alternatives(path)}"
                ) from None
        reason = str(error).splitlines()[0].split(". ")[0]  # torch's first sentence; the rest is advice
        raise UserError(
            f"checkpoint {named} is corrupt or truncated (an interrupted copy or save?): {reason}{_alternatives(path)}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = [str(name) for name in checkpoint] if isinstance(checkpoint, dict) else []
        held = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") if keys else type(checkpoint).__name__
        raise UserError(
            f"{named} is not a Lightning checkpoint: it has no state_dict (it holds {held}; plain "
            f"weights, or an export?){_alternatives(path)}"
        )
    return checkpoint


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / _METADATA_FILENAME).is_file()


def read_sharded_metadata(path: Path, named: str) -> dict:
    """A sharded checkpoint's `meta.pt` (all but weights and optimizer states), once the folder is checked."""
    has = [name for name in (_METADATA_FILENAME, ".metadata") if (path / name).is_file()]
    if len(has) < 2:
        what = f"it has {has[0]} alone, an interrupted save?" if has else "it has neither"
        raise UserError(
            f"{named} is a directory, not a checkpoint file nor a sharded checkpoint of trainer=fsdp (a folder with "
            f"{_METADATA_FILENAME} and .metadata; {what}){_alternatives(path)}"
        )
    return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)


def load_module(module_class: type[L.LightningModule], path: str | os.PathLike, **overrides) -> L.LightningModule:
    """`module_class.load_from_checkpoint` on the CPU, for checkpoint files and sharded checkpoints alike (their
    weights are gathered into this process; optimizer states are not read)."""
    source: str | os.PathLike | io.BytesIO = path
    if is_sharded_checkpoint(path):
        # As Lightning's _load_distributed_checkpoint, but the weights alone (dcp.load fills only keys it is given).
        weights: dict = {}
        planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})
        _load_state_dict(weights, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        checkpoint = read_checkpoint(path) | weights
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    return module_class.load_from_checkpoint(source, map_location="cpu", weights_only=True, **overrides)


def check_checkpoint(path: str | os.PathLike, module_class: type, task_name: str, key: str = "ckpt_path") -> None:
    """A UserError unless `path` is a readable checkpoint that `module_class` (task `task_name`'s module) can load."""
    checkpoint = read_checkpoint(path, key)
    record = checkpoint.get(RECORD) or {}
    check_not_retired(checkpoint.get("captioner"), path)
    # Captioners also name their class under "captioner" (CaptioningModule.on_save_checkpoint: "package.module.Class",
    # older ones "Class"), records or not.
    writer = (record.get("module") or checkpoint.get("captioner") or "").rsplit(".", 1)[-1]
    if writer and writer != module_class.__name__:
        owner = f"task {record['name']} (its module class {writer})" if record.get("name") else f"module class {writer}"
        fix = f"give a checkpoint of a task={task_name} run"
        if record.get("name") and key == "ckpt_path":
            fix = f"run with task={record['name']}, or {fix}"
        raise UserError(
            f"checkpoint {path} ({key}) belongs to {owner}, not to task={task_name} ({module_class.__name__}): {fix}"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [] if writer else [name for name in required_arguments(module_class) if name not in hparams]
    if missing:
        raise UserError(
            f"{path} ({key}) is not a checkpoint of task={task_name}: its module class "
            f"{module_class.__name__} needs {', '.join(missing)}, which the checkpoint does not hold "
            f"(its hyperparameters: {', '.join(hparams) or 'none'}); give a checkpoint of a "
            f"task={task_name} run"
        )


# Classes whose checkpoints this version cannot load, with what to do instead.
RETIRED_CLASSES = {
    name: (
        f"it was written by {name}, which the generic Hugging Face captioner (lightning_modules/captioning/hf.py) "
        "replaced: export it with a vlx checkout from before that change (python run.py task=<its task> mode=export "
        "ckpt_path=<it>), then load, predict with or fine-tune the export (model.pretrained=<its export folder>)"
    )
    for name in ("BLIPCaptioner", "ViTGPT2Captioner")
}


def check_not_retired(class_name: str | None, path: str | os.PathLike) -> None:
    """One UserError for a checkpoint of a retired class (`class_name`: what the checkpoint names, any form)."""
    name = (class_name or "").rsplit(".", 1)[-1] if isinstance(class_name, str) else ""
    if name in RETIRED_CLASSES:
        raise UserError(f"checkpoint {path} cannot be loaded: {RETIRED_CLASSES[name]}")


def required_arguments(module_class: type) -> list[str]:
    """The __init__ arguments without a default (what load_from_checkpoint must find in the hyperparameters)."""
    parameters = list(inspect.signature(module_class.__init__).parameters.values())[1:]  # without self
    return [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _alternatives(path: Path) -> str:
    """What to give instead: for a directory the checkpoints in it (or in its checkpoints/ folder: a run dir), else
    the other checkpoints next to `path` (last.ckpt first), or where runs keep theirs."""
    inside = [path, path / "checkpoints"] if path.is_dir() else []
    for folder in [*inside, path.parent]:
        try:
            others = sorted(
                (p.name for p in folder.glob("*.ckpt") if p != path),
                key=lambda name: (name != "last.ckpt", name),
            )
        except OSError:  # a folder we may not list
            others = []
        if others:
            return f"; {'other ' if folder == path.parent else ''}checkpoints in {folder}: {', '.join(others[:4])}"
    return "; give a run's checkpoints/last.ckpt (or checkpoints/epoch_*.ckpt)"
