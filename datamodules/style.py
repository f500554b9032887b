"""Images for style transfer: a content image and style images (Gatys et al.), a folder of content images and one
style image (Johnson et al.'s feed-forward networks), or folders of content and style images (AdaIN: any style).
Masks (data.masks): a grayscale image per content image, of its size, with its name (any image suffix), saying where
the style goes: white for the (first) style, black for the second style, or with one style for the content as it is.

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

from datamodules.images import IMAGE_SUFFIXES, collate, keep_readable, list_images, read_or_skip
from framework import images
from framework.config import to_plain
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.images import load_mask, load_rgb, opened
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
STYLE_INPUTS = ("content", "styles", "style_weights", "style_names", "regions")  # what Gatys' module is built from
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # PIL modes of grayscale files
SIZE_RATIO_NOTICE = 2.0  # a style this many times larger or smaller than the content is resized with a notice
# The smallest style image, as read: a style is its texture as VGG sees it, and Gatys' deepest style layer (relu5_1)
# lies after four 2x2 poolings, each of its cells covering 16x16 px of the image. A smaller image holds less than one
# cell; enlarged to the content's size it is smooth colour, not a style (a 1x1 image: one colour).
MIN_STYLE_SIDE = 16
# The smallest side of an image to stylise (after data.max_size): lightning_modules/style/nets.py
# TransformerNet.min_size (its first 9x9 convolution pads 4 px by reflection, which needs more than 4 px), repeated
# here because a data module imports no model (tests/test_fast_style.py keeps the two equal).
SMALLEST_SIDE = 5
# The smallest side of an image AdaIN stylises or trains on: lightning_modules/style/adain.py's VGG encoder reaches
# relu4_1 after three 2x2 poolings (8 px leave one). Repeated here: a data module imports no model.
ADAIN_SMALLEST_SIDE = 8


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
    """A colour style image, at least MIN_STYLE_SIDE px a side; a UserError naming `key` and the file otherwise."""
    style = read_image(source, key, skippable)
    fix = "or set data.skip_bad_images=true to leave it out" if skippable else "it cannot be skipped"
    if min(style.size) < MIN_STYLE_SIDE:
        raise UserError(
            f"{key}: style image {source} is {style.size[0]}x{style.size[1]} px: a style image needs at least "
            f"{MIN_STYLE_SIDE} px a side (VGG's deepest style layer sees 16x16 px as one cell; enlarged, a smaller "
            f"image is plain colour). Use a larger image ({fix})."
        )
    if not source.startswith(f"{SAMPLES}:"):
        with opened(source, key, skippable) as file:
            mode = file.mode
        if mode in GRAY_MODES:
            raise UserError(
                f"{key}: style image {source} is grayscale (mode {mode}): a style's colours are part of what is "
                f"transferred, and a grey style makes a grey result. Use a colour image, or save this one as RGB to "
                f"transfer a grey style on purpose ({fix})."
            )
    return style


def mask_path(folder: str, name: str) -> Path:
    """The mask of the image whose output name is `name` (its path under its folder, or a sample's name): the file in
    `folder` with that name and an image suffix; a UserError naming data.masks when there is none, or several."""
    stem = Path(folder).expanduser() / Path(name).with_suffix("")
    found = sorted(p for p in stem.parent.glob(f"{stem.name}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) != 1:
        problem = "no mask" if not found else f"{len(found)} masks ({', '.join(p.name for p in found)})"
        raise UserError(
            f"data.masks: {problem} for image {name} in {folder}: give one grayscale image named like it "
            f"({stem.name}.png), of its size, white where the (first) style goes"
        )
    return found[0]


def read_mask(folder: str, name: str, size: tuple[int, int]) -> Image.Image:
    """The mask (`mask_path`) of an image of `size` (width, height, upright), checked to have that size."""
    path = mask_path(folder, name)
    mask = load_mask(path, "data.masks")
    if mask.size != size:
        raise UserError(
            f"data.masks: mask {path} is {mask.size[0]}x{mask.size[1]} px, its image {name} {size[0]}x{size[1]} px: "
            "a mask must have its image's size"
        )
    return mask


def check_mask_styles(styles: int, key: str) -> None:
    """A mask places one style (white; black keeps the content) or two: more is one error naming `key`."""
    if styles > 2:
        raise UserError(
            f"data.masks: a mask places one style (white; black keeps the content) or two (white: {key}[0], black: "
            f"{key}[1]); {key} has {styles}"
        )


def regions(mask: torch.Tensor, styles: int, key: str) -> list[torch.Tensor]:
    """Where each style goes, from a mask [1, H, W] in [0, 1]: one style, the white part (the rest keeps the content);
    two styles, white and black (`check_mask_styles`)."""
    check_mask_styles(styles, key)
    return [mask, 1 - mask][:styles]


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
    `style_scale` times the content's; the content's mask in `masks` (a folder) with it. Training batches are step
    numbers only: one per optimizer step; validation scores the result once, at the end.
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
        masks: str | None,
    ):
        """`content`, each `style`: a file or `skimage:NAME`; `style_weights`: null for equal weights; `image_size`:
        null keeps the content's size; `skip_bad_images`: leave unreadable or too small style images (and their
        weights) out; the content cannot be skipped; `masks`: null, or a folder with the content's mask.
        Defaults: conf/data/style_images.yaml."""
        super().__init__()
        styles = to_plain(style)
        self.content, self.styles = content, [styles] if isinstance(styles, str) else list(styles)
        weights = to_plain(style_weights)
        if weights is not None and masks:
            raise UserError(
                "data.style_weights: with data.masks each style fills its own region and nothing is blended: remove "
                "data.style_weights"
            )
        weights = weights or [1.0] * len(self.styles)
        if len(weights) != len(self.styles):
            raise UserError(f"data.style_weights has {len(weights)} weights for {len(self.styles)} style images")
        self.style_weights = list(weights)
        self.image_size, self.style_scale, self.masks = image_size, style_scale, masks
        self.iterations, self.skip_bad_images = iterations, skip_bad_images

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """The content image and the style images that could be read, with their weights and names (the config key
        and file of each, for the model's errors), as tensors in [0, 1]."""
        images = functools.cache(self.read_images)
        return given(self, names, **{name: lambda name=name: images()[name] for name in STYLE_INPUTS})

    def read_images(self) -> dict:
        content = read_image(self.content, "data.content", skippable=False)
        mask = (
            read_mask(self.masks, ContentImages.output_name(self.content, None), content.size) if self.masks else None
        )
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
            "regions": regions(to_tensor(mask.resize(content.size, Image.BILINEAR)), len(kept), "data.style")
            if mask
            else None,
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

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(1), batch_size=1)  # one batch: the model scores its result


def held_out(sources: list[str], count: int, key: str, count_key: str) -> tuple[list[str], list[str]]:
    """(to train on, held out): the last `count` of `sources` held out; a UserError when none would be left to train."""
    if len(sources) <= count:
        raise UserError(
            f"{key} has {len(sources)} images and {count_key}={count} of them are held out for validation: none is "
            f"left to train on; add images or lower {count_key}"
        )
    return sources[:-count], sources[-count:]


def crops(size: int, random: bool = False) -> transforms.Compose:
    """The shorter side resized to `size`, then a square crop of it: random (training) or the centre (validation)."""
    crop = transforms.RandomCrop(size) if random else transforms.CenterCrop(size)
    return transforms.Compose([transforms.Resize(size), crop, transforms.ToTensor()])


class ContentImages(Dataset):
    """Images (files or samples) under `root` as {"image": [3, H, W] in [0, 1], "path", "name"}, and with `masks` (a
    folder) "mask": [1, H, W] in [0, 1], the image's mask (`read_mask`) at its size."""

    def __init__(
        self, sources: list[str], transform, key: str, root: str, skip_bad_images: bool, masks: str | None = None
    ):
        self.sources, self.transform, self.key, self.root = sources, transform, key, root
        self.skip_bad_images, self.masks = skip_bad_images, masks

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict | None:
        source = self.sources[index]
        image = read_or_skip(source, self.skip_bad_images, lambda s: read_image(s, self.key))
        if image is None:
            return None
        item = {"image": self.transform(image), "path": source, "name": self.output_name(source, self.root)}
        if self.masks:
            mask = read_mask(self.masks, item["name"], image.size).resize(item["image"].shape[:0:-1], Image.BILINEAR)
            item["mask"] = to_tensor(mask)
        return item

    @staticmethod
    def output_name(source: str, root: str | None) -> str:
        """The stylised file's path relative to the output folder: the source's (under `root`; None: its file name),
        as PNG."""
        if source.startswith(f"{SAMPLES}:"):
            return source.removeprefix(f"{SAMPLES}:") + ".png"
        path = Path(source)
        return str((path.relative_to(root) if root else Path(path.name)).with_suffix(".png"))


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


class FolderStyleDataModule(L.LightningDataModule):
    """What the feed-forward style tasks' data modules share: training and validation sets (`train_set`, `val_set`,
    batches of `batch_size`), and for mode=predict the folder `images` to stylise.

    Predicted images keep their size (scaled down to a longer side of `max_size` when set) and are batched with
    images of the same size. Every image to stylise is checked before the first is stylised (`setup`): an unreadable
    one, or one smaller than the network's `smallest_side` px a side, is an error naming the file, or with
    `skip_bad_images` left out with a count.
    """

    smallest_side = SMALLEST_SIDE
    masks = None  # the folder of the predict images' masks, where the task takes masks (data.masks)
    # why the network needs that size, for the error
    too_small_because = (
        "the fast style network takes images of at least {side} px a side (its first 9x9 convolution pads 4 px by "
        "reflection, which needs more than 4 px)"
    )

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if not self.images:
                raise UserError("mode=predict needs data.images=path/to/folder (the images to stylise)")
            resize = transforms.Compose([transforms.Lambda(self._shrink), transforms.ToTensor()])
            sources, self.predict_sizes = self.stylisable(list_sources(self.images, "data.images"))
            for source in sources if self.masks else ():  # every mask checked before any image is stylised
                read_mask(
                    self.masks, ContentImages.output_name(source, self.images), upright_size(source, "data.images")
                )
            self.predict_set = ContentImages(
                sources, resize, "data.images", self.images, self.skip_bad_images, self.masks
            )

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
                if min(size) >= self.smallest_side:
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
            f"data.images: image {source} is {upright[0]}x{upright[1]} px{shrunk}: "
            f"{self.too_small_because.format(side=self.smallest_side)}. Remove or enlarge the file, or set "
            "data.skip_bad_images=true to skip the images it cannot stylise."
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

    def predict_collate(self, samples: list[dict | None]) -> dict:
        return collate(samples)

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

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=per_device_batch_size(self.batch_size, self.trainer),
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.predict_set,
            batch_sampler=SameSizeBatches(self.predict_sizes, self.predict_batch_size),
            num_workers=self.num_workers,
            collate_fn=self.predict_collate,
        )


class ContentFolderDataModule(FolderStyleDataModule):
    """A folder of content images to train a fast style network on (random square crops of `image_size`; the last
    `num_val` in path order held out, their centre crops scored by validation), the style image (longer side
    `style_size`), and for mode=predict the folder `images` to stylise (FolderStyleDataModule). Defaults:
    conf/data/content_folder.yaml.
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
        num_val: PositiveInt,
    ):
        """`folder`, `images`: a folder, or `skimage` for the sample photographs; `style`: a file or `skimage:NAME`;
        `style_size`: null for `image_size`; `images`: only mode=predict reads it; `max_size`: null keeps sizes."""
        super().__init__()
        self.folder, self.style, self.images, self.num_val = folder, style, images, num_val
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
        super().setup(stage)
        if stage in ("fit", "validate"):
            train, val = held_out(list_sources(self.folder, "data.folder"), self.num_val, "data.folder", "data.num_val")
            self.train_set = ContentImages(
                train, crops(self.image_size, random=True), "data.folder", self.folder, self.skip_bad_images
            )
            self.val_set = ContentImages(val, crops(self.image_size), "data.folder", self.folder, self.skip_bad_images)


class ContentStylePairs(Dataset):
    """Content and style images as {"image", "style"} crops (`transform`): each content with a style drawn at random
    (training: the draw follows the seeded RNG of the process or data-loader worker), or every (content, style) pair
    in order (`every_pair`: validation). An unreadable image (or a style that `checked_style` refuses) is None with
    `skip_bad_images`, else one error naming it."""

    def __init__(self, contents: list[str], styles: list[str], transform, skip_bad_images: bool, every_pair: bool):
        self.contents, self.styles, self.transform = contents, styles, transform
        self.skip_bad_images, self.every_pair = skip_bad_images, every_pair

    def __len__(self) -> int:
        return len(self.contents) * (len(self.styles) if self.every_pair else 1)

    def __getitem__(self, index: int) -> dict | None:
        if self.every_pair:
            content, style = divmod(index, len(self.styles))
        else:
            content, style = index, int(torch.randint(len(self.styles), ()))
        images = {
            "image": read_or_skip(self.contents[content], self.skip_bad_images, lambda s: read_image(s, "data.folder")),
            "style": read_or_skip(
                self.styles[style], self.skip_bad_images, lambda s: checked_style(s, "data.style_folder", True)
            ),
        }
        if any(image is None for image in images.values()):
            return None
        return {name: self.transform(image) for name, image in images.items()}


class AdaINDataModule(FolderStyleDataModule):
    """Folders of content images (`folder`) and style images (`style_folder`) to train an AdaIN decoder on: random
    square crops of `image_size` of each, every content with a style drawn at random. The last `num_val` contents and
    the last `num_val_styles` styles (path order) are held out: validation scores each held-out content with each
    held-out style, styles the decoder never saw.

    mode=predict stylises the folder `images` (FolderStyleDataModule) with `styles` (one or several files or
    `skimage:NAME`, their longer side `style_size`; the model blends them), with `masks` (a folder: each image's mask)
    when set. Defaults: conf/data/adain_images.yaml.
    """

    smallest_side = ADAIN_SMALLEST_SIDE
    too_small_because = "the VGG encoder takes images of at least {side} px a side (three 2x2 poolings to relu4_1)"

    def __init__(
        self,
        folder: str,
        style_folder: str,
        image_size: Annotated[int, Range(min=ADAIN_SMALLEST_SIDE)],
        batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        num_val: PositiveInt,
        num_val_styles: PositiveInt,
        skip_bad_images: bool,
        images: str | None,
        styles: str | Annotated[list[str], NonEmpty()] | None,
        masks: str | None,
        style_size: PositiveInt | None,
        max_size: Annotated[int, Range(min=ADAIN_SMALLEST_SIDE)] | None,
        predict_batch_size: PositiveInt,
    ):
        """`folder`, `style_folder`, `images`: a folder, or `skimage` for the sample photographs; `styles`: only
        mode=predict reads it (and `masks`, `style_size`: null keeps the styles' sizes, `max_size`: null keeps the
        images' sizes)."""
        super().__init__()
        styles = to_plain(styles)
        self.folder, self.style_folder, self.image_size = folder, style_folder, image_size
        self.batch_size, self.num_workers, self.skip_bad_images = batch_size, num_workers, skip_bad_images
        self.num_val, self.num_val_styles = num_val, num_val_styles
        self.images, self.masks, self.style_size, self.max_size = images, masks, style_size, max_size
        self.styles = [styles] if isinstance(styles, str) else styles
        self.predict_batch_size = predict_batch_size

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if not self.styles:
                raise UserError("mode=predict needs data.styles=style.jpg (or a list: data.styles=[a.jpg,b.jpg])")
            if self.masks:
                check_mask_styles(len(self.styles), "data.styles")
            self.style_images = [
                to_tensor(self._style(checked_style(source, f"data.styles[{i}]", skippable=False)))
                for i, source in enumerate(self.styles)
            ]
        super().setup(stage)
        if stage in ("fit", "validate"):
            contents = held_out(list_sources(self.folder, "data.folder"), self.num_val, "data.folder", "data.num_val")
            styles = held_out(
                list_sources(self.style_folder, "data.style_folder"),
                self.num_val_styles,
                "data.style_folder",
                "data.num_val_styles",
            )
            random_crops, centre_crops = crops(self.image_size, random=True), crops(self.image_size)
            self.train_set = ContentStylePairs(contents[0], styles[0], random_crops, self.skip_bad_images, False)
            self.val_set = ContentStylePairs(contents[1], styles[1], centre_crops, self.skip_bad_images, True)

    def _style(self, style: Image.Image) -> Image.Image:
        return longer_side(style, self.style_size) if self.style_size else style

    def predict_collate(self, samples: list[dict | None]) -> dict:
        return collate(samples) | {"style_images": self.style_images}
