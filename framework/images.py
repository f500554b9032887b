"""Images as both the data and the models see them: decoding a file (the one place images are read: EXIF orientation
applied, a stated pixel limit, every failure one error naming the file), pixels back to uint8 RGB (`to_rgb`, for
framework.files.write_png and the renderings), ImageNet normalisation, and the count of unreadable images a stage
skipped (`SkippedImages`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision import transforms

from framework.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow refuses images above its limit as possible decompression bombs (a few KB of file that decode to GBs). The
# limit here: 16384 x 16384 pixels (a 1 GB RGB image), far above any photo; larger images are an error naming the
# file, which data.skip_bad_images=true skips like any unreadable image.
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# What PIL raises for a missing, empty, truncated, foreign or oversized file (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
TURNED = (5, 6, 7, 8)  # EXIF orientations that show the stored image turned by 90 degrees


def bad_image(name: str, error: Exception, key: str | None = None, skippable: bool = True) -> UserError:
    """The message for an unreadable image: which file, why, and what to do (`key`: the config key that named it)."""
    where = f"{key}: " if key else ""
    fix = (
        "Replace or remove the file, or set data.skip_bad_images=true to skip unreadable images"
        if skippable
        else "Replace it with a readable PNG or JPEG file (the run needs this image: it cannot be skipped)"
    )
    return UserError(f"{where}cannot read image {name}: {error}. {fix}.")


@contextmanager
def opened(path: str | os.PathLike, key: str | None = None, skippable: bool = True) -> Iterator[Image.Image]:
    """PIL's `Image.open(path)`; whatever fails while it is open (a missing, truncated or foreign file, an image above
    the pixel limit) is a `bad_image` error naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above half the limit: refused too
            with Image.open(path) as image:
                yield image
    except (*IMAGE_ERRORS, Image.DecompressionBombWarning) as error:
        if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            error = ValueError(f"{error} (images are limited to {MAX_PIXELS} pixels)")
        raise bad_image(str(path), error, key, skippable) from None


def load_rgb(path: str | os.PathLike, key: str | None = None, skippable: bool = True) -> Image.Image:
    """Decode an image as 8-bit RGB, upright (a photo's EXIF orientation applied, as cameras and viewers show it;
    grayscale, palette, CMYK, RGBA and 16-bit are converted); a `bad_image` error naming the file if it cannot."""
    with opened(path, key, skippable) as image:
        return upright_8bit(image).convert("RGB")


def upright_8bit(image: Image.Image) -> Image.Image:
    """An opened image decoded, its EXIF orientation applied, 16-bit grayscale as 8-bit (the high byte)."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        image = Image.fromarray((np.asarray(image, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8))
    return image


def load_mask(path: str | os.PathLike, key: str | None = None) -> Image.Image:
    """Decode a mask as 8-bit grayscale ("L"), upright like `load_rgb` (colour files give their luminance)."""
    with opened(path, key, skippable=False) as image:
        return upright_8bit(image).convert("L")


def upright_size(path: str | os.PathLike, key: str | None = None, skippable: bool = True) -> tuple[int, int]:
    """(width, height) of an image as `load_rgb` gives it (its EXIF orientation applied), from the file's header where
    the format allows (a PNG's EXIF may follow its pixels: then it is decoded)."""
    with opened(path, key, skippable) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in TURNED else (width, height)


def to_rgb(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] (any float dtype) -> uint8 [H, W, 3]."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def image_transform(image_size: int) -> transforms.Compose:
    """Square resize and ImageNet normalisation (no flips: they would swap 'left' and 'right' in captions)."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SkippedImages:
    """Adds up, per stage, the unreadable images `collate` left out of the batches (data.skip_bad_images=true);
    a LightningModule reports each stage's count in one warning at the stage's end."""

    def __init__(self):
        self.counts = Counter()

    def has_images(self, batch: dict, stage: str) -> bool:
        """Count the batch's skipped images; False when nothing is left of the batch."""
        return self.count(stage, batch["skipped"], batch["size"])

    def count(self, stage: str, skipped: int, size: int) -> bool:
        """Count `skipped` images left out of a batch that kept `size`; False when it kept none."""
        self.counts[stage] += skipped
        return size > 0

    def report(self, stage: str) -> None:
        if self.counts[stage]:
            log.warning("%s: skipped %d unreadable images (data.skip_bad_images=true)", stage, self.counts.pop(stage))
