"""The frozen-encoder feature cache: hits, invalidation, fp16 values, races, training from it (1 and 2 processes)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.feature_cache import CachedCaptionDataset, FeatureCache
from datamodules.items import CaptionedImage
from framework.config import model_settings
from framework.images import image_transform, load_rgb
from framework.runner import run
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.nets import ImageEncoder
from tests.helpers.config import TINY_SHAPES, compose_config, read_metrics

CACHED_SHAPES = [*TINY_SHAPES, "model.encoder.finetune=none"]


@pytest.fixture
def paths(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    paths = [tmp_path / "images" / f"{i}.png" for i in range(5)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture
def encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(**{**model_settings("cnn_rnn", scheduler=None)["encoder"], "width": 4, "finetune": "none"})


def count_forwards(encoder: torch.nn.Module) -> list[int]:
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def cache(root: Path, paths: list[Path], encoder: torch.nn.Module, image_size: int = 32) -> FeatureCache:
    return FeatureCache(root, paths, image_transform(image_size), encoder)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_second_build_reuses_the_cache(tmp_path, paths, encoder):
    calls = count_forwards(encoder)
    first = cache(tmp_path / "cache", paths, encoder).build(batch_size=2)
    assert len(calls) == 3 and json.loads((first / "key.json").read_text())["images"][0][0] == str(paths[0])
    assert cache(tmp_path / "cache", paths, encoder).build(batch_size=2) == first
    assert len(calls) == 3 and entries(tmp_path / "cache") == [first.name]


def change_image_list(paths, encoder):
    return paths[:-1], 32


def touch_an_image(paths, encoder):
    mtime = paths[0].stat().st_mtime_ns + 10**9
    os.utime(paths[0], ns=(mtime, mtime))
    return paths, 32


def change_image_size(paths, encoder):
    return paths, 48


def change_weights(paths, encoder):
    with torch.no_grad():
        encoder.body[0][0].weight[0, 0, 0, 0] += 1
    return paths, 32


@pytest.mark.parametrize("change", [change_image_list, touch_an_image, change_image_size, change_weights])
def test_a_changed_key_is_a_new_cache(change, tmp_path, paths, encoder):
    first = cache(tmp_path / "cache", paths, encoder).build()
    calls = count_forwards(encoder)
    changed_paths, image_size = change(paths, encoder)
    second = cache(tmp_path / "cache", changed_paths, encoder, image_size).build()
    assert second != first and calls and entries(tmp_path / "cache") == sorted([first.name, second.name])


def test_cached_features_are_the_encoders_output_in_fp16(tmp_path, paths, encoder):
    encoder.train()
    directory = cache(tmp_path / "cache", paths, encoder).build(batch_size=2)
    assert encoder.training and not encoder.body.training  # left as it was (a frozen body stays in eval mode)
    features = np.load(directory / "features.npy", mmap_mode="r")
    assert features.dtype == np.float16 and features.shape == (5, 32, 4, 4)
    with torch.no_grad():
        expected = encoder(torch.stack([image_transform(32)(load_rgb(p)) for p in paths]))
    torch.testing.assert_close(torch.from_numpy(features.astype(np.float32)), expected, rtol=1e-3, atol=1e-3)
    assert entries(tmp_path / "cache") == [directory.name]  # no temporary directory left


def test_a_lost_race_uses_the_winners_cache(tmp_path, paths, encoder):
    winner = []

    def build_the_same_cache_meanwhile(*_):
        handle.remove()
        directory = cache(tmp_path / "cache", paths, encoder).build()
        winner.append((directory, (directory / "features.npy").stat().st_ino))

    handle = encoder.register_forward_hook(build_the_same_cache_meanwhile)
    directory = cache(tmp_path / "cache", paths, encoder).build(batch_size=2)
    assert winner == [(directory, (directory / "features.npy").stat().st_ino)]
    assert entries(tmp_path / "cache") == [directory.name]


def test_unreadable_images_are_skipped_items(tmp_path, paths, encoder):
    paths[1].write_bytes(b"not an image")
    directory = cache(tmp_path / "cache", paths, encoder).build(skip_bad_images=True)
    images = [CaptionedImage(i, path, ("a b",), (("a", "b"),)) for i, path in enumerate(paths)]
    dataset = CachedCaptionDataset(images, directory)
    assert dataset[1] is None and dataset[0]["features"].shape == (32, 4, 4) and dataset[0]["tokens"] == ["a", "b"]


def cache_dirs(root: Path) -> list[Path]:
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directory left
    return [p for p in root.iterdir() if (p / "features.npy").is_file()]


def test_training_runs_from_the_cache(tmp_path, data_dir, monkeypatch):
    served_features = []
    loss = CNNRNNCaptioner.loss
    monkeypatch.setattr(
        CNNRNNCaptioner,
        "loss",
        lambda self, batch: served_features.append(batch.features is not None) or loss(self, batch),
    )
    run(
        compose_config(
            [*CACHED_SHAPES, "trainer.fast_dev_run=true", f"data.feature_cache={tmp_path}/cache"],
            tmp_path / "run",
            data_dir,
        )
    )
    assert served_features and all(served_features)  # train, val and test batches
    assert np.isfinite(read_metrics(tmp_path / "run")["test/CIDEr"])
    assert len(cache_dirs(tmp_path / "cache")) == 3  # train, val, test


@pytest.mark.slow
def test_ddp_sim_training_builds_one_cache_per_split(tmp_path, workspace):
    result = workspace.run(
        [*CACHED_SHAPES, "trainer=ddp_sim", "trainer.fast_dev_run=true", f"data.feature_cache={tmp_path}/cache"]
    )
    assert "test/CIDEr" in read_metrics(result.run_dir)
    sizes = sorted(len(json.loads((d / "key.json").read_text())["images"]) for d in cache_dirs(tmp_path / "cache"))
    assert sizes == [16, 16, 48]
