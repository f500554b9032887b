"""The explaining tasks' modules and data built as the runner builds them (from the composed config of a command), the
shapes classifier they explain, and the settings their building blocks take from conf/."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import OmegaConf

from framework.config import compose, model_settings
from framework.preparation import model_inputs
from framework.runner import instantiate, run
from lightning_modules.explain.classifier import required_classifier
from tests.helpers.tasks import CLASSIFIER_TRAINING


def config(task: str, data_dir: Path, *overrides: str):
    """The config `python run.py task=<task> OVERRIDES` runs, its data folder `data_dir`."""
    return compose([f"task={task}", f"paths.data_dir={data_dir}", *overrides])


def explain_data(task: str, data_dir: Path, *overrides: str) -> L.LightningDataModule:
    """The data module of task=<task> with `overrides`."""
    return instantiate(config(task, data_dir, *overrides).data)


def explain_module(task: str, data_dir: Path, *overrides: str, **inputs) -> L.LightningModule:
    """The module of task=<task> with `overrides`, built as the runner builds it: with the data inputs `inputs`, or,
    when none are given, with those the task's data gives (which prepares the data first)."""
    cfg = config(task, data_dir, *overrides)
    if not inputs:
        inputs = model_inputs(hydra.utils.get_class(cfg.model._target_), instantiate(cfg.data))
    return instantiate(cfg.model, **inputs)


def classifier_settings(data_dir: Path, **values) -> dict:
    """model.classifier as conf/model/classifier_to_explain.yaml gives it (its cache in `data_dir`), `values`
    replacing some: the arguments of classifier_to_explain."""
    return model_settings("classifier_to_explain", cache_dir=str(data_dir / "shapes_classifier")) | values


def attribution_settings(**values) -> dict:
    """The settings of Attributions (but the Grad-CAM layer) as task=saliency gives them, `values` replacing some."""
    saliency = model_settings("saliency")
    keys = ("smoothgrad_samples", "smoothgrad_noise", "ig_steps", "internal_batch_size")
    return {key: saliency[key] for key in keys} | values


def trained_shapes_classifier(data_dir: Path) -> Path:
    """The checkpoint of the shapes classifier that the explaining tasks use by default (their required run,
    framework/prerequisites.py, in model.classifier.cache_dir under `data_dir`), trained there first in this process
    when it is not there yet, as the runner trains it, with the session's shorter training (CLASSIFIER_TRAINING)."""
    cfg = config("saliency", data_dir)
    (required,) = required_classifier(OmegaConf.to_container(cfg.model, resolve=True)["classifier"])
    if required.found() is None:
        run_dir = Path(required.run_dir)
        run_dir.mkdir(parents=True)
        run(compose([f"task={required.task}", f"paths.data_dir={data_dir}", *CLASSIFIER_TRAINING], output_dir=run_dir))
    return required.found()
