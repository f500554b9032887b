"""Images for style transfer: a content image and style images (Gatys et al.), or a folder of content images
and one style image (Johnson et al.'s feed-forward networks).

Any image may be a file or `skimage:NAME`, one of scikit-image's sample photographs (shipped with it, so the
demos run offline); a folder may be `skimage` for all the sample photographs below.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms.functional import to_tensor

from datamodules.images import collate, keep_readable, list_images, read_or_skip
from framework import images
from framework.config import to_plain
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.images import load_rgb
from framework.preparation import given
from framework.schema import NonEmpty, NonNegativeInt, PositiveFloat, PositiveInt, Range

log = logging.getLogger(__name__)

SAMPLES = "skimage"
SAMPLE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "rocket",
)
STYLE_INPUTS = ("content", "styles", "style_weights", "style_names")  # what Gatys' module is built from
SIZE_RATIO_NOTICE = 2.0  # a style this many times larger or smaller than the content is resized with a notice
# The smallest style image, as read: a style is its texture as VGG sees it, and Gatys' deepest style layer (relu5_1)
# lies after four 2x2 poolings, each of its cells covering 16x16 px of the image. A smaller image holds less than one
# cell; enlarged to the content's size it is smooth colour, not a style (a 1x1 image: one colour).
MIN_STYLE_SIDE = 16
# The smallest side of an image to stylise (after data.max_size): lightning_modules/style/nets.py
# TransformerNet.min_size (its first 9x9 convolution pads 4 px by reflection, which needs more than 4 px), repeated
# here because a data module imports no model (tests/test_fast_style.py keeps the two equal).
SMALLEST_SIDE = 5


def read_image(source: str, key: str, skippable: bool = True) -> Image.Image:
    """An RGB image from a file or `skimage:NAME`; a UserError naming `key` when it is missing or unreadable
    (`skippable`: whether its message may offer data.skip_bad_images)."""
    source = str(source)
    if source.startswith(f"{SAMPLES}:"):
        import skimage.data

        name = source.removeprefix(f"{SAMPLES}:")
        if name not in SAMPLE_PHOTOS:
            raise UserError(
                f"{key}={source}: unknown sample; choose one of " + ", ".join(f"{SAMPLES}:{n}" for n in SAMPLE_PHOTOS)
            )
        pixels = np.asarray(getattr(skimage.data, name)())
        return Image.fromarray(np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3])
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: image {path} does not exist (a PNG/JPEG file, or {SAMPLES}:NAME for a sample photo)")
    return load_rgb(path, key, skippable)


def upright_size(source: str, key: str) -> tuple[int, int]:
    """(width, height) of an image as it is stylised (upright; a sample photo's as decoded)."""
    return read_image(source, key).size if source.startswith(f"{SAMPLES}:") else images.upright_size(source, key)


def checked_style(source: str, key: str, skippable: bool) -> Image.Image:
    """A style image, at least MIN_STYLE_SIDE px a side; a UserError naming `key` and the file otherwise."""
    style = read_image(source, key, skippable)
    if min(style.size) < MIN_STYLE_SIDE:
        fix = "or set data.skip_bad_images=true to leave it out of the blend" if skippable else "it cannot be skipped"
        raise UserError(
            f"{key}: style image {source} is {style.size[0]}x{style.size[1]} px: a style image needs at least "
            f"{MIN_STYLE_SIDE} px a side (VGG's deepest style layer sees 16x16 px as one cell; enlarged, a smaller "
            f"image is plain colour). Use a larger image ({fix})."
        )
    return style


def list_sources(folder: str, key: str) -> list[str]:
    """Every image under `folder` (sorted), or the sample photographs for `folder=skimage`."""
    if str(folder) == SAMPLES:
        return [f"{SAMPLES}:{name}" for name in SAMPLE_PHOTOS]
    return [str(path) for path in list_images(folder, key)]


def scaled_size(size: tuple[int, int], longer: int) -> tuple[int, int]:
    """(width, height) scaled, aspect kept, so that the longer side is `longer` pixels."""
    scale = longer / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def longer_side(image: Image.Image, size: int) -> Image.Image:
    return image.resize(scaled_size(image.size, size), Image.LANCZOS)


class StyleImagesDataModule(L.LightningDataModule):
    """One content image and one or more style images (blended with `style_weights`) for Gatys et al.

    The content is scaled so that its longer side is `image_size`; each style so that its longer side is
    `style_scale` times the content's. Training batches are step numbers only: one per optimizer step.
    """

    def __init__(
        self,
        content: str,
        style: str | Annotated[list[str], NonEmpty()],
        style_weights: list[PositiveFloat] | None,
        image_size: PositiveInt | None,
        style_scale: PositiveFloat,
        iterations: PositiveInt,
        skip_bad_images: bool,
    ):
        """`content`, each `style`: a file or `skimage:NAME`; `style_weights`: null for equal weights; `image_size`:
        null keeps the content's size; `skip_bad_images`: leave unreadable or too small style images (and their
        weights) out; the content cannot be skipped. Defaults: conf/data/style_images.yaml."""
        super().__init__()
        styles = to_plain(style)
        self.content, self.styles = content, [styles] if isinstance(styles, str) else list(styles)
        weights = to_plain(style_weights) or [1.0] * len(self.styles)
        if len(weights) != len(self.styles):
            raise UserError(f"data.style_weights has {len(weights)} weights for {len(self.styles)} style images")
        self.style_weights = list(weights)
        self.image_size, self.style_scale = image_size, style_scale
        self.iterations, self.skip_bad_images = iterations, skip_bad_images

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """The content image and the style images that could be read, with their weights and names (the config key
        and file of each, for the model's errors), as tensors in [0, 1]."""
        images = functools.cache(self.read_images)
        return given(self, names, **{name: lambda name=name: images()[name] for name in STYLE_INPUTS})

    def read_images(self) -> dict:
        content = read_image(self.content, "data.content", skippable=False)
        if self.image_size:
            content = longer_side(content, self.image_size)
        read = {}  # each style read once

        def style(i: int) -> Image.Image:
            if i not in read:
                read[i] = checked_style(self.styles[i], self.key(i), skippable=True)
            return read[i]

        kept = keep_readable(
            range(len(self.styles)), style, self.skip_bad_images, "data.style", lambda i: self.styles[i]
        )
        return {
            "content": to_tensor(content),
            "styles": [to_tensor(self._style(style(i), self.styles[i], content)) for i in kept],
            "style_weights": [self.style_weights[i] for i in kept],
            "style_names": [f"{self.key(i)} ({self.styles[i]})" for i in kept],
        }

    def key(self, index: int) -> str:
        return f"data.style[{index}]"

    def _style(self, style: Image.Image, path: str, content: Image.Image) -> Image.Image:
        size = round(self.style_scale * max(content.size))
        ratio = max(style.size) / size
        if not 1 / SIZE_RATIO_NOTICE <= ratio <= SIZE_RATIO_NOTICE:
            log.warning(
                "style image %s is %dx%d, the content %dx%d: resizing the style to a longer side of %d px "
                "(data.style_scale=%s times the content's; it sets the size of the style's brush strokes)",
                path,
                *style.size,
                *content.size,
                size,
                self.style_scale,
            )
        return longer_side(style, size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(self.iterations), batch_size=1)


class ContentImages(Dataset):
    """Images (files or samples) under `root` as {"image": [3, H, W] in [0, 1], "path", "name"}."""

    def __init__(self, sources: list[str], transform, key: str, root: str, skip_bad_images: bool):
        self.sources, self.transform, self.key, self.root = sources, transform, key, root
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict | None:
        source = self.sources[index]
        image = read_or_skip(source, self.skip_bad_images, lambda s: read_image(s, self.key))
        if image is None:
            return None
        return {"image": self.transform(image), "path": source, "name": self.output_name(source, self.root)}

    @staticmethod
    def output_name(source: str, root: str) -> str:
        """The stylised file's path relative to the output folder: the source's, as PNG."""
        if source.startswith(f"{SAMPLES}:"):
            return source.removeprefix(f"{SAMPLES}:") + ".png"
        return str(Path(source).relative_to(root).with_suffix(".png"))


class SameSizeBatches(Sampler[list[int]]):
    """Batches of indices of images of one size (a fully convolutional net takes any size), in first-seen order."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int):
        groups = defaultdict(list)
        for index, size in enumerate(sizes):
            groups[size].append(index)
        self.batches = [
            group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ContentFolderDataModule(L.LightningDataModule):
    """A folder of content images to train a fast style network on (random square crops of `image_size`),
    the style image (longer side `style_size`), and for mode=predict the folder `images` to stylise.

    Predicted images keep their size (scaled down to a longer side of `max_size` when set) and are batched
    with images of the same size. Every image to stylise is checked before the first is stylised (`setup`): an
    unreadable one, or one smaller than SMALLEST_SIDE px a side, is an error naming the file, or with
    `skip_bad_images` left out with a count. Defaults: conf/data/content_folder.yaml.
    """

    def __init__(
        self,
        folder: str,
        style: str,
        image_size: PositiveInt,
        style_size: PositiveInt | None,
        batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        images: str | None,
        max_size: Annotated[int, Range(min=SMALLEST_SIDE)] | None,
        predict_batch_size: PositiveInt,
        skip_bad_images: bool,
    ):
        """`folder`, `images`: a folder, or `skimage` for the sample photographs; `style`: a file or `skimage:NAME`;
        `style_size`: null for `image_size`; `images`: only mode=predict reads it; `max_size`: null keeps sizes."""
        super().__init__()
        self.folder, self.style, self.images = folder, style, images
        self.image_size, self.style_size = image_size, style_size or image_size
        self.batch_size, self.predict_batch_size, self.max_size = batch_size, predict_batch_size, max_size
        self.num_workers, self.skip_bad_images = num_workers, skip_bad_images

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        return given(self, names, style=self.style_image, crop_size=lambda: self.image_size)

    def style_image(self) -> torch.Tensor:
        """The style image, its longer side data.style_size, in [0, 1]."""
        style = checked_style(self.style, "data.style", skippable=False)
        return to_tensor(longer_side(style, self.style_size))

    def setup(self, stage: str) -> None:
        if stage == "fit":
            crop = transforms.Compose(
                [transforms.Resize(self.image_size), transforms.RandomCrop(self.image_size), transforms.ToTensor()]
            )
            self.train_set = ContentImages(
                list_sources(self.folder, "data.folder"), crop, "data.folder", self.folder, self.skip_bad_images
            )
        if stage == "predict":
            if not self.images:
                raise UserError("mode=predict needs data.images=path/to/folder (the images to stylise)")
            resize = transforms.Compose([transforms.Lambda(self._shrink), transforms.ToTensor()])
            sources, self.predict_sizes = self.stylisable(list_sources(self.images, "data.images"))
            self.predict_set = ContentImages(sources, resize, "data.images", self.images, self.skip_bad_images)

    def stylisable(self, sources: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """The images to stylise and the size each is stylised at, every image checked before any is stylised (its
        header, upright): an unreadable or too small image is one error naming it, or with data.skip_bad_images
        left out, in one warning per kind; no image left is an error. Two images whose results would have one name
        (a.jpg and a.png: stylized/a.png) are an error too."""
        sizes, skipped, first_error = {}, {"unreadable images": [], "images too small to stylise": []}, None
        for source in sources:
            try:
                upright = upright_size(source, "data.images")
            except UserError as failure:  # (the name goes at the end of the except block)
                kind, error = "unreadable images", failure
            else:
                size = self._predict_size(upright)
                if min(size) >= SMALLEST_SIDE:
                    sizes[source] = size
                    continue
                kind, error = "images too small to stylise", self.too_small(source, upright, size)
            if not self.skip_bad_images:
                raise error
            skipped[kind].append(source)
            first_error = first_error or error
        if not sizes:
            counts = ", ".join(f"{len(names)} {kind}" for kind, names in skipped.items() if names)
            raise UserError(
                f"data.images: none of the {len(sources)} images in {self.images} can be stylised ({counts}; the "
                f"first: {first_error})"
            )
        for kind, names in skipped.items():
            if names:
                log.warning(
                    "data.images: skipped %d %s (data.skip_bad_images=true): %s%s",
                    len(names),
                    kind,
                    ", ".join(names[:5]),
                    ", ..." if len(names) > 5 else "",
                )
        self.check_output_names(list(sizes))
        return list(sizes), list(sizes.values())

    def too_small(self, source: str, upright: tuple[int, int], size: tuple[int, int]) -> UserError:
        shrunk = f", {size[0]}x{size[1]} px at data.max_size={self.max_size}" if size != upright else ""
        return UserError(
            f"data.images: image {source} is {upright[0]}x{upright[1]} px{shrunk}: the fast style network takes "
            f"images of at least {SMALLEST_SIDE} px a side (its first 9x9 convolution pads 4 px by reflection, which "
            "needs more than 4 px). Remove or enlarge the file, or set data.skip_bad_images=true to skip the images "
            "it cannot stylise."
        )

    def check_output_names(self, sources: list[str]) -> None:
        """One error if two images would be written to one file under stylized/."""
        by_name = defaultdict(list)
        for source in sources:
            by_name[ContentImages.output_name(source, self.images)].append(source)
        clashes = {name: found for name, found in by_name.items() if len(found) > 1}
        if clashes:
            name, found = next(iter(clashes.items()))
            raise UserError(
                f"data.images: {' and '.join(found)} would both be stylised to stylized/{name}"
                f"{f' ({len(clashes) - 1} more such names)' if len(clashes) > 1 else ''}: rename one of them"
            )

    def _predict_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return scaled_size(size, self.max_size) if self.max_size and max(size) > self.max_size else size

    def _shrink(self, image: Image.Image) -> Image.Image:
        size = self._predict_size(image.size)
        return image if size == image.size else image.resize(size, Image.LANCZOS)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=per_device_batch_size(self.batch_size, self.trainer),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.predict_set,
            batch_sampler=SameSizeBatches(self.predict_sizes, self.predict_batch_size),
            num_workers=self.num_workers,
            collate_fn=collate,
        )
