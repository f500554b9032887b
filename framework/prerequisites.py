"""Runs a task needs before it can run: a checkpoint of another task that a setting names, trained first, as a visible
step of the same command, when the setting is empty.

A module class declares them with `required_runs(settings) -> list[RequiredRun]` (its cfg.model as plain values):
the explaining tasks need a shapes classifier (`model.classifier.checkpoint`); when it is not given, the runner uses
the one trained before into `model.classifier.cache_dir`, or trains it there now: `python run.py task=<task>` with
this run's data folder, in this process, its log on the console and in its own run dir (run.log, config.yaml,
checkpoints, metrics.json, status.json: only a run that ended ok is used). The setting then names the checkpoint, in
this run's config.yaml too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.config import compose
from framework.errors import UserError
from framework.files import node_lock, writable_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequiredRun:
    key: str  # the setting that names its checkpoint, e.g. model.classifier.checkpoint
    task: str  # the task that makes it
    run_dir: str  # where it is kept once trained, and looked for
    run_dir_key: str  # the setting that names run_dir
    checkpoint: str = "checkpoints/epoch_*.ckpt"  # the checkpoint of that run to use (the newest match)

    def found(self) -> Path | None:
        """The checkpoint, once the run there has ended ok."""
        status, finished = Path(self.run_dir) / "status.json", Path(self.run_dir) / "metrics.json"
        if json.loads(status.read_text()).get("status") != "ok" if status.is_file() else not finished.is_file():
            return None
        matches = sorted(Path(self.run_dir).glob(self.checkpoint))
        return matches[-1] if matches else None


def provide_required_runs(cfg: DictConfig) -> None:
    """Set each required run's checkpoint in `cfg` (training the run first where it is not there yet)."""
    import hydra

    module_class = hydra.utils.get_class(cfg.model._target_)
    declared = getattr(module_class, "required_runs", None)
    for required in declared(OmegaConf.to_container(cfg.model, resolve=True)) if declared else ():
        OmegaConf.update(cfg, required.key, str(checkpoint_of(required, cfg)), merge=False)


def checkpoint_of(required: RequiredRun, cfg: DictConfig) -> Path:
    # One process of the node at a time: the others (ranks, other jobs) wait, then find it trained.
    with node_lock(f"required-{required.task}"):
        if (found := required.found()) is None:
            run_dir = Path(required.run_dir)
            if run_dir.exists():
                raise UserError(
                    f"{run_dir} holds no finished run of task={required.task} with {required.checkpoint} (a failed or "
                    f"interrupted one?): remove the folder to train it there, or set {required.key}=PATH"
                )
            train_required(required, cfg)
            found = required.found()
    log.info("%s=%s (task=%s)", required.key, found, required.task)
    return found


def train_required(required: RequiredRun, cfg: DictConfig) -> None:
    from framework.runner import run

    writable_dir(Path(required.run_dir).parent, required.run_dir_key)
    log.info(
        "%s is not set and %s holds no trained run: training it first, as `python run.py task=%s` would",
        required.key,
        required.run_dir,
        required.task,
    )
    run_dir = Path(required.run_dir)
    run_dir.mkdir()
    with logged_to(run_dir / "run.log"):
        run(compose([f"task={required.task}", f"paths.data_dir={cfg.paths.data_dir}"], output_dir=run_dir))
    if required.found() is None:
        raise UserError(f"task={required.task} (trained for {required.key}) wrote no {required.checkpoint}")
    log.info("task=%s trained into %s; going on with task=%s", required.task, required.run_dir, cfg.task_name)


class logged_to:
    """The root logger's records also in `path` while inside (the run's own log, as Hydra gives a run)."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))

    def __enter__(self) -> None:
        logging.getLogger().addHandler(self.handler)

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
