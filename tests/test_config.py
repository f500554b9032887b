"""Every config composes: each task, and each option of each group, on top of the default."""

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from framework.hardware import resolve_trainer
from tests.helpers.config import CONF, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes_and_instantiates(task, tmp_path, data_dir):
    cfg = compose_config([f"task={task}"], tmp_path, data_dir)
    assert cfg.task_name == task
    assert get_class(cfg.model._target_)
    if not OmegaConf.missing_keys(cfg.data):  # a task may leave a data key for the command line (??? in its config)
        instantiate(cfg.data)
    instantiate(resolve_trainer(cfg.trainer))


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "debug", "experiment", "hparams_search", "data"])
def test_every_group_option_composes(group, tmp_path, data_dir):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path, data_dir)
        assert cfg.mode == "train"


def test_default_is_shapes_captioning_on_cpu(tmp_path, data_dir):
    cfg = compose_config([], tmp_path, data_dir)
    assert cfg.task_name == "shapes_captioning"
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision == "auto"  # tests/test_hardware.py
    assert cfg.callbacks.model_checkpoint.monitor == "val/CIDEr"
    assert cfg.callbacks.last_checkpoint.filename == "last"


def test_callbacks_and_loggers_instantiate(tmp_path, data_dir):
    cfg = compose_config(["logger=many"], tmp_path, data_dir)
    assert {type(instantiate(c)).__name__ for c in cfg.callbacks.values()} >= {"ModelCheckpoint", "CaptionMedia"}
    assert {type(instantiate(c)).__name__ for c in cfg.logger.values()} == {"TensorBoardLogger", "CSVLogger"}


def test_hydra_run_dirs_are_per_task(tmp_path, data_dir):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = OmegaConf.to_container(compose("config", return_hydra_config=True).hydra, resolve=False)
    assert hydra_cfg["run"]["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
    assert hydra_cfg["sweep"]["dir"].startswith("${paths.log_dir}/${task_name}/multiruns/")


def test_optuna_sweep_optimises_val_cider(tmp_path, data_dir):
    cfg = compose_config(["hparams_search=shapes_optuna"], tmp_path, data_dir)
    assert cfg.optimized_metric == "val/CIDEr"
