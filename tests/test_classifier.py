"""The shapes classifier (task=shapes_classifier), trained once per session, and the classifiers the explaining
tasks load: our checkpoints (cached after training once) and torchvision models with normalisation inside."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from datamodules.explain import ShapeClassesDataModule
from framework.errors import UserError
from framework.launch import RANK_VARIABLES
from lightning_modules.explain.classifier import (
    PixelClassifier,
    ShapesClassifier,
    classifier_to_explain,
    ensure_shapes_classifier,
)
from tests.conftest import read_metrics

# The default shapes data (3,000 / 200 / 200 images, about half with one object) and fewer epochs.
TRAIN = ["trainer.max_epochs=4", "logger=csv"]


@pytest.fixture(scope="session")
def shapes_checkpoint(data_dir) -> Path:
    """The shapes classifier, trained through `python run.py task=shapes_classifier` into the cache the explaining
    tasks use by default (so later calls, from any test module, reuse it)."""
    return ensure_shapes_classifier(data_dir / "shapes_classifier", data_dir, tuple(TRAIN))


def epoch_values(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_training_learns_the_shapes(shapes_checkpoint):
    run_dir = shapes_checkpoint.parents[1]
    losses, accuracies = epoch_values(run_dir, "val/loss"), epoch_values(run_dir, "val/acc")
    metrics = read_metrics(run_dir)
    print(f"\nshapes classifier: val/loss {losses}, val/acc {accuracies}, test/acc {metrics['test/acc']:.3f}")
    assert losses[-1] < losses[0] - 0.5, losses
    assert metrics["test/acc"] > 0.9 and max(accuracies) > 0.9  # chance: 0.25


def test_cached_classifier_is_reused_and_loads_with_weights_only(shapes_checkpoint, data_dir, caplog):
    with caplog.at_level(logging.INFO):
        assert ensure_shapes_classifier(data_dir / "shapes_classifier", data_dir) == shapes_checkpoint
    assert "explaining the cached shapes classifier" in caplog.text and "training one" not in caplog.text
    classifier = classifier_to_explain(checkpoint=str(shapes_checkpoint))
    module = ShapesClassifier.load_from_checkpoint(shapes_checkpoint, map_location="cpu", weights_only=True)
    assert classifier.class_names == module.hparams.classes == ["circle", "square", "triangle", "diamond"]
    batch = next(iter(ShapeClassesDataModule(str(data_dir), num_predict=32).predict_dataloader()))
    with torch.no_grad():
        accuracy = (classifier(batch["images"]).argmax(1) == batch["label"]).float().mean().item()
    assert accuracy > 0.85  # pixels in [0, 1] go in: the classifier normalises them itself
    assert classifier.last_spatial_layer() == "block3"
    assert classifier.parameterised_layers() == ["block0", "block1", "block2", "block3", "fc"]


def test_torchvision_classifier_normalises_inside(tmp_path, monkeypatch):
    classifier = classifier_to_explain("resnet18", pretrained=False)
    assert isinstance(classifier, PixelClassifier) and len(classifier.class_names) == 1000
    pixels = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = classifier.net((pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        assert torch.allclose(classifier(pixels), expected)
    assert classifier.last_spatial_layer() == "layer4"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch cache: no weights there
    with pytest.raises(UserError, match="model.classifier.pretrained"):
        classifier_to_explain("resnet50")


def test_bad_classifier_settings(tmp_path):
    with pytest.raises(UserError, match="model.classifier.name=resnet5000"):
        classifier_to_explain("resnet5000")
    with pytest.raises(UserError, match="model.classifier.checkpoint"):
        classifier_to_explain(checkpoint=str(tmp_path / "missing.ckpt"))


def test_training_from_a_rank_of_a_distributed_job_is_a_job_of_its_own(tmp_path, monkeypatch):
    """The preparation step may run in rank 0 of a DDP, torchrun or SLURM job: the training it starts must not see
    the variables that would make it wait for that job's other ranks."""
    for name, value in (("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "12910"), ("SLURM_NTASKS", "2")):
        monkeypatch.setenv(name, value)
    started = {}

    def failing_run(command, cwd, env):
        started.update(env)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="training the shapes classifier failed"):
        ensure_shapes_classifier(tmp_path / "cache", tmp_path)
    assert started["PATH"] == os.environ["PATH"] and not set(RANK_VARIABLES) & set(started)
    assert not (tmp_path / "cache").exists()  # nothing half-trained is left behind
