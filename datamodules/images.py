"""Plain folders of images: reading any image as RGB, and a Dataset over a folder (predict mode)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from framework.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB (grayscale, palette, CMYK, RGBA and 16-bit are converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: keep the high byte
                image = Image.fromarray((np.asarray(image, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(
            f"cannot read image {path}: {error}. Replace or remove the file, "
            "or set data.skip_bad_images=true to skip unreadable images."
        ) from error


def image_transform(image_size: int) -> transforms.Compose:
    """Square resize and ImageNet normalisation (no flips: they would swap 'left' and 'right' in captions)."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def list_images(folder: str | os.PathLike, key: str = "data.images") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist (set {key} to a folder of images)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} ({key})")
    return paths


class ImageFolderDataset(Dataset):
    """Every image under a folder, sorted by path; items are {"image", "path"} (None if unreadable and skipped)."""

    def __init__(self, folder: str | os.PathLike, transform, skip_bad_images: bool = False):
        self.paths = list_images(folder)
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | None:
        image = prepared_image(self.paths[index], self.transform, self.skip_bad_images)
        return None if image is None else {"image": image, "path": str(self.paths[index])}


def prepared_image(path: Path, transform, skip_bad_images: bool):
    """`transform` of the image at `path`; None for an unreadable image when skipping is on.

    A failure after decoding (in the transform, say) is re-raised naming the image: a data-loader worker's
    exception reaches the main process with this message, so a crash in a worker says which sample failed.
    """
    image = read_or_skip(path, skip_bad_images)
    if image is None:
        return None
    try:
        return transform(image)
    except Exception as error:
        raise RuntimeError(f"preparing image {path} failed: {type(error).__name__}: {error}") from error


def read_or_skip(path: Path, skip_bad_images: bool) -> Image.Image | None:
    """The decoded image, or None for an unreadable one when skipping is on."""
    try:
        return load_rgb(path)
    except UserError:
        if skip_bad_images:
            return None
        raise
