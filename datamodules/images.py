"""Folders of images and what every data module does with an unreadable one; a Dataset over a folder (predict
mode). Decoding a file is framework/images.py's `load_rgb`.

An unreadable image (missing, empty, truncated, not an image) is one UserError naming the file, unless
`data.skip_bad_images=true`: then it is left out and counted, in one warning per stage. Large data sets skip lazily:
an item is None (`read_or_skip`), `collate` drops it and counts it in the batch, and the LightningModule's
`SkippedImages` adds the counts up. Small sets read up front (DreamBooth, style images) skip with `keep_readable`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from framework.errors import UserError
from framework.images import load_rgb

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_paths(folder: Path) -> tuple[list[Path], list[Path]]:
    """The one listing rule for a folder of images: every file under it, subfolders included, sorted by path, split
    into images (by suffix, IMAGE_SUFFIXES) and the rest (other files, and links that lead nowhere). Hidden files and
    folders (names starting with '.', such as macOS' ._* copies or .ipynb_checkpoints) are not listed."""
    visible = (p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    files = sorted(p for p in visible if p.is_file() or (p.is_symlink() and not p.exists()))
    is_image = [p.suffix.lower() in IMAGE_SUFFIXES and p.exists() for p in files]
    return [p for p, image in zip(files, is_image) if image], [p for p, image in zip(files, is_image) if not image]


def list_images(folder: str | os.PathLike, key: str = "data.images") -> list[Path]:
    """The images of `folder` (`image_paths`); the other files and broken links are named in one warning; no image
    is a UserError."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist (set {key} to a folder of images)")
    paths, others = image_paths(folder)
    if others:
        names = [f"{p.relative_to(folder)}{'' if p.exists() else ' (a broken link)'}" for p in others]
        log.warning(
            "skipping %d file(s) that are not images in %s (%s): %s", len(names), folder, key, ", ".join(names[:10])
        )
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


def read_or_skip(source, skip_bad_images: bool, read: Callable[..., Image.Image] = load_rgb) -> Image.Image | None:
    """`read(source)`, the decoded image, or None for an unreadable one when skipping is on."""
    try:
        return read(source)
    except UserError:
        if skip_bad_images:
            return None
        raise


def collate(samples: list[dict | None]) -> dict:
    """Stack tensors ("image" -> "images", "features"), keep the rest as lists ("image_id" -> "image_ids", ...).

    `size` counts the samples in the batch, `skipped` the unreadable images left out of it.
    """
    kept = [s for s in samples if s is not None]
    batch = {"size": len(kept), "skipped": len(samples) - len(kept)}
    for key in kept[0] if kept else ():
        values = [s[key] for s in kept]
        name = {"image": "images", "image_id": "image_ids", "path": "paths", "style": "styles", "mask": "masks"}.get(
            key, key
        )
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def keep_readable(
    items: Sequence[T], read: Callable[[T], object], skip_bad_images: bool, what: str, name: Callable[[T], str] = str
) -> list[T]:
    """The `items` whose image `read(item)` decodes, for small sets read up front (`what` names the set).

    An unreadable image is read's UserError, or with `skip_bad_images` left out, all of them in one warning;
    a set with no readable image left is an error.
    """
    kept, skipped, first_error = [], [], None
    for item in items:
        try:
            read(item)
        except UserError as error:
            if not skip_bad_images:
                raise
            skipped.append(name(item))
            first_error = first_error or error
        else:
            kept.append(item)
    if skipped and not kept:
        raise UserError(f"{what}: none of the {len(skipped)} images can be read ({first_error})")
    if skipped:
        log.warning(
            "%s: skipped %d unreadable images (data.skip_bad_images=true): %s%s",
            what,
            len(skipped),
            ", ".join(skipped[:5]),
            ", ..." if len(skipped) > 5 else "",
        )
    return kept
