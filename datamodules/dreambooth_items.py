"""What DreamBooth batches hold: training items (an instance example and, with prior preservation, a class example,
each cropped, maybe flipped, with its SDXL micro-conditioning) and the prompt sets of validation, test and predict."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from datamodules.buckets import Buckets, cover_size
from datamodules.dreambooth_sources import Example
from datamodules.sampling import item_key
from framework.errors import UserError
from framework.schema import ExistingFile

# Resized training images kept in memory per process (`TrainingImages.resized`): at 1024 px about 4 MB each.
RESIZED_KEPT = 64


# torchvision's resampling filters (diffusers' --image_interpolation_mode names them so: lanczos, nearest_exact, ...)
Interpolation = Literal["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]


def interpolation_mode(name: Interpolation) -> TF.InterpolationMode:
    """torchvision's resampling filter by name."""
    return TF.InterpolationMode[name.upper()]


def crop_and_flip(
    image: Image.Image, size: tuple[int, int], top_left: tuple[int, int], flip: bool, mask: Image.Image | None = None
) -> dict:
    """The `size` (height, width) crop, optionally mirrored, in [-1, 1] with the SDXL micro-conditioning inputs
    of the crop: its top-left corner and the target size; with a `mask` (grayscale, the image's size), its same crop
    in [0, 1] ("mask", [1, height, width]).

    `image` is already resized to cover `size`. The crop corner of a mirrored image is
    mirrored too, so the conditioning describes the pixels the model sees.
    """
    height, width = size
    top, left = top_left
    box = (left, top, left + width, top + height)
    pixels = TF.to_tensor(image.crop(box))
    masks = {} if mask is None else {"mask": TF.to_tensor(mask.crop(box))}
    if flip:
        pixels = pixels.flip(-1)
        masks = {key: value.flip(-1) for key, value in masks.items()}
        left = image.width - left - width
    return {
        "pixels": pixels * 2 - 1,
        **masks,
        "crop_top_left": torch.tensor([top, left]),
        "target_size": torch.tensor(size),
    }


class TrainingImages(Dataset):
    """Instance examples (repeated `repeats` times) paired with class examples (prior preservation).

    Without a latent cache an item crops its images (decoded and resized once: `resized`), a random or centre
    crop, and draws a random flip; with one (`latents`: per example, the latent distribution of the unflipped and
    the flipped crop) it draws only the flip. The flip is drawn first in both, from the item's seed (the
    sampler's): the same draws in a resumed run and in any loader worker.
    With `buckets` (data.buckets), an item's examples are resized and cropped to its aspect-ratio bucket
    (`Buckets`), not to a `resolution` square. Examples with a loss mask (data.masks) have it resized, cropped and
    flipped with the image; where some do, the others (class examples) get an all-white one. With `caption_dropout`,
    an instance example's prompt is the empty prompt with that probability, drawn last from the item's seed.
    """

    def __init__(
        self,
        instances: list[Example],
        classes: list[Example],
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        repeats: int = 1,
        latents: dict | None = None,
        buckets: bool = False,
        interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR,
        caption_dropout: float = 0.0,
    ):
        self.instances, self.classes = instances * repeats, classes
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.latents, self.interpolation, self.caption_dropout = latents, interpolation, caption_dropout
        self.masked = any(example.mask is not None for example in instances)
        self.buckets = Buckets(resolution, self.instances, classes, len(self)) if buckets else None
        self._resized: OrderedDict[tuple, tuple] = OrderedDict()  # see `resized`

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = item_key(key)  # the samplers' keys are (index, item seed) pairs
        rng = random.Random(random.getrandbits(64) if seed is None else seed)
        size, class_index = self.layout(index)
        item = {"instance": self.example(self.instances[index % len(self.instances)], size, rng)}
        if self.classes:
            item["class"] = self.example(self.classes[class_index], size, rng)
        if self.caption_dropout and rng.random() < self.caption_dropout:
            item["instance"]["prompt"] = ""
        return item

    def layout(self, index: int) -> tuple[tuple[int, int], int | None]:
        """The (height, width) of item `index`'s examples and the index of its class example (None: no classes)."""
        if self.buckets is not None:
            return self.buckets.item(index)
        return (self.resolution, self.resolution), index % len(self.classes) if self.classes else None

    def views(self) -> list[tuple[Example, tuple[int, int]]]:
        """Every (example, size) that items show, once: what the latent cache encodes."""
        views = {}
        for index in range(len(self)):
            size, class_index = self.layout(index)
            shown = [self.instances[index % len(self.instances)]] + (
                [self.classes[class_index]] if self.classes else []
            )
            views.update({(example.image.name, size): (example, size) for example in shown})
        return list(views.values())

    def example(self, example: Example, size: tuple[int, int], rng: random.Random) -> dict:
        flip = self.random_flip and rng.random() < 0.5
        if self.latents is not None:
            view = dict(self.latents[example.image.name, size][flip])
        else:
            view = self.crops(example, size, rng, (flip,))[0]
        if self.masked and "mask" not in view:
            view["mask"] = torch.ones(1, *size)
        return {**view, "prompt": example.prompt}

    def crops(self, example: Example, size: tuple[int, int], rng: random.Random, flips: tuple[bool, ...]) -> list[dict]:
        """The example's `size` crop (its corner drawn from `rng`), once per flip in `flips`, each with its
        micro-conditioning and mask (crop_and_flip)."""
        image, mask, original_size = self.resized(example, size)
        corner = self.crop_corner(image, size, rng)
        return [{**crop_and_flip(image, size, corner, flip, mask), "original_size": original_size} for flip in flips]

    def resized(self, example: Example, size: tuple[int, int]) -> tuple[Image.Image, Image.Image | None, torch.Tensor]:
        """The image (and its mask, or None) resized to cover `size` with the aspect ratio kept (for a square: shorter
        side = resolution), and the image's original (height, width).

        The last RESIZED_KEPT resized images stay in memory (in each process), so that a DreamBooth folder's few
        images are decoded and resized once rather than every step, as the diffusers script reads them; the crop and
        flip are still drawn every step."""
        key = (example.image.name, size)
        if key in self._resized:
            self._resized.move_to_end(key)
            return self._resized[key]
        image = example.image.load()
        cover = list(cover_size(image.height, image.width, size))
        mask = None if example.mask is None else TF.resize(example.mask.load(), cover, interpolation=self.interpolation)
        resized = TF.resize(image, cover, interpolation=self.interpolation)
        self._resized[key] = resized, mask, torch.tensor([image.height, image.width])
        if len(self._resized) > RESIZED_KEPT:
            self._resized.popitem(last=False)  # the least recently used
        return self._resized[key]

    def crop_corner(self, image: Image.Image, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
        spare_h, spare_w = image.height - size[0], image.width - size[1]
        if self.center_crop:
            return round(spare_h / 2), round(spare_w / 2)
        return rng.randint(0, spare_h), rng.randint(0, spare_w)


def collate_training(items: list[dict]) -> dict:
    """Instance examples first, then class examples; `num_instance` tells the loss where they split."""
    examples = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "prompt"}
    return {**batch, "prompts": [e["prompt"] for e in examples], "num_instance": len(items)}


class PromptSet(Dataset):
    """Every prompt with every seed: items {"prompt", "seed", "index"} (predict names its files by index)."""

    def __init__(self, prompts: Sequence[str], seeds: Sequence[int]):
        self.items = [(prompt, seed) for prompt in prompts for seed in seeds]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        prompt, seed = self.items[index]
        return {"prompt": prompt, "seed": seed, "index": index}


def collate_prompts(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in items[0]}


# A list of prompts, or a text file with one prompt per line; null: none.
Prompts = list[str] | ExistingFile | None


def read_prompts(prompts: str | Sequence[str] | None, key: str) -> list[str]:
    """The prompts of a list, or of a text file with one prompt per line (blank lines skipped): a file that cannot be
    read or holds no prompt is an error naming `key` and the file."""
    if prompts is None:
        return []
    if not isinstance(prompts, str):
        return list(prompts)
    try:
        text = Path(prompts).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"{key}={prompts}: cannot read the prompts file ({error}): give a list of prompts or a UTF-8 text file "
            "with one prompt per line"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{key}={prompts}: the prompts file holds no prompt: write one prompt per line")
    return lines
