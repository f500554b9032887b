"""The CNN-RNN captioner through the real config and runner: every architecture, and every bad input."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from framework.checks import check_config
from framework.errors import UserError
from framework.runner import run
from tests.helpers.config import TINY_MODEL, TINY_SHAPES, compose_config


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "pooled"])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("encoder", ["small_cnn", "resnet50", "densenet201"])
def test_fast_dev_run_every_architecture(encoder, rnn, attention, tmp_path, data_dir):
    cfg = compose_config(
        [
            *TINY_SHAPES,
            "trainer.fast_dev_run=true",
            "data.batch_size=2",
            "data.eval_batch_size=4",
            f"model.encoder.name={encoder}",
            f"model.decoder.rnn={rnn}",
            f"model.decoder.attention={attention}",
            "model.beam_size=2",
        ],
        tmp_path,
        data_dir,
    )
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"train/loss", "val/CIDEr", "test/CIDEr", "test/BLEU-4", "test/METEOR", "test/ROUGE-L"} <= set(metrics)
    assert np.isfinite(metrics["train/loss"])
    assert (tmp_path / "config.yaml").is_file()


def fdr(overrides, tmp_path, data_dir):
    shrink = TINY_MODEL if any(o.startswith("data=") for o in overrides) else TINY_SHAPES
    return compose_config([*shrink, "trainer.fast_dev_run=true", *overrides], tmp_path, data_dir)


def karpathy_json(tmp_path, filenames):
    images = [
        {"filename": name, "split": split, "sentences": [{"raw": f"a photo number {i}"}, {"raw": "a photo"}]}
        for i, (name, split) in enumerate(zip(filenames, ["train", "train", "val", "test"] * len(filenames)))
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_missing_data_dir_names_the_file(tmp_path, data_dir):
    cfg = fdr(["data=karpathy", f"data.source.annotations={tmp_path}/nowhere/dataset.json"], tmp_path, data_dir)
    with pytest.raises(
        UserError, match=r"caption file .*nowhere/dataset.json does not exist \(data.source.annotations\)"
    ):
        run(cfg)


def test_missing_image_folder_names_the_key(tmp_path, data_dir):
    annotations = karpathy_json(tmp_path, ["a.png"])
    cfg = fdr(
        ["data=karpathy", f"data.source.annotations={annotations}", f"data.source.image_root={tmp_path}/no_images"],
        tmp_path,
        data_dir,
    )
    with pytest.raises(UserError, match=r"image folder .*no_images does not exist \(data.source.image_root\)"):
        run(cfg)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not a Karpathy split JSON"),
        ('{"annotations": []}', "is not a Karpathy split JSON"),
        ('{"images": [{"filename": "a.png", "sentences": [{"raw": "x"}]}]}', r"images\[0\] lacks 'split'"),
    ],
)
def test_caption_file_in_the_wrong_format(content, message, tmp_path, data_dir):
    annotations = tmp_path / "captions.json"
    annotations.write_text(content)
    cfg = fdr(["data=karpathy", f"data.source.annotations={annotations}"], tmp_path, data_dir)
    with pytest.raises(UserError, match=rf"{annotations}.*{message}"):
        run(cfg)


def folder_with_a_corrupt_image(tmp_path):
    names = [f"{i}.png" for i in range(8)]
    for i, name in enumerate(names):
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(tmp_path / name)
    (tmp_path / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")  # a train image
    return karpathy_json(tmp_path, names)


def test_corrupt_image_names_the_file(tmp_path, data_dir):
    annotations = folder_with_a_corrupt_image(tmp_path)
    cfg = fdr(
        [
            "data=karpathy",
            f"data.source.annotations={annotations}",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.image_size=32",
            "trainer.fast_dev_run=false",
            "trainer.max_epochs=1",
        ],
        tmp_path,
        data_dir,
    )
    with pytest.raises(UserError, match=r"cannot read image .*4\.png.*data.skip_bad_images=true"):
        run(cfg)


def test_skip_bad_images_skips_and_counts(tmp_path, data_dir, caplog):
    annotations = folder_with_a_corrupt_image(tmp_path)
    cfg = fdr(
        [
            "data=karpathy",
            f"data.source.annotations={annotations}",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.image_size=32",
            "data.skip_bad_images=true",
            "trainer.fast_dev_run=false",
            "trainer.max_epochs=1",
        ],
        tmp_path,
        data_dir,
    )
    with caplog.at_level(logging.WARNING):
        run(cfg)
    assert "train: skipped 1 unreadable images" in caplog.text
    assert "test/CIDEr" in json.loads((tmp_path / "metrics.json").read_text())


def test_unknown_encoder_names_the_key(tmp_path, data_dir):
    with pytest.raises(UserError, match=r"model.encoder.name=vgg11: takes one of small_cnn, resnet50, densenet201"):
        run(fdr(["model.encoder.name=vgg11"], tmp_path, data_dir))


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["model.beam_size=0"], "model.beam_size=0: takes a whole number >= 1"),
        (["model.max_len=2.5"], "model.max_len=2.5: takes a whole number >= 1"),
        (["model.label_smoothing=1.5"], "model.label_smoothing=1.5: takes a number >= 0 and <= 1"),
        (["model.decoder.rnn=rnn"], "model.decoder.rnn=rnn: takes one of lstm, gru"),
        (["model.decoder.dropout=-0.1"], "model.decoder.dropout=-0.1: takes a number >= 0 and <= 1"),
        (
            ["+model.decoder.vocab_size=9"],
            "model.decoder.vocab_size is not a setting of model.decoder",
        ),
        (["model.encoder.lr=0"], "model.encoder.lr=0: takes a number > 0 (or null)"),
        (["model.scst.baseline=max"], "model.scst.baseline=max: takes one of greedy, mean"),
        (["model.scst.start_epoch=-1"], "model.scst.start_epoch=-1: takes a whole number >= 0 (or null)"),
        (["data.vocab_min_count=null"], "data.vocab_min_count=null: takes a whole number >= 1"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0: takes a whole number >= 1 (or null)"),
        (["callbacks.caption_media.num_samples=0"], "callbacks.caption_media.num_samples=0: takes a"),
        (
            ["task=blip_shapes", "model.generation.num_beams=0"],
            "model.generation.num_beams=0: takes a whole",
        ),
        (["task=blip_shapes", "model.lora.rank=0"], "model.lora.rank=0: takes a whole"),
        (
            ["task=vit_gpt2_shapes", "model.max_caption_tokens=0"],
            "model.max_caption_tokens=0: takes a whole",
        ),
        (["data=caption_folder", "data.source.test_fraction=2"], "data.source.test_fraction=2: takes a number >= 0"),
        (["data=coco", "data.source.val_size=-1"], "data.source.val_size=-1: takes a whole number >= 0 (or null)"),
    ],
)
def test_a_bad_setting_is_one_line_before_anything_runs(overrides, line, tmp_path):
    """Every setting of the captioning family is typed in the signature that takes it (framework/schema.py)."""
    with pytest.raises(UserError) as error:
        check_config(compose_config(overrides, tmp_path, tmp_path / "data"))
    assert len(str(error.value).splitlines()) == 1 and str(error.value).startswith(line), str(error.value)


def test_pretrained_weights_missing_from_cache_say_how_to_get_them(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"ImageNet weights for resnet50 are not in the local torch cache"):
        run(fdr(["model.encoder.name=resnet50", "model.encoder.pretrained=true"], tmp_path, data_dir))


@pytest.mark.parametrize("mode", ["eval", "predict"])
def test_eval_and_predict_need_a_checkpoint(mode, tmp_path, data_dir):
    with pytest.raises(UserError, match=rf"mode={mode} needs ckpt_path="):
        run(fdr([f"mode={mode}"], tmp_path, data_dir))


def test_unknown_mode(tmp_path, data_dir):
    with pytest.raises(UserError, match="mode=fit: takes one of train, eval, predict"):
        run(fdr(["mode=fit"], tmp_path, data_dir))
