"""Adversarial examples and class visualisation (task=adversarial, task=class_visualisation), shapes classifier."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from datamodules.shapes import SHAPES
from framework.checks import check_config
from framework.errors import UserError
from lightning_modules.explain.adversarial import fooling_images
from tests.helpers.config import read_metrics
from tests.helpers.explain import config, explain_module
from tests.helpers.tasks import shapes_batch, shapes_classifier_checkpoint


@pytest.fixture(scope="module")
def pixels(data_dir, shapes_checkpoint) -> torch.Tensor:
    return shapes_batch(data_dir, 8)["images"]


def attacker(data_dir, checkpoint, *overrides: str):
    """task=adversarial's module on the shapes data (its data inputs), explaining the classifier `checkpoint`."""
    inputs = dict(classes=list(SHAPES), image_size=64, source_size=None)
    return explain_module("adversarial", data_dir, f"model.classifier.checkpoint={checkpoint}", *overrides, **inputs)


@pytest.mark.slow
def test_pgd_stays_in_the_epsilon_ball_and_the_pixel_range(shapes_checkpoint, data_dir, pixels):
    for epsilon, targeted in ((8 / 255, False), (0.3, True)):  # 0.3: clipping to [0, 1] is needed
        module = attacker(
            data_dir,
            shapes_checkpoint,
            "model.attack=pgd",
            f"model.epsilon={epsilon}",
            f"model.step_size={epsilon / 3}",
            "model.steps=6",
            f"model.target={1 if targeted else 'null'}",
        )
        result = module.attack(pixels)
        change = (result["images"] - pixels).abs()
        assert change.max() <= epsilon + 1e-6 and change.max() > epsilon / 2
        assert result["images"].min() >= 0 and result["images"].max() <= 1
        reached = result["fooled"] == 1 if targeted else result["fooled"] != result["predicted"]
        assert torch.equal(result["success"], reached)
    print(f"\nPGD eps=0.3 targeted at class 1: success {result['success'].float().mean():.2f}")


@pytest.mark.slow
def test_fooling_images_reach_their_target_within_100_steps(shapes_checkpoint, data_dir, pixels):
    module = attacker(data_dir, shapes_checkpoint, "model.attack=fooling")
    assert (module.hparams.step_size, module.hparams.steps) == (0.5, 100)  # null: the attack's own
    result = module.attack(pixels)
    assert (result["fooled"] == result["targets"]).all() and (result["targets"] != result["predicted"]).all()
    assert result["iterations"].max() <= 100 and result["success"].all()
    change = (result["images"] - pixels).flatten(1)
    print(
        f"\nfooling: steps {result['iterations'].tolist()}, L2 {change.norm(dim=1).mean():.3f}, "
        f"Linf {change.abs().max(1).values.mean():.3f}"
    )
    # the loop stops each image once fooled: a target already predicted takes no step
    images, iterations = fooling_images(module.classifier, pixels, result["predicted"], 0.5, 100)
    assert iterations.sum() == 0 and torch.equal(images, pixels)


@pytest.mark.slow
def test_adversarial_run_writes_side_by_side_images_and_metrics(workspace, shapes_checkpoint):
    run_dir = workspace.run(
        ["task=adversarial", "model.attack=fgsm", "model.epsilon=0.1", "data.num_predict=6"]
    ).run_dir
    rows = json.loads((run_dir / "predictions.json").read_text())
    metrics = read_metrics(run_dir)
    assert len(rows) == 6 and metrics["predict/images"] == 6
    assert all(abs(row["linf"] - 0.1) < 1e-5 or row["linf"] < 0.1 for row in rows) and metrics["predict/linf"] > 0.09
    assert metrics["predict/success"] == sum(row["success"] for row in rows) / 6 and metrics["predict/iterations"] == 1
    side_by_side = Image.open(next((run_dir / "adversarial").glob("*.png")))
    assert side_by_side.width == 3 * (side_by_side.height - 36)  # three square panels above their captions
    assert (run_dir / "adversarial_fgsm.png").is_file()
    print(f"\nFGSM eps=0.1: success rate {metrics['predict/success']:.2f}, L2 {metrics['predict/l2']:.2f}")


@pytest.mark.slow
def test_class_visualisation_raises_the_class_probability(workspace, shapes_checkpoint):
    run_dir = workspace.run(["task=class_visualisation", "model.steps=60", "data.targets=[0,3]"]).run_dir
    rows = json.loads((run_dir / "predictions.json").read_text())
    assert [row["class"] for row in rows] == ["circle", "diamond"]
    assert all(row["probability"] > 0.5 for row in rows), rows  # from noise, where no class is favoured
    assert sorted(p.name for p in (run_dir / "class_visualisation").glob("*.png")) == [
        "0000_circle.png",
        "0003_diamond.png",
    ]
    assert (run_dir / "class_visualisation.png").is_file()


def test_bad_attack_settings(tmp_path, data_dir):
    with pytest.raises(UserError, match=r"model.epsilon=1.5: takes .*a number >= 0 and <= 1"):
        check_config(config("adversarial", data_dir, "model.epsilon=1.5"))
    with pytest.raises(UserError, match=r"model.target=-1: takes .*a whole number >= 0"):
        check_config(config("adversarial", data_dir, "model.attack=fooling", "model.target=-1"))
    with pytest.raises(UserError, match=r"model.attack=cw: takes .*one of fooling, fgsm, pgd"):
        check_config(config("adversarial", data_dir, "model.attack=cw"))
    checkpoint = shapes_classifier_checkpoint(tmp_path / "shapes.ckpt")
    with pytest.raises(UserError, match=r"model.target=4 is not a class of the classifier: give an index in 0..3"):
        attacker(data_dir, checkpoint, "model.attack=fooling", "model.target=4")
