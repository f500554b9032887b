"""The shapes classifier (task=shapes_classifier), trained once per session (tests/conftest.py's shapes_checkpoint),
and the classifiers the explaining tasks load: our checkpoints (the run the runner trains first when none is given,
kept in model.classifier.cache_dir) and torchvision models with normalisation inside."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from framework.checks import check_config
from framework.errors import UserError
from framework.prerequisites import provide_required_runs
from lightning_modules.explain.classifier import PixelClassifier, ShapesClassifier, classifier_to_explain
from tests.helpers.config import read_metrics
from tests.helpers.explain import classifier_settings, config, explain_data


def epoch_values(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.slow
def test_training_learns_the_shapes(shapes_checkpoint):
    run_dir = shapes_checkpoint.parents[1]
    losses, accuracies = epoch_values(run_dir, "val/loss"), epoch_values(run_dir, "val/acc")
    metrics = read_metrics(run_dir)
    print(f"\nshapes classifier: val/loss {losses}, val/acc {accuracies}, test/acc {metrics['test/acc']:.3f}")
    assert losses[-1] < losses[0] - 0.5, losses
    assert metrics["test/acc"] > 0.9 and max(accuracies) > 0.9  # chance: 0.25


@pytest.mark.slow
def test_cached_classifier_is_reused_and_loads_with_weights_only(shapes_checkpoint, data_dir, caplog):
    cfg = config("saliency", data_dir)
    with caplog.at_level(logging.INFO):
        provide_required_runs(cfg)  # model.classifier.checkpoint is null: the run in cache_dir is used
    assert cfg.model.classifier.checkpoint == str(shapes_checkpoint)
    assert f"model.classifier.checkpoint={shapes_checkpoint}" in caplog.text and "training it first" not in caplog.text
    classifier = classifier_to_explain(**classifier_settings(data_dir, checkpoint=str(shapes_checkpoint)))
    module = ShapesClassifier.load_from_checkpoint(shapes_checkpoint, map_location="cpu", weights_only=True)
    assert classifier.class_names == module.hparams.classes == ["circle", "square", "triangle", "diamond"]
    assert classifier.image_size == module.hparams.image_size == 64
    batch = next(iter(explain_data("saliency", data_dir, "data.num_predict=32").predict_dataloader()))
    with torch.no_grad():
        accuracy = (classifier(batch["images"]).argmax(1) == batch["label"]).float().mean().item()
    assert accuracy > 0.85  # pixels in [0, 1] go in: the classifier normalises them itself
    assert classifier.last_spatial_layer() == "block3"
    assert classifier.parameterised_layers() == ["block0", "block1", "block2", "block3", "fc"]


def test_torchvision_classifier_normalises_inside(tmp_path, monkeypatch):
    classifier = classifier_to_explain(**classifier_settings(tmp_path, name="resnet18", pretrained=False))
    assert isinstance(classifier, PixelClassifier) and len(classifier.class_names) == 1000
    pixels = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = classifier.net((pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        assert torch.allclose(classifier(pixels), expected)
    assert classifier.last_spatial_layer() == "layer4"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch cache: no weights there
    with pytest.raises(UserError, match="model.classifier.pretrained"):
        classifier_to_explain(**classifier_settings(tmp_path, name="resnet50"))


def test_bad_classifier_settings(tmp_path):
    with pytest.raises(
        UserError, match="model.classifier.name=resnet5000: takes .*shapes or the name of a torchvision"
    ):
        check_config(config("saliency", tmp_path, "model.classifier.name=resnet5000"))
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(UserError, match=rf"model.classifier.checkpoint={missing}: takes .*an existing, readable file"):
        check_config(config("saliency", tmp_path, f"model.classifier.checkpoint={missing}"))
    with pytest.raises(UserError, match="model.classifier.checkpoint is not set"):
        classifier_to_explain(**classifier_settings(tmp_path))  # outside the runner, which would fill it in
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes.ckpt \(model.classifier.checkpoint\) is not a checkpoint"):
        classifier_to_explain(**classifier_settings(tmp_path, checkpoint=str(text)))


def test_a_failed_classifier_training_is_never_used(tmp_path, monkeypatch):
    """The required run that fails leaves its run dir marked failed: the next run says so (and what to do) instead of
    explaining a half-trained classifier."""
    import framework.runner

    def failing_run(cfg):
        Path(cfg.paths.output_dir, "status.json").write_text(json.dumps({"status": "failed"}))
        raise RuntimeError("training stopped")

    monkeypatch.setattr(framework.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="training stopped"):
        provide_required_runs(config("saliency", tmp_path))
    with pytest.raises(UserError, match=r"holds no finished run of task=shapes_classifier.*classifier.checkpoint"):
        provide_required_runs(config("saliency", tmp_path))
    assert not list((tmp_path / "shapes_classifier").rglob("*.ckpt"))
