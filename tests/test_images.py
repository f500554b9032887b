"""Images as photos are (framework/images.py, datamodules/images.py): upright per their EXIF orientation, an image
above the pixel limit a named and skippable error, broken links counted with the other skipped files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.explain import ImageFolderDataModule
from datamodules.images import list_images, read_or_skip
from framework.errors import UserError
from framework.images import load_rgb
from framework.runner import instantiate
from tests.helpers.captioning import caption_data
from tests.helpers.config import compose_config

ORIENTATION = 0x0112


def exif_photo(path, orientation: int = 6):
    """A 40x20 JPEG, red left half and blue right half, that a camera held upright tags with EXIF Orientation=6
    (rotate 90 degrees clockwise to show): upright it is 20x40, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_a_photo_loads_upright_per_its_exif_orientation(tmp_path):
    image = np.asarray(load_rgb(exif_photo(tmp_path / "phone.jpg")))
    assert image.shape == (40, 20, 3)  # height, width: turned
    top, bottom = image[:20].reshape(-1, 3).mean(0), image[20:].reshape(-1, 3).mean(0)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top, blue below


def test_an_image_above_the_pixel_limit_is_named_and_skippable(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the limit, scaled down for the test
    with pytest.raises(UserError, match=r"cannot read image .*huge\.png: .*pixels.*skip_bad_images=true"):
        load_rgb(tmp_path / "huge.png")
    assert read_or_skip(tmp_path / "huge.png", skip_bad_images=True) is None


def test_broken_links_are_counted_with_the_files_left_out(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "notes.txt").write_text("")
    with caplog.at_level(logging.WARNING):
        assert list_images(tmp_path) == [tmp_path / "a.png"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping 2 file(s)" in warning and "gone.jpg (a broken link)" in warning and "notes.txt" in warning


def upright_in(images: torch.Tensor) -> bool:
    """Whether the first image of a (normalised) batch shows exif_photo upright: red above, blue below."""
    image = images[0].float()
    top, bottom = image[:, : image.shape[1] // 2].mean((1, 2)), image[:, image.shape[1] // 2 :].mean((1, 2))
    return bool(top[0] > top[2] and bottom[2] > bottom[0])


def test_every_captioning_and_explaining_data_module_serves_photos_upright(tmp_path):
    """The data modules that read users' photos through datamodules/images.py (DreamBooth, fast style and style
    transfer have theirs in test_dreambooth_data.py, test_fast_style.py and test_style_transfer.py)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    exif_photo(folder / "phone.jpg")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "phone.jpg", "text": "a photo", "split": "train"}))
    small = {"image_size": 16, "batch_size": 1, "num_workers": 0}
    predict_captions = caption_data(images=str(folder), **small).predict_dataloader()
    training_captions = instantiate(
        compose_config(
            ["data=caption_folder", f"data.source.folder={folder}", "data.image_size=16"], tmp_path, tmp_path
        ).data
    )
    training_captions.prepare_data()
    training_captions.setup("fit")
    explained = ImageFolderDataModule(str(folder), skip_bad_images=False, **small).predict_dataloader()
    assert upright_in(next(iter(predict_captions)).images)
    assert upright_in(next(iter(training_captions.train_dataloader())).images)
    assert upright_in(next(iter(explained))["images"])
