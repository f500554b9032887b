"""The one entry point: python run.py [mode=train|eval|predict] [task=...] [group=option] [key=value]...

See README.md and conf/config.yaml.
"""

import hydra
from omegaconf import DictConfig

from framework.allocator import keep_freed_memory
from framework.runner import run

keep_freed_memory()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
