"""Style transfer's data modules, VGG features and modules as the task configs build them (their YAML's settings, a
few replaced): for in-process tests of the style family."""

from __future__ import annotations

from framework.checks import check_config
from framework.config import compose
from framework.errors import UserError
from framework.runner import instantiate
from lightning_modules.style.vgg import VGGFeatures

# conf/model/gatys.yaml's VGG block with random weights (drawn from a fixed seed) and float32 convolutions.
RANDOM_VGG = {"arch": "vgg19", "pretrained": False, "pool": "max", "dtype": "float32"}


def task_data(task: str, **values):
    """The data module `python run.py task=<task>` builds (conf/data/...), `values` replacing some settings."""
    return instantiate(compose([f"task={task}"]).data, **values)


def vgg_features(layers: list[str], allow_random_features: bool = False, **values) -> VGGFeatures:
    """VGG features of `layers`: RANDOM_VGG, `values` replacing some of it."""
    return VGGFeatures(layers, allow_random_features=allow_random_features, **{**RANDOM_VGG, **values})


def config_problems(task: str, *overrides: str) -> list[str]:
    """The lines the config check finds in `python run.py task=<task> OVERRIDES` (each `config error: <line>`)."""
    try:
        check_config(compose([f"task={task}", *overrides]))
    except UserError as error:
        return str(error).splitlines()
    return []
