"""Explaining a captioner word by word (task=caption_explain): maps for every word, measured, files, bad input;
a CNN-RNN, then a tiny BLIP and ViT-GPT2 (tests.helpers.tiny_models', trained a few steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.captions import CaptionBatch
from datamodules.explain import OBJECT_WORDS
from framework.checks import check_config
from framework.config import model_settings
from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning.hf import HFCaptioner
from lightning_modules.explain.caption_explain import CaptionExplainModule, completeness_error
from lightning_modules.explain.caption_words import ground_words, split_words, word_scorer
from tests.helpers.config import TINY_MODEL, compose_config, read_metrics
from tests.helpers.explain import config, explain_data, explain_module
from tests.helpers.tiny_models import IMAGE_SIZE, gpt2_tokenizer, save_tiny_blip, save_tiny_vit_gpt2
from tests.helpers.tiny_vlms import (
    IDEFICS3_FAMILY,
    save_tiny_blip2,
    save_tiny_florence2,
    save_tiny_git,
    save_tiny_idefics3,
    save_tiny_paligemma,
    save_tiny_qwen2_vl,
)

# A shapes set and captioner small enough to train in a minute, but trained enough to name colours and shapes; at
# 64 px (an 8x8 encoder grid) its attention learns where they are.
SHAPES = ["data.num_train=240", "data.num_val=8", "data.num_test=16", "data.image_size=64"]
EXPLAIN = [
    *SHAPES,
    "data.num_predict=6",
    "data.eval_batch_size=6",
    "model.deletion_steps=5",
    "model.contact_sheet_images=2",
]
METHODS = ("integrated_gradients", "gradcam", "attention")


def explainer(captioner: Path, data_dir: Path, *overrides: str, image_size: int | None = 64) -> CaptionExplainModule:
    """task=caption_explain's module explaining `captioner` (its data inputs: those of the shapes data, `image_size`
    px)."""
    return explain_module(
        "caption_explain",
        data_dir,
        f"model.captioner={captioner}",
        *overrides,
        image_size=image_size,
        object_words=OBJECT_WORDS,
    )


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("captioner")
    run(
        compose_config(
            [
                *TINY_MODEL,
                *SHAPES,
                "model.decoder.hidden_dim=64",
                "model.decoder.attention_dim=32",
                "data.batch_size=16",
                "data.num_workers=0",
                "trainer.max_epochs=4",
                "model.optimizer.lr=0.01",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "logger=csv",
            ],
            run_dir,
            data_dir,
        )
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def explained(make_workspace, captioner) -> Path:
    """`python run.py task=caption_explain model.captioner=...` of the captioner (its shapes data already in data/)."""
    args = ["task=caption_explain", f"model.captioner={captioner}", *EXPLAIN, "model.randomisation_words=16"]
    return make_workspace().run(args).run_dir


@pytest.mark.slow
def test_every_word_has_a_finite_map_per_method(explained):
    rows = json.loads((explained / "predictions.json").read_text())
    assert len(rows) == 6 and all(row["caption"] for row in rows)
    for row in rows:
        name = Path(row["image"]).stem
        assert [word["word"] for word in row["words"]] == row["caption"].split()
        for method in METHODS:
            maps = np.load(explained / "caption_explain" / method / f"{name}.npy")
            assert maps.shape == (len(row["words"]), 64, 64) and np.isfinite(maps).all() and (maps >= 0).all()
        assert (explained / "caption_explain" / f"{name}.png").is_file()
        assert (explained / "caption_explain" / "input" / f"{name}.png").is_file()
    assert (explained / "contact_sheet.png").is_file()
    board = EventAccumulator(str(explained / "tensorboard")).Reload()
    assert "contact_sheet" in board.Tags()["images"]
    assert "predict/integrated_gradients/pointing_game_content_words" in board.Tags()["scalars"]


@pytest.mark.slow
def test_pointing_game_of_colour_and_shape_words_is_above_chance(explained):
    """A colour or shape word's map peaks on the object it names more often than a random peak would."""
    metrics = read_metrics(explained)
    chance = metrics["predict/pointing_game_chance_content_words"]
    print(
        f"\npointing game of content words (chance {chance:.3f}): "
        + ", ".join(f"{m} {metrics[f'predict/{m}/pointing_game_content_words']:.3f}" for m in METHODS)
    )
    for method in ("integrated_gradients", "attention"):
        assert metrics[f"predict/{method}/pointing_game_content_words"] > chance
    for key in ("deletion_auc", "insertion_auc", "spearman_decoder", "spearman_encoder.body.0"):
        assert f"predict/gradcam/{key}_function_words" in metrics
    # the randomisation check on model.randomisation_words (16) rows of the batch, spread over its images
    words = [word for row in json.loads((explained / "predictions.json").read_text()) for word in row["words"]]
    checked = [word for word in words if "integrated_gradients/spearman_decoder" in word]
    assert len(words) > 16 and len(checked) == 16 and all(np.isfinite(w["gradcam/deletion_auc"]) for w in words)


@pytest.mark.slow
def test_integrated_gradients_are_complete_per_word(captioner, data_dir):
    """Each word's attributions sum to log p(word | image) - log p(word | black image), within 2% (at 128 steps; the
    run's 32 leave a few words at 2-10%), for words whose gap is over 0.05 nats (below, 2% is float noise)."""
    module = explainer(
        captioner, data_dir, "model.methods=[integrated_gradients]", "model.ig_steps=128", "model.randomisation=false"
    )
    data = explain_data("caption_explain", data_dir, *SHAPES, "data.num_predict=2", "data.eval_batch_size=2")
    batch = next(iter(data.predict_dataloader()))
    check_completeness(module, batch["images"], batch["paths"])


def check_completeness(module: CaptionExplainModule, pixels: torch.Tensor, paths: list[str]) -> None:
    """Every word of the images' captions: Integrated Gradients' completeness error below 2% where the gap is over
    0.05 nats, which at least half the words have."""
    generated = module.scorer.generate(pixels)
    rows = [{"image": path, "caption": " ".join(words)} for path, words in zip(paths, generated.words)]
    words = module._words(pixels, generated, rows)
    records = [{} for _ in words.positions]
    module._maps("integrated_gradients", module.scorer, module.attributions, pixels, generated.tokens, words, records)
    errors = [completeness_error(word) for word in records if abs(word["integrated_gradients/gap"]) > 0.05]
    print(
        f"\nIntegrated Gradients completeness: {len(errors)} of {len(records)} words, largest relative error "
        f"{max(errors):.2e}"
    )
    assert len(errors) >= len(records) / 2 and max(errors) < 0.02


def test_words_are_grounded_in_the_object_their_phrase_names():
    objects = [
        {"shape": "circle", "colour": "red", "size": "large"},
        {"shape": "square", "colour": "blue", "size": "small"},
    ]
    caption = "a small blue square to the left of a large green circle in the picture".split()
    grounded = ground_words(caption, objects, OBJECT_WORDS)
    assert grounded == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, None, 0, 0, 0, 0]  # green is wrong
    # the words come with the data: a world of fruit, its noun first
    fruit = [{"fruit": "apple", "ripeness": "ripe"}, {"fruit": "pear", "ripeness": "green"}]
    words = {"fruit": ["apple", "pear"], "ripeness": ["ripe", "green"]}
    assert ground_words("a ripe apple beside a green pear".split(), fruit, words) == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_bad_input_is_one_clear_error(captioner, data_dir, tmp_path):
    with pytest.raises(UserError, match=r"model\.gradcam_layer.*encoder\.body\.0"):
        explainer(captioner, data_dir, "model.gradcam_layer=encoder.layer9")
    missing = captioner.with_name("missing.ckpt")
    with pytest.raises(UserError, match=rf"model\.captioner={missing}: takes .*an existing file or folder"):
        check_config(config("caption_explain", data_dir, f"model.captioner={missing}"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes.ckpt \(model\.captioner\) is not a checkpoint"):
        explainer(text, data_dir)
    with pytest.raises(UserError, match=r"model\.randomisation_words=0: takes .*a whole number >= 1"):
        check_config(config("caption_explain", data_dir, f"model.captioner={captioner}", "model.randomisation_words=0"))
    with pytest.raises(UserError, match=r"^model\.captioner is missing \(\?\?\? in the config\): give it a value$"):
        check_config(config("caption_explain", data_dir, f"ckpt_path={captioner}"))  # the captioner is no ckpt_path
    with pytest.raises(UserError, match=r"data\.image_size=32, but the captioner \(model\.captioner\) takes 64 px"):
        explainer(captioner, data_dir, image_size=32)
    module = explainer(captioner, data_dir, "model.methods=[gradcam]", "model.words=[40]", "model.randomisation=false")
    pixels = torch.rand(1, 3, 64, 64)
    generated = module.scorer.generate(pixels)
    with pytest.raises(UserError, match=r"model\.words=\[40\].*has \d+ words"):
        module._words(pixels, generated, [{"image": "x.png", "caption": " ".join(generated.words[0])}])


# -- BLIP and ViT-GPT2 ---------------------------------------------------------------------------------------------
HF_SHAPES = ["data.num_train=8", "data.num_val=2", "data.num_test=8", "data.image_size=32"]


def predicting(count: int) -> list[str]:
    """The data overrides that predict the first `count` test images in one batch."""
    return [f"data.num_predict={count}", f"data.eval_batch_size={count}"]


# conf/model/<name>.yaml, the tiny model, and the vision transformer's first parameterised layers
HF_CAPTIONERS = {
    "blip": ("blip", save_tiny_blip, ["encoder.embeddings", "encoder.encoder.layers.0"]),
    "vit_gpt2": ("vit_gpt2", save_tiny_vit_gpt2, ["encoder.embeddings", "encoder.layers.0"]),
    # patch sequences: the grid comes back from Qwen2-VL's merge order
    "qwen2_vl": ("hf_captioner", save_tiny_qwen2_vl, ["encoder.patch_embed", "encoder.blocks.0"]),
}


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=[pytest.mark.slow] if name == "qwen2_vl" else []) for name in HF_CAPTIONERS],
)
def hf_export(request, tmp_path_factory, data_dir) -> Path:
    """A tiny BLIP / ViT-GPT2 / Qwen2-VL (32 px, 2 layers) trained for 80 steps to say "<size> <colour> <shape>" of
    the first object of 8 shapes test images (the images explained below), exported with save_pretrained."""
    name, save, _ = HF_CAPTIONERS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    generation = {"num_beams": 1, "max_new_tokens": 8}
    random = str(save(folder / "random"))  # no label smoothing: the word's probability is the trained one
    settings = model_settings(name, generation=generation, label_smoothing=0.0, scheduler=None)
    module = HFCaptioner(**settings | {"pretrained": random})
    batch = next(iter(explain_data("caption_explain", data_dir, *HF_SHAPES, *predicting(8)).predict_dataloader()))
    data = CaptionBatch(
        size=batch["size"],
        images=(batch["images"] * 255).round().to(torch.uint8),  # as the module's image_transform gives them
        tokens=[[o["size"], o["colour"], o["shape"]] for o in (objects[0] for objects in batch["objects"])],
    )
    # A small learning rate: enough to name the object, while the word's log-probability stays smooth enough along
    # Integrated Gradients' path (at lr 0.006 some words' fall by 8 nats within 0.2% of it: 128 steps miss that).
    optimizer = torch.optim.Adam(module.model.parameters(), lr=0.002)
    for _ in range(80):
        optimizer.zero_grad()
        module.loss(data).backward()
        optimizer.step()
    return module.eval().export(folder / request.param)  # named after its HF_CAPTIONERS key


def test_hf_captioner_every_word_has_a_finite_map(hf_export, tmp_path, data_dir):
    """Through the runner, model.captioner an export directory: a finite Integrated Gradients and Grad-CAM map per
    word, the randomisation check down the vision transformer's layers."""
    run(
        compose_config(
            [
                "task=caption_explain",
                f"model.captioner={hf_export}",
                *HF_SHAPES,
                "data.num_predict=4",
                "data.eval_batch_size=4",
                "model.methods=[integrated_gradients,gradcam]",
                "model.deletion_steps=5",
                "model.contact_sheet_images=1",
                "model.ig_steps=16",
            ],
            tmp_path,
            data_dir,
        )
    )
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert len(rows) == 4 and all(row["caption"] for row in rows)
    for row in rows:
        assert [word["word"] for word in row["words"]] == row["caption"].split()
        assert all(0 < word["probability"] <= 1 for word in row["words"])
        for method in ("integrated_gradients", "gradcam"):
            maps = np.load(tmp_path / "caption_explain" / method / f"{Path(row['image']).stem}.npy")
            assert maps.shape == (len(row["words"]), 32, 32) and np.isfinite(maps).all() and (maps >= 0).all()
    metrics = read_metrics(tmp_path)
    layers = HF_CAPTIONERS[hf_export.name][2]
    for key in ("deletion_auc", "spearman_decoder", *(f"spearman_{layer}" for layer in layers)):
        assert np.isfinite(metrics[f"predict/gradcam/{key}_content_words"]), key


def test_hf_captioner_integrated_gradients_are_complete_per_word(hf_export, data_dir):
    # The tiny Qwen2-VL's word log-probabilities change steeply in the last 3% of the path (by up to 1.6 nats): 128
    # steps leave errors of 20-100% there, 1024 7%, 2048 0.1% (its gradients are right: 4096 leave 2e-5).
    steps = 2048 if hf_export.name == "qwen2_vl" else 128
    module = explainer(
        hf_export,
        data_dir,
        "model.methods=[integrated_gradients]",
        f"model.ig_steps={steps}",
        "model.randomisation=false",
        image_size=32,
    )
    images = 1 if hf_export.name == "qwen2_vl" else 2  # its 2048 steps: one image's words
    data = explain_data("caption_explain", data_dir, *HF_SHAPES, *predicting(images))
    batch = next(iter(data.predict_dataloader()))
    check_completeness(module, batch["images"], batch["paths"])


def test_hf_captioner_bad_input_is_one_clear_error(hf_export, data_dir):
    layers = r"encoder\.((encoder\.)?layers|blocks)\.1"
    settings = ("model.methods=[gradcam]", "model.randomisation=false")
    with pytest.raises(UserError, match=rf"model\.gradcam_layer.*encoder \(the last\).*{layers}"):
        explainer(hf_export, data_dir, *settings, "model.gradcam_layer=encoder.layer9", image_size=32)
    with pytest.raises(UserError, match=r"model\.methods: Hugging Face captioners.*model\.methods=\[gradcam\]"):
        explainer(hf_export, data_dir, "model.methods=[gradcam,attention]", "model.randomisation=false", image_size=32)
    with pytest.raises(UserError, match=r"data\.image_size=64.*set data\.image_size=32"):
        explainer(hf_export, data_dir, *settings, image_size=64)


def test_words_of_several_tokens_are_one_word():
    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode("a redcircle above blues")
    words, spans = split_words(tokenizer, ids)
    assert words == ["a", "redcircle", "above", "blues"] and len(ids) > len(words)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize(
    "save",
    [
        save_tiny_blip,
        save_tiny_git,
        save_tiny_blip2,
        save_tiny_qwen2_vl,
        save_tiny_idefics3,
        save_tiny_paligemma,
        save_tiny_florence2,
    ],
    ids=lambda save: save.__name__.removeprefix("save_tiny_"),
)
def test_pixels_reach_the_model_laid_out_as_its_processor_lays_them_out(save, tmp_path, monkeypatch):
    """caption_explain's differentiable path from pixels to the model (normalise, then lay_out_pixels: one image, one
    tile, Qwen2-VL's merge-ordered patch sequences) gives the processor's own pixel values; Grad-CAM reads each
    image's patches as a grid (after a CLS token or none; from Qwen2-VL's rows, each patch back where it was)."""
    from lightning_modules.captioning import hf

    families = tmp_path / "families"  # Idefics3 has no family shipped: the one its test adds
    shutil.copytree(hf.FAMILIES, families)
    (families / "idefics3.yaml").write_text(IDEFICS3_FAMILY)
    monkeypatch.setattr(hf, "FAMILIES", families)
    model = str(save(tmp_path / "model"))
    module = HFCaptioner(**model_settings("hf_captioner", scheduler=None, pretrained=model, image_size=IMAGE_SIZE))
    scorer = word_scorer(module)
    images = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    ours = module.model_inputs(images, pixel_values=scorer.normalise(images / 255))["pixel_values"]
    theirs = module.model_inputs(images)["pixel_values"]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)
    # the randomisation's "decoder": every module beside the vision tower (BLIP-2's query tokens are no module)
    tower = {id(p) for p in module.vision_tower().parameters()}
    in_modules = {id(p) for name, p in module.model.named_parameters() if "." in name}
    assert {id(p) for p in scorer.net.decoder.parameters()} == in_modules - tower
    grids = []  # Grad-CAM's layer: the last vision layer's patches as the 4 x 4 grid of each image
    scorer.layer("encoder").register_forward_hook(lambda module, args, output: grids.append(output.shape))
    scorer.logits(images / 255, scorer.generate(images / 255).tokens)
    assert grids[-1][0] == 2 and grids[-1][2:] == (4, 4)
    rows = torch.arange(2 * 16 * 3.0).view(2 * 16, 3)  # a 4 x 4 grid of patches, 2 x 2 blocks
    grid = hf.grid_of_merge_order(rows, 4, 2)
    assert grid.shape == (2, 3, 4, 4) and torch.equal(hf.merge_order(grid, 2), rows)
    assert torch.equal(grid[0, :, 0, 2], rows[4]) and torch.equal(grid[0, :, 1, 0], rows[2])  # block 1; block 0, row 1
