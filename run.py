"""The one entry point: python run.py [mode=train|eval|predict|export] [task=...] [group=option] [key=value]...

See README.md and conf/config.yaml.
"""

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from framework.allocator import keep_freed_memory

keep_freed_memory()
# paths.root_dir: this repository, wherever the command runs from (and known before Hydra sets up a sweep).
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.errors import UserError
    from framework.launch import use_job_command_for_ranks  # imported here: `--cfg job` and `--help` need no Lightning
    from framework.loggers import RUN_LOG
    from framework.runner import run

    use_job_command_for_ranks()
    try:
        return run(cfg)
    except Exception as error:
        # run() has logged the error's line with the run dir. A single run stops there: Hydra would add a traceback
        # that buries it (a bug's traceback stays, HYDRA_FULL_ERROR=1 shows every one). A sweep's job is a failed row
        # of the sweep's summary (status.json) and the sweep goes on; its traceback goes to the job's run.log only.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            RUN_LOG.error("traceback of the failed job", exc_info=error)
            return None  # a failed trial for Optuna; the basic sweeper records nothing
        if isinstance(error, UserError) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            sys.exit(1)
        raise


def quote_home_paths(arguments: list[str]) -> list[str]:
    """`key=~/file` as `key='~/file'`: Hydra's override grammar reads an unquoted `~` as a deletion, so a path under
    the home folder (which zsh, and bash in quotes, leave unexpanded) would be a syntax error; the runner expands it."""
    return [re.sub(r"^([\w.+@/-]+)=(~.*)$", lambda m: f"{m[1]}='{m[2]}'", a) if "'" not in a else a for a in arguments]


def check_printed_config() -> None:
    """`--cfg job|hydra|all` prints the config without running anything (no Hydra callback sees it): check it here,
    as a run would, and stop with one line per problem."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args()
    if not args.cfg or args.multirun:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from framework.checks import check_config, report
    from framework.errors import UserError

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            cfg = compose("config", overrides=args.overrides, return_hydra_config=True)
        except ConfigCompositionException:
            return  # Hydra says it in one message when it composes the config itself
        try:
            check_config(cfg)
        except UserError as error:
            report(error)


if __name__ == "__main__":
    sys.argv[1:] = quote_home_paths(sys.argv[1:])
    check_printed_config()
    main()
