"""The check of a composed config before anything runs: its keys outside targets (`RunSettings`, conf/config.yaml),
every target's settings against its signature (framework/schema.py), and the folders Hydra is about to create.

`CheckConfig` (a Hydra callback, conf/hydra/default.yaml) checks before Hydra creates the run dir or starts a sweep,
and stops the command with one line per problem; the runner checks each job again when it starts (a sweep's jobs
differ by their sweep values); run.py checks what `--cfg` is about to print.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, NotRequired, TypedDict

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from framework.errors import UserError
from framework.schema import ExistingDir, ExistingPath, PathTo, Seed, Target, WritableDir, check, show


class PathSettings(TypedDict):
    root_dir: ExistingDir  # the repository: PROJECT_ROOT, else run.py's folder
    data_dir: WritableDir
    log_dir: WritableDir
    output_dir: str


class RunSettings(TypedDict):
    """The keys of conf/config.yaml (their defaults and meaning are there), and the groups it composes."""

    mode: Literal["train", "eval", "predict", "export"]
    task_name: str
    seed: Seed | None
    ckpt_path: ExistingPath | None
    export_after_train: bool
    resume: Literal["auto"] | None
    optimized_metric: str | None
    data: Target
    model: Target
    trainer: Target
    callbacks: dict[str, Target | None] | None
    logger: dict[str, Target | None] | None
    paths: PathSettings
    fsdp_layers: NotRequired[list[str]]  # conf/model/sharding/: the FSDP units of trainer=fsdp


def check_config(cfg: DictConfig) -> None:
    """Every setting of `cfg` (without its `hydra` node) against its declared type and range; `~` in paths expanded."""
    check(cfg, RunSettings)


def check_hydra(cfg: DictConfig, multirun: bool) -> None:
    """The folder Hydra creates (the run dir, or the sweep dir) writable, and a sweeper's trial count."""
    problems = []
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    directory = str(OmegaConf.select(cfg, key))
    if (problem := PathTo("writable").problem(directory)) is not None:
        problems.append(f"{key}={directory}: takes {problem}")
    trials = OmegaConf.select(cfg, "hydra.sweeper.n_trials", default=None)
    if multirun and trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        problems.append(f"hydra.sweeper.n_trials={show(trials)}: takes a whole number >= 1")
    if problems:
        raise UserError("\n".join(problems))


def report(error: UserError) -> None:
    """Stop the command with the problems of its config, one line each."""
    for line in str(error).splitlines():
        print(f"config error: {line}", file=sys.stderr)
    sys.exit(1)


class CheckConfig(Callback):
    """Checks the config before Hydra creates the run dir (a single run) or launches the first job (a sweep, whose
    shared settings are checked here and each job's own when it starts)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, multirun=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, multirun=True)

    @staticmethod
    def check(config: DictConfig, multirun: bool) -> None:
        problems = []
        for step in (lambda: check_config(config), lambda: check_hydra(config, multirun)):
            try:
                step()
            except UserError as error:
                problems += str(error).splitlines()
        # The run dir is made under paths.log_dir: a bad log_dir is that one problem, not two.
        if any(problem.startswith("paths.log_dir=") for problem in problems):
            derived = ("hydra.run.dir=", "hydra.sweep.dir=")
            problems = [problem for problem in problems if not problem.startswith(derived)]
        if problems:
            report(UserError("\n".join(problems)))
