"""Readers of DreamBooth training examples (data.source, a Hydra `_partial_`), each example an image and its prompt:
- `read_instance_folder`: a folder of images of one subject, all with one instance prompt ("a photo of sks dog");
- `read_captioned_images`: per-image prompts, from a Hugging Face imagefolder's `metadata.jsonl`
  (`{"file_name": ..., "prompt": ...}` per line) or `metadata.csv` (file_name and prompt columns), or from a
  Hugging Face `datasets` folder written by `save_to_disk` (image and prompt columns).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from datamodules.images import keep_readable, list_images
from framework.errors import UserError
from framework.images import IMAGE_ERRORS, bad_image, load_rgb
from framework.schema import ExistingDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileImage:
    path: Path
    mode: str = "RGB"  # "L": a grayscale mask

    @property
    def name(self) -> str:
        return str(self.path)

    def load(self) -> Image.Image:
        """The image upright (its EXIF orientation applied: framework.images.load_rgb), in `mode`."""
        image = load_rgb(self.path)
        return image if self.mode == "RGB" else image.convert(self.mode)


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
        # The datasets library decodes the image as it reads the row (PIL, under framework.images' pixel limit);
        # upright as load_rgb gives files.
        try:
            return ImageOps.exif_transpose(_open_dataset(self.folder)[self.index][self.column]).convert("RGB")
        except IMAGE_ERRORS as error:
            raise bad_image(self.name, error) from error


@dataclass(frozen=True)
class Example:
    """A training image and its prompt; `size`: the image's (width, height) as `image.load()` gives it, upright, once
    it was read (`read_examples`); `mask`: its loss mask (data.masks), white where the loss counts."""

    image: FileImage | DatasetImage
    prompt: str
    size: tuple[int, int] | None = None
    mask: FileImage | None = None


def read_examples(examples: list[Example], skip_bad_images: bool, what: str) -> list[Example]:
    """The `examples` whose image (and mask) can be read, each decoded once here and given its upright size; an
    unreadable one, a missing mask or a mask of another size is an error naming it, or with `skip_bad_images` left out
    and counted (datamodules.images.keep_readable)."""
    sizes = {}

    def read(example: Example) -> None:
        sizes[example.image.name] = example.image.load().size
        if example.mask is not None:
            if not example.mask.path.is_file():
                raise UserError(
                    f"data.masks: no mask for {example.image.name} (expected {example.mask.path}: a grayscale image "
                    "with the image's file name, white where the loss counts). Add it, or set "
                    "data.skip_bad_images=true to leave such images out"
                )
            mask_size = example.mask.load().size
            if mask_size != sizes[example.image.name]:
                raise UserError(
                    f"data.masks: the mask {example.mask.path} is {mask_size[0]}x{mask_size[1]} px, its image "
                    f"{example.image.name} {sizes[example.image.name][0]}x{sizes[example.image.name][1]}: a mask "
                    "has its image's size. Replace it, or set data.skip_bad_images=true to leave such images out"
                )

    kept = keep_readable(examples, read, skip_bad_images, what, lambda example: example.image.name)
    return [dataclasses.replace(example, size=sizes[example.image.name]) for example in kept]


def read_instance_folder(folder: ExistingDir, prompt: str) -> list[Example]:
    """Every image under `folder` (datamodules.images.image_paths), each with `prompt`; other files are skipped and
    listed once."""
    if not prompt or not prompt.strip():
        raise UserError("data.source.prompt is empty: give the instance prompt, e.g. 'a photo of sks dog'")
    return [Example(image, prompt) for image in image_files(Path(folder), "data.source.folder")]


def read_captioned_images(folder: ExistingDir, prompt_column: str, image_column: str) -> list[Example]:
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
    text = metadata.read_text(encoding="utf-8-sig")
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


def image_files(folder: Path, key: str) -> list[FileImage]:
    return [FileImage(p) for p in list_images(folder, key)]


def with_masks(examples: list[Example], folder: Path) -> list[Example]:
    """Each example with its mask from `folder` (data.masks): the image under `folder` with the image's file name
    (its extension may differ: photo.jpg's mask may be photo.png); where there is none, the expected path, which
    `read_examples` names as missing."""
    masks = {}
    for path in list_images(folder, "data.masks"):
        masks.setdefault(path.stem, path)
    paired = []
    for example in examples:
        if not isinstance(example.image, FileImage):
            raise UserError(
                f"data.masks pairs masks with image files by name; {example.image.name} is a row of a dataset "
                "folder: save the images as files with metadata.jsonl (data=captioned_images) to use masks"
            )
        stem = example.image.path.stem
        mask = masks.get(stem, folder / f"{stem}.png")
        paired.append(dataclasses.replace(example, mask=FileImage(mask, mode="L")))
    return paired
