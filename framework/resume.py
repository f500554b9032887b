"""resume=auto: the run dir (or sweep dir) a run continues, chosen before Hydra creates one.

`ResumeAuto` (a Hydra callback, conf/hydra/default.yaml) sets hydra.run.dir (hydra.sweep.dir in a multirun), as if it
had been typed, to the newest unfinished run (sweep) of the task whose command-line overrides are this one's,
`resume=` aside; with none, or with an explicit hydra.run.dir (hydra.sweep.dir), it changes nothing:
- a run is unfinished when its dir has checkpoints/last.ckpt and its status.json does not say ok (it failed, was
  interrupted, or was killed before writing one); its overrides are what Hydra recorded in its .hydra/overrides.yaml;
- a sweep is unfinished when its dir has no summary.csv (framework/sweep_summary.py writes it once every job has
  finished); its overrides are in its multirun.yaml. Its jobs rerun in their dirs <sweep dir>/N, each continuing from
  its own last.ckpt (framework/runner.py `resume_from`). Only grid sweeps resume: another sweeper (Optuna) would
  give job N other parameters than the interrupted sweep's job N, so it always starts a new sweep.
Newest: the most recently started or resumed (the mtime of that record). The jobs of a sweep, and a job submitit
requeues, get the sweep dir as a hydra override from the launching process's config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class ResumeAuto(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (found := unfinished_dir(config, sweep=False)) is not None:
            pin(config, "run", found)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("resume") != "auto":
            return
        found = unfinished_dir(config, sweep=True) if config.hydra.sweeper._target_ == BASIC_SWEEPER else None
        if found is not None:
            pin(config, "sweep", found)
            log.info("resume=auto: continuing the sweep in %s", found)
        else:
            log.info("resume=auto: no unfinished grid sweep with these overrides, starting a new one")


def unfinished_dir(config: DictConfig, sweep: bool) -> Path | None:
    """The newest unfinished run (sweep) with this config's overrides in its task's runs (multiruns) folder, when
    resume=auto and no hydra.run.dir (hydra.sweep.dir) was given."""
    kind = "sweep" if sweep else "run"
    if config.get("resume") != "auto" or any(o.startswith(f"hydra.{kind}.dir=") for o in config.hydra.overrides.hydra):
        return None
    parent = Path(config.paths.log_dir) / config.task_name / ("multiruns" if sweep else "runs")
    wanted = comparable(config.hydra.overrides.task)
    found = [
        (record.stat().st_mtime, folder)
        for folder in (parent.iterdir() if parent.is_dir() else ())
        if (record := folder / ("multirun.yaml" if sweep else ".hydra/overrides.yaml")).is_file()
        and unfinished(folder, sweep)
        and comparable(recorded_overrides(record, sweep)) == wanted
    ]
    return max(found)[1] if found else None


def unfinished(folder: Path, sweep: bool) -> bool:
    """A sweep without its summary; a run with a last.ckpt that did not end ok (failed, interrupted, killed)."""
    if sweep:
        return not (folder / "summary.csv").exists()
    if not (folder / "checkpoints" / "last.ckpt").exists():
        return False
    status = folder / "status.json"
    if status.is_file():
        return json.loads(status.read_text()).get("status") != "ok"
    return not (folder / "metrics.json").exists()  # a run dir written before status.json


def recorded_overrides(record: Path, sweep: bool) -> list[str]:
    content = yaml.safe_load(record.read_text()) or {}
    return content.get("hydra", {}).get("overrides", {}).get("task", []) if sweep else content


def comparable(overrides) -> list[str]:
    """The overrides that make two runs the same run: all but resume=, in any order."""
    return sorted(str(o) for o in overrides if not str(o).lstrip("+~").startswith("resume="))


def pin(config: DictConfig, kind: str, folder: Path) -> None:
    """hydra.<kind>.dir=`folder`, as if typed: a sweep's jobs are composed with the launching process's hydra
    overrides, so they (and requeued jobs) get it too."""
    with open_dict(config.hydra):
        config.hydra[kind].dir = str(folder)
        config.hydra.overrides.hydra.append(f"hydra.{kind}.dir={folder}")
