"""Attribution maps (task=saliency): the methods' defining properties, the measures, bad input, run.py end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from datamodules.explain import ClassTargetsDataModule, ImageFolderDataModule, ShapeClassesDataModule
from framework.errors import UserError
from lightning_modules.explain.attributions import METHODS, Attributions
from lightning_modules.explain.classifier import PixelClassifier, classifier_to_explain
from lightning_modules.explain.measures import deletion_insertion, pointing_chance, pointing_game, spearman
from lightning_modules.explain.saliency import SaliencyModule
from tests.conftest import prepared, read_metrics, run_cli
from tests.test_classifier import shapes_checkpoint  # noqa: F401 (session fixture)

# Few images and cheap settings; the figures in the README come from the defaults on 32 images.
SALIENCY = [
    "data.num_predict=12",
    "data.eval_batch_size=12",
    "model.smoothgrad_samples=8",
    "model.ig_steps=16",
    "model.deletion_steps=8",
    "model.contact_sheet_images=4",
]


@pytest.fixture(scope="module")
def saliency_run(tmp_path_factory, data_dir, shapes_checkpoint) -> Path:
    """`python run.py task=saliency` with the default classifier: the cached one the session fixture trained."""
    run_dir = tmp_path_factory.mktemp("saliency") / "run"
    result = run_cli(["task=saliency", *SALIENCY], run_dir, data_dir)
    assert "explaining the cached shapes classifier" in result.stdout + result.stderr
    return run_dir


def test_vanilla_gradient_of_a_linear_model_is_its_weights():
    linear = nn.Linear(3 * 8 * 8, 5)
    classifier = PixelClassifier(nn.Sequential(nn.Flatten(), linear), [str(i) for i in range(5)])
    pixels, targets = torch.rand(4, 3, 8, 8, requires_grad=True), torch.tensor([0, 1, 2, 4])
    gradients = Attributions(classifier, gradcam_layer="1").attribute("vanilla", pixels, targets)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # the normalisation inside scales the weights
    expected = (linear.weight[targets].view(4, 3, 8, 8) / std).abs()
    assert torch.allclose(gradients, expected.detach(), rtol=1e-5, atol=1e-7)


def shapes_batch(data_dir: Path, count: int) -> dict:
    datamodule = ShapeClassesDataModule(str(data_dir), num_predict=count, eval_batch_size=count)
    return next(iter(datamodule.predict_dataloader()))


def test_integrated_gradients_are_complete(shapes_checkpoint, data_dir):
    """Attributions sum to f(x) - f(black image) for the target (Sundararajan et al.'s completeness)."""
    classifier = classifier_to_explain(checkpoint=str(shapes_checkpoint)).requires_grad_(False)
    pixels = shapes_batch(data_dir, 4)["images"].requires_grad_()
    with torch.no_grad():
        targets = classifier(pixels).argmax(1)
        gap = (classifier(pixels) - classifier(torch.zeros_like(pixels))).gather(1, targets[:, None])[:, 0]
    attributions = Attributions(classifier, "block3", ig_steps=64).attribute("integrated_gradients", pixels, targets)
    relative_error = ((attributions.sum((1, 2, 3)) - gap).abs() / gap.abs()).max().item()
    print(f"\nIntegrated Gradients completeness: largest relative error {relative_error:.2e} (gaps {gap.tolist()})")
    assert relative_error < 0.01


def test_measures_on_handmade_maps():
    class Bright(nn.Module):  # class 1's logit grows with the brightness of the top-left quarter
        def forward(self, pixels):
            score = pixels[:, :, :4, :4].mean((1, 2, 3)) * 10
            return torch.stack([torch.zeros_like(score), score], 1)

    classifier = PixelClassifier(Bright(), ["dark", "bright"], mean=(0, 0, 0), std=(1, 1, 1))
    pixels, targets = torch.zeros(2, 3, 8, 8), torch.tensor([1, 1])
    pixels[:, :, :4, :4] = 1
    right = torch.zeros(2, 8, 8)
    right[:, :4, :4] = 1 + torch.rand(2, 4, 4)  # the quarter that matters ranks first
    deletion, insertion = deletion_insertion(classifier, pixels, right, targets, steps=8)
    wrong_deletion, wrong_insertion = deletion_insertion(classifier, pixels, 1 - right / 2, targets, steps=8)
    assert (deletion < wrong_deletion).all() and (insertion > wrong_insertion).all()
    boxes = torch.tensor([[0.0, 0.0, 3.0, 3.0], [5.0, 5.0, 7.0, 7.0]])
    assert pointing_game(right, boxes).tolist() == [True, False]
    assert pointing_game(right, boxes, tolerance=5).tolist() == [True, True]
    assert pointing_chance(boxes, 8, 8).tolist() == [16 / 64, 9 / 64]
    assert pointing_chance(boxes, 8, 8, tolerance=2).tolist() == [36 / 64, 25 / 64]  # clipped to the image
    assert torch.allclose(spearman(right, right * 2 + 1), torch.ones(2))
    assert spearman(right, torch.zeros(2, 8, 8)).tolist() == [0.0, 0.0]  # a constant map ranks nothing


def test_saliency_run_writes_maps_sheets_and_metrics(saliency_run):
    rows = json.loads((saliency_run / "predictions.json").read_text())
    assert len(rows) == 12
    for method in METHODS:
        overlays = sorted((saliency_run / "saliency" / method).glob("*.png"))
        maps = sorted((saliency_run / "saliency" / method).glob("*.npy"))
        assert len(overlays) == len(maps) == 12 and np.load(maps[0]).shape == (64, 64)
        assert Image.open(saliency_run / f"contact_sheet_{method}.png").size == (4 * 128, 128)
    assert Image.open(saliency_run / "contact_sheet.png").size == (4 * 128, 5 * 128)
    metrics = read_metrics(saliency_run)
    assert metrics["predict/images"] == 12 and metrics["predict/correct"] > 0.8
    board = EventAccumulator(str(saliency_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    assert {"contact_sheet", *(f"contact_sheet_{m}" for m in METHODS)} <= set(board.Tags()["images"])
    assert "predict/gradcam/pointing_game" in board.Tags()["scalars"]


def test_pointing_game_is_far_above_chance(saliency_run):
    metrics = read_metrics(saliency_run)
    chance = metrics["predict/pointing_game_chance"]
    figures = {
        m: (
            metrics[f"predict/{m}/pointing_game"],
            metrics[f"predict/{m}/deletion_auc"],
            metrics[f"predict/{m}/insertion_auc"],
        )
        for m in METHODS
    }
    print(f"\npointing game chance {chance:.3f}; (pointing game, deletion AUC, insertion AUC): {figures}")
    for method in ("gradcam", "integrated_gradients"):
        assert metrics[f"predict/{method}/pointing_game"] >= max(0.8, 3 * chance), method
    for method in METHODS:  # a map worth the name deletes faster than it inserts
        assert metrics[f"predict/{method}/deletion_auc"] < metrics[f"predict/{method}/insertion_auc"], method


def test_randomised_network_changes_the_maps(saliency_run):
    """Adebayo et al.: with the weights re-initialised from the top down, the maps must change."""
    metrics = read_metrics(saliency_run)
    layers = ["fc", "block3", "block2", "block1", "block0"]
    curves = {m: [round(metrics[f"predict/{m}/spearman_{layer}"], 3) for layer in layers] for m in METHODS}
    print(f"\nSpearman with the trained network's maps, randomised down to {layers}: {curves}")
    for method in ("vanilla", "gradcam"):
        assert max(curves[method][1:]) < 0.6, (method, curves[method])


def test_explains_a_folder_of_images(tmp_path, data_dir, shapes_checkpoint):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(shapes_batch(data_dir, 2)["paths"]):
        Image.open(path).save(folder / ("sub" if i else ".") / "same_name.png")
    (folder / "broken.png").write_bytes(b"not a png")
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "task=saliency",
            "data=explain_images",
            f"data.images={folder}",
            "data.image_size=64",
            "data.skip_bad_images=true",
            "model.methods=[gradcam]",
            "model.randomisation=false",
            f"model.classifier.checkpoint={shapes_checkpoint}",
        ],
        run_dir,
        data_dir,
    )
    assert "skipped 1 unreadable images" in result.stdout + result.stderr
    assert sorted(p.name for p in (run_dir / "saliency" / "gradcam").glob("*.png")) == [
        "same_name.png",
        "sub__same_name.png",
    ]
    assert read_metrics(run_dir)["predict/images"] == 2


def test_bad_input_is_one_clear_error(tmp_path, shapes_checkpoint):
    classifier = {"checkpoint": str(shapes_checkpoint)}
    with pytest.raises(UserError, match=r"model.target=4 is not a class"):
        prepared(SaliencyModule(classifier, methods=["vanilla"], target=4, randomisation=False))
    with pytest.raises(UserError, match=r"no layer 'layer4' \(model.gradcam_layer\).*block3"):
        prepared(SaliencyModule(classifier, methods=["gradcam"], gradcam_layer="layer4", randomisation=False))
    with pytest.raises(UserError, match="model.methods: occlusion"):
        SaliencyModule(classifier, methods=["occlusion"], randomisation=False)
    with pytest.raises(UserError, match="data's classes"):
        prepared(
            SaliencyModule(
                {"name": "resnet18", "pretrained": False}, methods=["vanilla"], classes=["circle"], randomisation=False
            )
        )
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    loader = ImageFolderDataModule(str(folder), image_size=64).predict_dataloader()
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        next(iter(loader))
    targets = ClassTargetsDataModule(targets=[0, 9])
    targets.trainer = SimpleNamespace(
        lightning_module=prepared(SaliencyModule(classifier, ["vanilla"], randomisation=False))
    )
    with pytest.raises(UserError, match="data.targets=9 is not a class"):
        targets.predict_dataloader()
