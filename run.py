"""The one entry point: python run.py [mode=train|eval|predict|export] [task=...] [group=option] [key=value]...

See README.md and conf/config.yaml.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from framework.allocator import keep_freed_memory

keep_freed_memory()
# paths.root_dir: this repository, wherever the command runs from (and known before Hydra sets up a sweep).
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from framework.launch import use_job_command_for_ranks  # imported here: `--cfg job` and `--help` need no Lightning
    from framework.runner import run

    use_job_command_for_ranks()
    return run(cfg)


if __name__ == "__main__":
    main()
