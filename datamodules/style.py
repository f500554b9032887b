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

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms.functional import to_tensor

from datamodules.images import collate, keep_readable, list_images, read_or_skip
from framework.config import positive, to_plain
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.images import IMAGE_ERRORS, bad_image, load_rgb
from framework.preparation import given

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
STYLE_INPUTS = ("content", "styles", "style_weights")  # what Gatys' module is built from
SIZE_RATIO_NOTICE = 2.0  # a style this many times larger or smaller than the content is resized with a notice


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
        style: str | list[str],
        style_weights: list[float] | None = None,
        image_size: int | None = 256,
        style_scale: float = 1.0,
        iterations: int = 300,
        skip_bad_images: bool = False,
    ):
        """`skip_bad_images`: leave unreadable style images (and their weights) out; the content cannot be skipped."""
        super().__init__()
        styles = to_plain(style)
        self.content, self.styles = content, [styles] if isinstance(styles, str) else list(styles or [])
        if not self.styles:
            raise UserError("data.style is empty: give a style image (or a list of them)")
        weights = to_plain(style_weights) or [1.0] * len(self.styles)
        if len(weights) != len(self.styles):
            raise UserError(f"data.style_weights has {len(weights)} weights for {len(self.styles)} style images")
        self.style_weights = [positive(w, f"data.style_weights[{i}]") for i, w in enumerate(weights)]
        self.image_size = image_size and positive(image_size, "data.image_size", integer=True)
        self.style_scale = positive(style_scale, "data.style_scale")
        self.iterations = positive(iterations, "data.iterations", integer=True)
        self.skip_bad_images = skip_bad_images

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """The content image and the style images that could be read, with their weights, as tensors in [0, 1]."""
        images = functools.cache(self.read_images)
        return given(self, names, **{name: lambda name=name: images()[name] for name in STYLE_INPUTS})

    def read_images(self) -> dict:
        content = read_image(self.content, "data.content", skippable=False)
        if self.image_size:
            content = longer_side(content, self.image_size)
        kept = keep_readable(
            range(len(self.styles)),
            lambda i: read_image(self.styles[i], f"data.style[{i}]"),
            self.skip_bad_images,
            "data.style",
            lambda i: self.styles[i],
        )
        styles = [self._style(read_image(self.styles[i], f"data.style[{i}]"), self.styles[i], content) for i in kept]
        return {
            "content": to_tensor(content),
            "styles": [to_tensor(s) for s in styles],
            "style_weights": [self.style_weights[i] for i in kept],
        }

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

    def __init__(self, sources: list[str], transform, key: str, root: str, skip_bad_images: bool = False):
        self.sources, self.transform, self.key, self.root = sources, transform, key, root
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict | None:
        source = self.sources[index]
        image = read_or_skip(source, self.skip_bad_images, lambda s: read_image(s, self.key))
        if image is None:
            return None
        return {"image": self.transform(image), "path": source, "name": self.output_name(source)}

    def output_name(self, source: str) -> str:
        """The stylised file's path relative to the output folder: the source's, as PNG."""
        if source.startswith(f"{SAMPLES}:"):
            return source.removeprefix(f"{SAMPLES}:") + ".png"
        return str(Path(source).relative_to(self.root).with_suffix(".png"))


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
    with images of the same size.
    """

    def __init__(
        self,
        folder: str,
        style: str,
        image_size: int = 256,
        style_size: int | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        images: str | None = None,
        max_size: int | None = None,
        predict_batch_size: int = 8,
        skip_bad_images: bool = False,
    ):
        super().__init__()
        self.folder, self.style, self.images = folder, style, images
        self.image_size = positive(image_size, "data.image_size", integer=True)
        self.style_size = positive(style_size or image_size, "data.style_size", integer=True)
        self.batch_size = positive(batch_size, "data.batch_size", integer=True)
        self.predict_batch_size = positive(predict_batch_size, "data.predict_batch_size", integer=True)
        self.max_size = max_size and positive(max_size, "data.max_size", integer=True)
        self.num_workers, self.skip_bad_images = num_workers, skip_bad_images

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        return given(self, names, style=self.style_image)

    def style_image(self) -> torch.Tensor:
        """The style image, its longer side data.style_size, in [0, 1]."""
        style = read_image(self.style, "data.style", skippable=False)
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
            self.predict_set = ContentImages(
                list_sources(self.images, "data.images"), resize, "data.images", self.images, self.skip_bad_images
            )

    def _predict_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return scaled_size(size, self.max_size) if self.max_size and max(size) > self.max_size else size

    def _shrink(self, image: Image.Image) -> Image.Image:
        size = self._predict_size(image.size)
        return image if size == image.size else image.resize(size, Image.LANCZOS)

    def _source_size(self, source: str) -> tuple[int, int] | None:
        """The size the image is stylised at; None for an unreadable image that is skipped (its item is None too)."""
        if source.startswith(f"{SAMPLES}:"):
            return self._predict_size(read_image(source, "data.images").size)
        try:
            with Image.open(source) as image:  # reads the header only
                return self._predict_size(image.size)
        except IMAGE_ERRORS as error:
            if self.skip_bad_images:
                return None
            raise bad_image(source, error, "data.images") from None

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
        sizes = [self._source_size(source) for source in self.predict_set.sources]
        return DataLoader(
            self.predict_set,
            batch_sampler=SameSizeBatches(sizes, self.predict_batch_size),
            num_workers=self.num_workers,
            collate_fn=collate,
        )
