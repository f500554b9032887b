"""Attribution maps (task=saliency): the methods' defining properties, the measures, bad input, run.py end to end;
what every explaining task shares: its settings checked at composition, the classifier loaded when the module is
built, the classes handed to the data by the runner."""

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

from datamodules.explain import OBJECT_WORDS
from datamodules.shapes import SHAPES
from framework.checks import check_config
from framework.errors import UserError
from framework.preparation import Preparation
from framework.rendering import read_rgb, stack
from lightning_modules.explain.attributions import METHODS, Attributions
from lightning_modules.explain.classifier import PixelClassifier, classifier_to_explain
from lightning_modules.explain.measures import deletion_insertion, pointing_chance, pointing_game, spearman
from tests.helpers.config import read_metrics
from tests.helpers.explain import attribution_settings, classifier_settings, config, explain_data, explain_module
from tests.helpers.tasks import SALIENCY, shapes_batch, shapes_classifier_checkpoint


@pytest.fixture(scope="module")
def saliency_run(make_workspace, shapes_checkpoint) -> Path:
    """`python run.py task=saliency` with the default classifier: the cached one the session fixture trained."""
    result = make_workspace().run(["task=saliency", *SALIENCY])
    log = result.stdout + result.stderr
    assert "model.classifier.checkpoint=" in log and "(task=shapes_classifier)" in log  # the required run, found
    assert "training it first" not in log
    return result.run_dir


@pytest.fixture
def random_shapes_classifier(tmp_path) -> Path:
    """A shapes classifier of random weights, saved as training saves it (64 px)."""
    return shapes_classifier_checkpoint(tmp_path / "shapes.ckpt")


def test_vanilla_gradient_of_a_linear_model_is_its_weights():
    linear = nn.Linear(3 * 8 * 8, 5)
    classifier = PixelClassifier(nn.Sequential(nn.Flatten(), linear), [str(i) for i in range(5)])
    pixels, targets = torch.rand(4, 3, 8, 8, requires_grad=True), torch.tensor([0, 1, 2, 4])
    gradients = Attributions(classifier, "1", **attribution_settings()).attribute("vanilla", pixels, targets)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # the normalisation inside scales the weights
    expected = (linear.weight[targets].view(4, 3, 8, 8) / std).abs()
    assert torch.allclose(gradients, expected.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_integrated_gradients_are_complete(shapes_checkpoint, data_dir):
    """Attributions sum to f(x) - f(black image) for the target (Sundararajan et al.'s completeness)."""
    classifier = classifier_to_explain(**classifier_settings(data_dir, checkpoint=str(shapes_checkpoint)))
    classifier.requires_grad_(False)
    pixels = shapes_batch(data_dir, 4)["images"].requires_grad_()
    with torch.no_grad():
        targets = classifier(pixels).argmax(1)
        gap = (classifier(pixels) - classifier(torch.zeros_like(pixels))).gather(1, targets[:, None])[:, 0]
    attributions = Attributions(classifier, "block3", **attribution_settings(ig_steps=64))
    attributed = attributions.attribute("integrated_gradients", pixels, targets)
    relative_error = ((attributed.sum((1, 2, 3)) - gap).abs() / gap.abs()).max().item()
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_randomised_network_changes_the_maps(saliency_run):
    """Adebayo et al.: with the weights re-initialised from the top down, the maps must change."""
    metrics = read_metrics(saliency_run)
    layers = ["fc", "block3", "block2", "block1", "block0"]
    curves = {m: [round(metrics[f"predict/{m}/spearman_{layer}"], 3) for layer in layers] for m in METHODS}
    print(f"\nSpearman with the trained network's maps, randomised down to {layers}: {curves}")
    for method in ("vanilla", "gradcam"):
        assert max(curves[method][1:]) < 0.6, (method, curves[method])


@pytest.mark.slow
def test_explains_a_folder_of_images(tmp_path, data_dir, shapes_checkpoint, workspace):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(shapes_batch(data_dir, 2)["paths"]):
        Image.open(path).save(folder / ("sub" if i else ".") / "same_name.png")
    (folder / "broken.png").write_bytes(b"not a png")
    result = workspace.run(
        [
            "task=saliency",
            "data=explain_images",
            f"data.images={folder}",
            "data.image_size=64",
            "data.skip_bad_images=true",
            "model.methods=[gradcam]",
            "model.randomisation=false",
            f"model.classifier.checkpoint={shapes_checkpoint}",
        ]
    )
    run_dir = result.run_dir
    assert "skipped 1 unreadable images" in result.stdout + result.stderr
    assert sorted(p.name for p in (run_dir / "saliency" / "gradcam").glob("*.png")) == [
        "same_name.png",
        "sub__same_name.png",
    ]
    assert read_metrics(run_dir)["predict/images"] == 2


def test_bad_input_is_one_clear_error(tmp_path, data_dir, random_shapes_classifier):
    shapes = (f"model.classifier.checkpoint={random_shapes_classifier}", "model.randomisation=false")
    inputs = dict(classes=list(SHAPES), image_size=64, source_size=None)  # what data=shape_classes gives
    with pytest.raises(UserError, match=r"model.target=4 is not a class"):
        explain_module("saliency", data_dir, *shapes, "model.methods=[vanilla]", "model.target=4", **inputs)
    with pytest.raises(UserError, match=r"no layer 'layer4' \(model.gradcam_layer\).*block3"):
        explain_module("saliency", data_dir, *shapes, "model.methods=[gradcam]", "model.gradcam_layer=layer4", **inputs)
    with pytest.raises(UserError, match=r"model.methods\[0\]=occlusion: takes one of vanilla, smoothgrad"):
        check_config(config("saliency", data_dir, "model.methods=[occlusion]"))
    with pytest.raises(UserError, match="data's classes"):
        explain_module(
            "saliency",
            data_dir,
            "model.classifier.name=resnet18",
            "model.classifier.pretrained=false",
            "model.methods=[vanilla]",
            "model.randomisation=false",
            **inputs,
        )
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    loader = explain_data("saliency", data_dir, "data=explain_images", f"data.images={folder}").predict_dataloader()
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        next(iter(loader))
    targets = explain_data("class_visualisation", data_dir, "data.targets=[0,9]")
    with pytest.raises(UserError, match=r"data.targets=\[0,9\]: 9 is not a class of the classifier.* 0..3"):
        targets.use_class_names(list(SHAPES))


BAD_SETTINGS = {  # task: (overrides, the lines of the config error: what each begins with, then what it says)
    "saliency": (
        ["model.methods=[]", "model.target=-1", "model.ig_steps=0", "model.pointing_tolerance=2", "model.seed=-3"],
        [
            ("model.methods=[]: takes", "vanilla, smoothgrad, integrated_gradients, gradcam"),
            ("model.target=-1: takes", "a whole number >= 0 (or null)"),
            ("model.ig_steps=0: takes", "a whole number >= 1"),
            ("model.pointing_tolerance=2: takes", "a number >= 0 and <= 1"),
            ("model.seed=-3: takes", "a whole number >= 0 and <= 4294967295"),
        ],
    ),
    "adversarial": (
        ["model.attack=cw", "model.epsilon=1.5", "model.steps=0", "model.step_size=0", "data.image_size=16"],
        [
            ("model.attack=cw: takes", "one of fooling, fgsm, pgd"),
            ("model.epsilon=1.5: takes", "a number >= 0 and <= 1"),
            ("model.steps=0: takes", "a whole number >= 1 (or null)"),
            ("model.step_size=0: takes", "a number > 0 (or null)"),
            ("data.image_size=16: takes", "a whole number >= 32"),
        ],
    ),
    "class_visualisation": (
        ["data.targets=[-1]", "model.jitter=-1", "model.classifier.name=resnet5000", "model.classifier.checkpoint=x"],
        [
            ("data.targets[0]=-1: takes", "a whole number >= 0"),
            ("model.jitter=-1: takes", "a whole number >= 0"),
            ("model.classifier.name=resnet5000: takes", "shapes or the name of a torchvision classifier"),
            ("model.classifier.checkpoint=x: takes", "an existing, readable file (or null)"),
        ],
    ),
    "caption_explain": (
        ["model.methods=[occlusion]", "model.words=[-1]", "model.randomisation_words=0", "data.images=/nowhere"],
        [
            ("model.captioner is missing", "(??? in the config): give it a value"),
            (
                "model.methods[0]=occlusion: takes",
                "one of vanilla, smoothgrad, integrated_gradients, gradcam, attention",
            ),
            ("model.words[0]=-1: takes", "a whole number >= 0"),
            ("model.randomisation_words=0: takes", "a whole number >= 1 (or null)"),
            ("data.images=/nowhere: takes", "an existing folder (or null)"),
        ],
    ),
    "shapes_classifier": (
        ["model.width=0", "model.label_smoothing=1", "data.captions_per_image=0"],
        [
            ("model.width=0: takes", "a whole number >= 1"),
            ("model.label_smoothing=1: takes", "a number >= 0 and < 1"),
            ("data.captions_per_image=0: takes", "a whole number >= 1 and <= "),
        ],
    ),
}


@pytest.mark.parametrize("task", list(BAD_SETTINGS))
def test_bad_settings_are_refused_when_the_config_is_composed(task, data_dir):
    """Before anything is built: one line per bad key, naming it, its value and what it takes."""
    overrides, expected = BAD_SETTINGS[task]
    with pytest.raises(UserError) as error:
        check_config(config(task, data_dir, *overrides))
    lines = str(error.value).splitlines()
    assert len(lines) == len(expected), lines
    for line, (start, says) in zip(sorted(lines), sorted(expected)):
        assert line.startswith(start) and says in line, (line, start, says)
    check_config(config(task, data_dir, *(["model.captioner=README.md"] if task == "caption_explain" else [])))


def test_folder_of_images_must_be_given(data_dir):
    with pytest.raises(UserError, match=r"^data.images is missing \(\?\?\? in the config\): give it a value$"):
        check_config(config("saliency", data_dir, "data=explain_images"))


def test_the_classifier_is_loaded_when_the_module_is_built(data_dir, random_shapes_classifier):
    """Its classes are known before any stage: the runner hands them to the data (data.targets checked there)."""
    module = explain_module("class_visualisation", data_dir, f"model.classifier.checkpoint={random_shapes_classifier}")
    assert module.class_names == list(SHAPES) and not module.classifier.training
    assert not any(p.requires_grad for p in module.parameters())
    data = explain_data("class_visualisation", data_dir)
    with pytest.raises(UserError, match="use_class_names"):
        data.predict_dataloader()  # outside the runner, nothing handed over yet
    Preparation().setup(SimpleNamespace(datamodule=data), module, "predict")
    assert next(iter(data.predict_dataloader()))["target"].tolist() == [0, 1, 2, 3]  # targets=null: every class
    chosen = explain_data("class_visualisation", data_dir, "data.targets=[3,1]")
    Preparation().setup(SimpleNamespace(datamodule=chosen), module, "predict")
    assert next(iter(chosen.predict_dataloader()))["target"].tolist() == [3, 1]
    bad = explain_data("class_visualisation", data_dir, "data.targets=[4]")
    with pytest.raises(UserError, match=r"data.targets=\[4\]: 4 is not a class"):
        Preparation().setup(SimpleNamespace(datamodule=bad), module, "predict")
    with pytest.raises(UserError, match="model.classifier.checkpoint is not set"):  # outside the runner
        explain_module("class_visualisation", data_dir, "model.classifier.checkpoint=null")


def test_the_data_says_which_words_name_its_objects(tmp_path, data_dir):
    names = ("image_size", "object_words")
    shapes = explain_data("caption_explain", data_dir)
    assert shapes.model_inputs(names) == {"image_size": 64, "object_words": OBJECT_WORDS}
    assert OBJECT_WORDS["shape"] == list(SHAPES) and "red" in OBJECT_WORDS["colour"]
    folder = tmp_path / "images"
    folder.mkdir()
    folder_of_images = explain_data("caption_explain", data_dir, f"data.images={folder}")
    assert folder_of_images.model_inputs(names)["object_words"] is None
    photos = explain_data("saliency", data_dir, "data=explain_images", f"data.images={folder}")
    assert photos.model_inputs(names) == {"image_size": 224, "object_words": None}


def test_sheets_stack_images_of_several_widths(tmp_path):
    narrow, wide = np.zeros((2, 3, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)
    stacked = stack([narrow, wide])
    assert stacked.shape == (6, 5, 3) and (stacked[:2, 3:] == 255).all() and (stacked[2:] == 0).all()
    Image.fromarray(stacked).save(tmp_path / "sheet.png")
    assert np.array_equal(read_rgb(tmp_path / "sheet.png"), stacked)
