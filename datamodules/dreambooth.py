"""Data for personalising a text-to-image model (DreamBooth, style LoRA).

Readers (`source`, a Hydra `_partial_`) give the training examples, each an image and its prompt:
- `read_instance_folder`: a folder of images of one subject, all with one instance prompt
  ("a photo of sks dog");
- `read_captioned_images`: per-image prompts, from a Hugging Face imagefolder's `metadata.jsonl`
  (`{"file_name": ..., "prompt": ...}` per line) or `metadata.csv` (file_name and prompt columns), or from a
  Hugging Face `datasets` folder written by `save_to_disk` (image and prompt columns).

Each training item holds an instance example and, with prior preservation, a class example (the
diffusers script's layout: instance halves first, class halves second, in one batch). Images are
resized (shorter side to `resolution`, with the `interpolation` filter), cropped (centre or random),
optionally flipped; the item keeps the SDXL micro-conditioning inputs: the original size, the crop's top-left
corner and the target size.
With `buckets`, images keep their aspect ratio instead: each is resized and cropped to its aspect-ratio bucket
and every batch comes from one bucket (datamodules/buckets.py).
With `cache_latents`, every image and its mirror image are encoded once by the model's VAE (see
`enable_latent_cache`) and items carry the latent distribution instead of pixels.
Validation, test and predict items are prompts with seeds.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from tqdm import tqdm

from datamodules.buckets import Buckets, BucketSampler, bucket_sizes, cover_size, nearest_bucket
from datamodules.images import IMAGE_ERRORS, IMAGE_SUFFIXES, bad_image, keep_readable, load_rgb
from datamodules.sampling import EpochSampler, fit_position, item_key
from framework.config import positive
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.files import atomic_write, writable_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileImage:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def load(self) -> Image.Image:
        return load_rgb(self.path)

    def size(self) -> tuple[int, int]:
        """(width, height) from the file header."""
        with Image.open(self.path) as image:
            return image.size


@dataclass(frozen=True)
class DatasetImage:
    """Row `index` of a `datasets` folder written by save_to_disk (opened once per process)."""

    folder: str
    index: int
    column: str

    @property
    def name(self) -> str:
        return f"{self.folder}#{self.index}"

    def load(self) -> Image.Image:
        try:  # the datasets library decodes the image when the row is read
            return _open_dataset(self.folder)[self.index][self.column].convert("RGB")
        except IMAGE_ERRORS as error:
            raise bad_image(self.name, error) from error

    def size(self) -> tuple[int, int]:
        return self.load().size


@dataclass(frozen=True)
class Example:
    image: FileImage | DatasetImage
    prompt: str


def read_instance_folder(folder: str | os.PathLike, prompt: str) -> list[Example]:
    """Every image in `folder` (not recursive), each with `prompt`; other files are skipped and listed once."""
    if not prompt or not prompt.strip():
        raise UserError("data.source.prompt is empty: give the instance prompt, e.g. 'a photo of sks dog'")
    return [Example(image, prompt) for image in _image_files(Path(folder), "data.source.folder")]


def read_captioned_images(
    folder: str | os.PathLike, prompt_column: str = "prompt", image_column: str = "image"
) -> list[Example]:
    """Images with their own prompts: a Hugging Face imagefolder (`folder/metadata.jsonl` or `metadata.csv`: the
    file_name and prompt columns), or a `datasets` folder written by save_to_disk (image + prompt columns)."""
    folder = Path(folder)
    for metadata in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if metadata.is_file():
            return _read_metadata(metadata, prompt_column)
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        dataset = _open_dataset(str(folder))
        missing = {image_column, prompt_column} - set(dataset.column_names)
        if missing:
            raise UserError(
                f"the dataset in {folder} has no column(s) {sorted(missing)} (columns: "
                f"{dataset.column_names}); set data.source.image_column / data.source.prompt_column"
            )
        return [
            Example(DatasetImage(str(folder), i, image_column), str(prompt))
            for i, prompt in enumerate(dataset[prompt_column])
        ]
    raise UserError(
        f"{folder} has neither metadata.jsonl / metadata.csv nor a Hugging Face dataset saved with save_to_disk "
        "(data.source.folder)"
    )


def _read_metadata(metadata: Path, prompt_column: str) -> list[Example]:
    """An imagefolder's images and prompts: metadata.jsonl (a JSON object per line) or metadata.csv (a header row)."""
    text = metadata.read_text(encoding="utf-8")
    if metadata.suffix == ".csv":
        rows = list(enumerate(csv.DictReader(io.StringIO(text)), 2))
    else:
        rows = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    examples = []
    for number, row in rows:
        try:
            row = json.loads(row) if isinstance(row, str) else row
            name, prompt = row["file_name"], row[prompt_column]
            if name is None or prompt is None:  # a short csv row
                raise KeyError("file_name" if name is None else prompt_column)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            what = "a row" if metadata.suffix == ".csv" else "a JSON object"
            raise UserError(
                f"{metadata}, line {number}: expected {what} with 'file_name' and "
                f"'{prompt_column}' (data.source.prompt_column) ({error})"
            ) from None
        path = metadata.parent / name
        if not path.is_file():
            raise UserError(f"{metadata}, line {number}: image {path} does not exist")
        examples.append(Example(FileImage(path), str(prompt)))
    if not examples:
        raise UserError(f"{metadata} lists no images")
    return examples


@functools.cache
def _open_dataset(folder: str):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{folder} is a Hugging Face dataset folder: reading it needs `pip install datasets` "
            "(or convert it to images + metadata.jsonl)"
        ) from None
    dataset = datasets.load_from_disk(folder)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise UserError(f"the dataset in {folder} has no 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    return dataset


def _image_files(folder: Path, key: str) -> list[FileImage]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist ({key})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [FileImage(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        log.warning("skipping %d non-image file(s) in %s: %s", len(others), folder, ", ".join(others))
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} ({key})")
    return images


def prompt_slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit] or "prompt"


def ensure_class_images(
    folder: Path,
    prompt: str,
    count: int,
    generate: Callable[[list[str], list[int]], list],
    batch_size: int,
    seed: int = 0,
) -> None:
    """Fill `folder` up to `count` images of `prompt` (prior preservation), `batch_size` at a time.

    Images already there are kept and reused; each new one is written atomically, so an interrupted
    run leaves only complete images and the next run generates the rest.
    """
    writable_dir(folder, "data.class_images")
    have = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    missing = count - have
    if missing <= 0:
        return
    log.info("generating %d class images of '%s' into %s", missing, prompt, folder)
    with tqdm(total=missing, desc="class images", unit="img") as progress:
        for start in range(have, count, batch_size):
            seeds = [seed + i for i in range(start, min(start + batch_size, count))]
            for index, image in zip(seeds, generate([prompt] * len(seeds), seeds)):
                atomic_write(folder / f"class_{index:05d}.png", lambda f, im=image: im.save(f, format="PNG"), "wb")
            progress.update(len(seeds))


def interpolation_mode(name: str) -> TF.InterpolationMode:
    """torchvision's resampling filter by name (diffusers' --image_interpolation_mode names: lanczos, nearest_exact)."""
    try:
        return TF.InterpolationMode[str(name).upper()]
    except KeyError:
        names = ", ".join(mode.name.lower() for mode in TF.InterpolationMode)
        raise UserError(f"data.interpolation={name} is not one of {names}") from None


def crop_and_flip(image: Image.Image, size: tuple[int, int], top_left: tuple[int, int], flip: bool) -> dict:
    """The `size` (height, width) crop, optionally mirrored, in [-1, 1] with the SDXL micro-conditioning inputs
    of the crop: its top-left corner and the target size.

    `image` is already resized to cover `size`. The crop corner of a mirrored image is
    mirrored too, so the conditioning describes the pixels the model sees.
    """
    height, width = size
    top, left = top_left
    pixels = TF.to_tensor(image.crop((left, top, left + width, top + height)))
    if flip:
        pixels = pixels.flip(-1)
        left = image.width - left - width
    return {"pixels": pixels * 2 - 1, "crop_top_left": torch.tensor([top, left]), "target_size": torch.tensor(size)}


class TrainingImages(Dataset):
    """Instance examples (repeated `repeats` times) paired with class examples (prior preservation).

    Without a latent cache an item decodes its images, with a random or centre crop and a random
    flip; with one (`latents`: per example, the latent distribution of the unflipped and the flipped
    crop) it draws only the flip. The flip is drawn first in both, from the item's seed (the sampler's): the same
    draws in a resumed run and in any loader worker.
    With `buckets` (data.buckets), an item's examples are resized and cropped to its aspect-ratio bucket
    (`Buckets`), not to a `resolution` square.
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
    ):
        self.instances, self.classes = instances * repeats, classes
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.latents, self.interpolation = latents, interpolation
        self.buckets = Buckets(resolution, self.instances, classes, len(self)) if buckets else None

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = item_key(key)  # the samplers' keys are (index, item seed) pairs
        rng = random.Random(random.getrandbits(64) if seed is None else seed)
        size, class_index = self.layout(index)
        item = {"instance": self.example(self.instances[index % len(self.instances)], size, rng)}
        if self.classes:
            item["class"] = self.example(self.classes[class_index], size, rng)
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
            return {**self.latents[example.image.name, size][flip], "prompt": example.prompt}
        image, original_size = self.resized(example, size)
        return {
            **crop_and_flip(image, size, self.crop_corner(image, size, rng), flip),
            "original_size": original_size,
            "prompt": example.prompt,
        }

    def resized(self, example: Example, size: tuple[int, int]) -> tuple[Image.Image, torch.Tensor]:
        """The image resized to cover `size` with its aspect ratio kept (for a square: shorter side = resolution)."""
        image = example.image.load()
        original_size = torch.tensor([image.height, image.width])
        cover = list(cover_size(image.height, image.width, size))
        return TF.resize(image, cover, interpolation=self.interpolation), original_size

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


def read_prompts(prompts: str | Sequence[str] | None, key: str) -> list[str]:
    """A list of prompts, or a text file with one prompt per line."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_file():
            raise UserError(f"{key}={prompts}: give a list of prompts or a text file with one prompt per line")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(p) for p in prompts]


class DreamBoothDataModule(L.LightningDataModule):
    """Training examples from `source`, optional class images for prior preservation, prompt sets for
    validation (`validation_prompts`), test (`test_prompts`, mode=eval) and predict (`prompts`)."""

    def __init__(
        self,
        source: Callable[[], list[Example]] | None = None,
        trigger_token: str | None = None,
        resolution: int = 1024,
        center_crop: bool = False,
        random_flip: bool = False,
        buckets: bool = False,
        interpolation: str = "bilinear",
        repeats: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        cache_latents: bool = False,
        prior_preservation: bool = False,
        class_prompt: str | None = None,
        class_images: str | None = None,
        num_class_images: int = 100,
        class_batch_size: int = 4,
        validation_prompts: Sequence[str] | str | None = None,
        test_prompts: Sequence[str] | str | None = None,
        prompts: Sequence[str] | str | None = None,
        seeds: Sequence[int] = (0,),
    ):
        super().__init__()
        if prior_preservation and not (class_prompt and class_images):
            raise UserError(
                "data.prior_preservation=true needs data.class_prompt (e.g. 'a photo of a dog') and "
                "data.class_images (a folder; missing images are generated there)"
            )
        self.source, self.trigger_token = source, trigger_token
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.buckets = buckets
        self.interpolation = interpolation_mode(interpolation)
        if buckets:
            bucket_sizes(resolution)  # a resolution that makes no buckets is an error now, not at fit start
        self.repeats, self.num_workers = repeats, num_workers
        self.batch_size = positive(batch_size, "data.batch_size", integer=True)
        self.skip_bad_images, self.cache_latents = skip_bad_images, cache_latents
        self.prior_preservation, self.class_prompt = prior_preservation, class_prompt
        self.class_images = Path(class_images) if class_images else None
        self.num_class_images = num_class_images
        self.class_batch_size = positive(class_batch_size, "data.class_batch_size", integer=True)
        self.prompt_sets = {
            "val": read_prompts(validation_prompts, "data.validation_prompts"),
            "test": read_prompts(test_prompts, "data.test_prompts"),
            "predict": read_prompts(prompts, "data.prompts"),
        }
        self.seeds = list(seeds)
        self._instances: list[Example] | None = None
        self._classes: list[Example] | None = None
        self._latents: dict | None = None

    @property
    def instances(self) -> list[Example]:
        """The training examples, read and checked once (every image decoded: an unreadable one stops the run
        here, or is left out with data.skip_bad_images=true, rather than in the middle of training)."""
        if self._instances is None:
            if self.source is None:
                raise UserError("data.source is not set: give a reader of training images (see conf/data/)")
            self._instances = self._readable(self.source(), "data.source")
            self._check(self._instances)
        return self._instances

    def _readable(self, examples: list[Example], what: str) -> list[Example]:
        return keep_readable(examples, lambda e: e.image.load(), self.skip_bad_images, what, lambda e: e.image.name)

    def _check(self, examples: list[Example]) -> None:
        sizes = bucket_sizes(self.resolution) if self.buckets else [(self.resolution, self.resolution)]
        small = []
        for example in examples:
            width, height = example.image.size()
            target_height, target_width = nearest_bucket(height, width, sizes)
            if height < target_height or width < target_width:
                small.append(example.image.name)
        if small:
            log.warning(
                "%d image(s) are smaller than data.resolution=%d (with data.buckets: their bucket) and will be "
                "upscaled: %s",
                len(small),
                self.resolution,
                ", ".join(small),
            )
        if self.trigger_token:
            untriggered = sorted({e.prompt for e in examples if self.trigger_token not in e.prompt})
            if untriggered:
                log.warning(
                    "%d prompt(s) lack the trigger token '%s' (data.trigger_token): %s",
                    len(untriggered),
                    self.trigger_token,
                    " | ".join(untriggered[:5]),
                )

    def class_examples(self) -> list[Example]:
        """The class images of prior preservation, read and checked once (after `prepare_class_images`)."""
        if not self.prior_preservation:
            return []
        if self._classes is None:
            images = _image_files(self.class_images, "data.class_images")[: self.num_class_images]
            self._classes = self._readable([Example(image, self.class_prompt) for image in images], "data.class_images")
        return self._classes

    def prepare_class_images(self, generate: Callable[[list[str], list[int]], list]) -> None:
        """Generate the class images prior preservation still lacks (`generate(prompts, seeds) -> PIL images`)."""
        if self.prior_preservation:
            self._classes = None  # read again once complete
            ensure_class_images(
                self.class_images, self.class_prompt, self.num_class_images, generate, self.class_batch_size
            )

    def train_prompts(self) -> set[str]:
        return {e.prompt for e in self.instances} | ({self.class_prompt} if self.prior_preservation else set())

    def reference_images(self) -> list[Image.Image]:
        """The real instance images, for subject fidelity (CLIP-I, DINO)."""
        return [e.image.load() for e in self.instances]

    def enable_latent_cache(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        """With data.cache_latents: encode every training image and its mirror image once with `encode`
        (pixels in [-1, 1] -> latent distribution parameters); training then reads them from memory.

        Each image's crop is fixed here (centre, or one random draw: as in the diffusers script; from the seed and the
        image, so a resumed run caches the same), per size it is
        shown at (with data.buckets, a class image can be shown in several buckets); a batch holds one size.
        """
        if not self.cache_latents or self._latents is not None:
            return
        dataset = self.training_images()
        chunks = []
        for _, group in itertools.groupby(sorted(dataset.views(), key=lambda view: view[1]), key=lambda view: view[1]):
            group = list(group)
            chunks += [group[start : start + batch_size] for start in range(0, len(group), batch_size)]
        latents = {}
        for chunk in tqdm(chunks, desc="caching latents", unit="batch"):
            views = []
            for example, size in chunk:
                image, original_size = dataset.resized(example, size)
                corner = dataset.crop_corner(image, size, random.Random(f"{torch.initial_seed()}:{example.image.name}"))
                views += [
                    {**crop_and_flip(image, size, corner, flip), "original_size": original_size}
                    for flip in (False, True)
                ]
            parameters = encode(torch.stack([view.pop("pixels") for view in views])).float().cpu()
            for i, (example, size) in enumerate(chunk):
                latents[example.image.name, size] = [
                    {**view, "latent_parameters": parameters[2 * i + flip]}
                    for flip, view in enumerate(views[2 * i : 2 * i + 2])
                ]
        self._latents = latents

    def training_images(self) -> TrainingImages:
        return TrainingImages(
            self.instances,
            self.class_examples(),
            self.resolution,
            self.center_crop,
            self.random_flip,
            self.repeats,
            self._latents,
            self.buckets,
            self.interpolation,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.training_images()
        batch_size = per_device_batch_size(self.batch_size, self.trainer)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._sampler(dataset, batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_training,
            drop_last=False,
            generator=torch.Generator(),  # worker seeding off the global RNG, which a resumed run restores
        )

    def _sampler(self, dataset: TrainingImages, batch_size: int) -> EpochSampler:
        """A shuffled order given by the seed and the epoch, sharded over the ranks and resumable mid-epoch (the global
        RNG, which a resumed run restores to where the interrupted one stopped, is not drawn from); with buckets,
        batches from one bucket each."""
        trainer = self.trainer
        placement = (
            () if trainer is None else (trainer.world_size, trainer.global_rank, fit_position(trainer, batch_size))
        )
        if dataset.buckets is None:
            return EpochSampler(len(dataset), torch.initial_seed(), *placement)
        return BucketSampler(dataset.buckets.item_sizes, batch_size, torch.initial_seed(), *placement)

    def _prompt_loader(self, stage: str) -> DataLoader:
        return DataLoader(
            PromptSet(self.prompt_sets[stage], self.seeds), batch_size=self.batch_size, collate_fn=collate_prompts
        )

    def val_dataloader(self) -> DataLoader:
        return self._prompt_loader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.prompt_sets["test"]:
            log.warning(
                "data.test_prompts is empty: no images to generate and score (set it to a list of prompts "
                "or a text file)"
            )
        return self._prompt_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if not self.prompt_sets["predict"]:
            raise UserError("mode=predict needs prompts: set data.prompts (a list or a text file, one per line)")
        return self._prompt_loader("predict")
