"""The one entry point: python run.py [mode=train|eval|predict|export] [task=...] [group=option] [key=value]...

See README.md and conf/config.yaml.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from framework.allocator import keep_freed_memory

keep_freed_memory()
# paths.root_dir: this repository, wherever the command runs from (and known before Hydra sets up a sweep).
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.errors import UserError
    from framework.launch import use_job_command_for_ranks  # imported here: `--cfg job` and `--help` need no Lightning
    from framework.runner import run

    use_job_command_for_ranks()
    try:
        return run(cfg)
    except UserError:
        # run() has logged the message with the run dir, one line; Hydra would add a traceback that buries it. In a
        # multirun the error goes on to Hydra, which records the job as failed, runs the others and fails the sweep.
        if HydraConfig.get().mode == RunMode.RUN and os.environ.get("HYDRA_FULL_ERROR") != "1":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
