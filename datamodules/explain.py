"""Data for explaining classifiers and captioners: shapes labelled by their shape class (with object boxes), shapes
with every object (captioners), plain image folders, and class indices (class visualisation).

Images come as pixels in [0, 1] (no normalisation): the classifiers under explanation normalise inside
(see lightning_modules/explain/classifier.py), so that attributions, attacks and epsilons live in pixel space.
What the explaining modules take from the data (`model_inputs`, before they are built): classes, image sizes and,
for captions, the words that name the objects of an image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from datamodules.images import ImageFolderDataset, collate, list_images, read_or_skip
from datamodules.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    CaptionsPerImage,
    ImageSize,
    ShapesSet,
    generate_shapes,
)
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.images import IMAGE_ERRORS
from framework.preparation import given
from framework.schema import (
    ExistingDir,
    NonEmpty,
    NonNegativeInt,
    PositiveInt,
    Seed,
    WritableDir,
    show,
)

SPLITS = ("train", "val", "test")
# The words of the shapes captions that name an object's attributes (the keys of its annotation), the noun first:
# what grounds a caption's words in the objects (lightning_modules/explain/caption_words.py, ground_words).
OBJECT_WORDS = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES)}


def none() -> None:
    """An input this data does not have (e.g. the classes of unlabelled images)."""


def pixel_transform(image_size: int) -> transforms.Compose:
    """Square resize to pixels in [0, 1]."""
    return transforms.Compose([transforms.Resize((image_size, image_size), antialias=True), transforms.ToTensor()])


def read_shape_classes(annotations: Path) -> dict[str, list[dict]]:
    """The single-object images of a shapes data set, per split: path, label (index into SHAPES) and box.

    Two-object images are left out: their shape class would be ambiguous.
    """
    images = json.loads(annotations.read_text(encoding="utf-8-sig"))["images"]
    splits = {split: [] for split in SPLITS}
    for entry in images:
        if len(entry["objects"]) == 1:
            (obj,) = entry["objects"]
            splits[entry["split"]].append(
                {
                    "path": annotations.parent / entry["filepath"] / entry["filename"],
                    "label": SHAPES.index(obj["shape"]),
                    "box": obj["box"],
                }
            )
    return splits


def read_shape_objects(annotations: Path) -> dict[str, list[dict]]:
    """Every image of a shapes data set, per split: path and objects (shape, colour, size and box of each)."""
    splits = {split: [] for split in SPLITS}
    for entry in json.loads(annotations.read_text(encoding="utf-8-sig"))["images"]:
        splits[entry["split"]].append(
            {"path": annotations.parent / entry["filepath"] / entry["filename"], "objects": entry["objects"]}
        )
    return splits


class LabelledImages(Dataset):
    """Items {"image", "label", "box" (in pixels of the resized image), "path"}."""

    def __init__(self, items: list[dict], image_size: int, skip_bad_images: bool = False):
        self.items, self.image_size, self.skip_bad_images = items, image_size, skip_bad_images
        self.transform = pixel_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        item = self.items[index]
        image = read_or_skip(item["path"], self.skip_bad_images)
        if image is None:
            return None
        scale = self.image_size / image.width
        if "objects" in item:  # boxes kept as lists: images hold one or two objects
            objects = [{**obj, "box": [v * scale for v in obj["box"]]} for obj in item["objects"]]
            return {"image": self.transform(image), "objects": objects, "path": str(item["path"])}
        return {
            "image": self.transform(image),
            "label": torch.tensor(item["label"]),
            "box": torch.tensor(item["box"], dtype=torch.float32) * scale,
            "path": str(item["path"]),
        }


class ShapeClassesDataModule(L.LightningDataModule):
    """The embedded shapes data (generated into `root` on first use; settings: conf/data/_shapes.yaml) as a 4-class
    shape classification set (conf/data/shape_classes.yaml).

    train/val/test serve the classifier; predict serves the first `num_predict` test images (all: null)
    with their labels and boxes (for the pointing game).
    """

    def __init__(
        self,
        root: WritableDir,
        seed: Seed,
        num_train: NonNegativeInt,
        num_val: NonNegativeInt,
        num_test: NonNegativeInt,
        image_size: ImageSize,
        captions_per_image: CaptionsPerImage,
        batch_size: PositiveInt,
        eval_batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        skip_bad_images: bool,
        num_predict: PositiveInt | None,
    ):
        super().__init__()
        self.shapes = ShapesSet(seed, num_train, num_val, num_test, image_size, captions_per_image)
        self.root, self.image_size = root, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.skip_bad_images = num_workers, skip_bad_images
        self.num_predict = num_predict
        self._splits: dict[str, list[dict]] | None = None

    def prepare_data(self) -> None:
        self.splits  # noqa: B018 (generates the data set once per node)

    @property
    def splits(self) -> dict[str, list[dict]]:
        if self._splits is None:
            self._splits = self.read(generate_shapes(self.root, self.shapes))
        return self._splits

    read = staticmethod(read_shape_classes)

    kind = "single-object"  # the images it reads

    def data_paths(self) -> list[str]:
        """The generated set's folder, for the run's manifest."""
        return [str(self.shapes.folder(self.root))]

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """The labels, and the image size: a shapes classifier records the size it was trained on, an explaining
        module checks that the classifier's size is the data's (the generated images' own size: no source_size)."""
        return given(self, names, classes=lambda: list(SHAPES), image_size=lambda: self.image_size, source_size=none)

    def _loader(self, dataset: Dataset, train: bool = False) -> DataLoader:
        batch_size = per_device_batch_size(self.batch_size, self.trainer) if train else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def _split_loader(self, split: str, train: bool = False, limit: int | None = None) -> DataLoader:
        items = self.splits[split][:limit]
        if not items:
            raise UserError(f"the shapes data set has no {self.kind} '{split}' images (data.num_{split})")
        return self._loader(LabelledImages(items, self.image_size, self.skip_bad_images), train)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._split_loader("test", limit=self.num_predict)


class ShapeObjectsDataModule(ShapeClassesDataModule):
    """The embedded shapes data with every image's objects (one or two; their shape, colour, size and box), for
    explaining captioners (conf/data/shape_objects.yaml): predict serves the first `num_predict` test images, or with
    `images` a folder of images (no objects)."""

    read = staticmethod(read_shape_objects)
    kind = "captioned"

    def __init__(self, images: ExistingDir | None, **kwargs):
        super().__init__(**kwargs)
        self.images = images

    def prepare_data(self) -> None:
        if self.images is None:
            super().prepare_data()

    def data_paths(self) -> list[str]:
        return [self.images] if self.images is not None else super().data_paths()

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """The size the images are resized to, and the words that name the objects' attributes (the pointing game
        of caption_explain); a folder of images lists no objects: None."""
        return given(
            self,
            names,
            image_size=lambda: self.image_size,
            object_words=lambda: None if self.images is not None else OBJECT_WORDS,
        )

    def predict_dataloader(self) -> DataLoader:
        if self.images is None:
            return super().predict_dataloader()
        dataset = ImageFolderDataset(self.images, pixel_transform(self.image_size), self.skip_bad_images)
        return self._loader(dataset)


class ImageFolderDataModule(L.LightningDataModule):
    """Every image under `images` (e.g. photos for an ImageNet classifier), resized to `image_size`
    (conf/data/explain_images.yaml)."""

    def __init__(
        self,
        images: ExistingDir,
        image_size: PositiveInt,
        batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        skip_bad_images: bool,
    ):
        super().__init__()
        self.images, self.image_size, self.batch_size = images, image_size, batch_size
        self.num_workers, self.skip_bad_images = num_workers, skip_bad_images
        self.transform = pixel_transform(image_size)

    def data_paths(self) -> list[str]:
        return [self.images]

    def set_image_transform(self, transform) -> None:
        """Prepare the images the model's own way (a captioner's image processor) instead of resizing them to
        `image_size` (framework/preparation.py)."""
        self.transform = transform

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """No classes (the images are unlabelled), the size they are resized to, and the size they all have (None
        if they differ; unreadable ones are left to the loader): the explaining module checks them. No objects. The
        folder itself (task=caption_images writes its captions there)."""
        return given(
            self,
            names,
            classes=none,
            image_size=lambda: self.image_size,
            source_size=self.source_size,
            object_words=none,
            images=lambda: self.images,
        )

    def source_size(self) -> list[int] | None:
        sizes = set()
        for path in list_images(self.images):
            try:
                with Image.open(path) as image:  # the header only
                    sizes.add(image.size)
            except IMAGE_ERRORS:
                pass
        return list(sizes.pop()) if len(sizes) == 1 else None

    def predict_dataloader(self) -> DataLoader:
        dataset = ImageFolderDataset(self.images, self.transform, self.skip_bad_images)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)


class ClassTargetsDataModule(L.LightningDataModule):
    """Class indices to visualise (conf/data/class_targets.yaml): `targets`, or (null) every class of the classifier
    being explained, whose class names the runner hands over before the stage (`use_class_names`)."""

    def __init__(self, targets: Annotated[list[NonNegativeInt], NonEmpty()] | None, batch_size: PositiveInt):
        super().__init__()
        self.targets = None if targets is None else [int(target) for target in targets]
        self.batch_size = batch_size
        self.class_names: list[str] | None = None

    def use_class_names(self, names: list[str]) -> None:
        """The classifier's classes (framework/preparation.py, at the start of the stage): data.targets must be
        among them."""
        outside = [target for target in self.targets or () if target >= len(names)]
        if outside:
            raise UserError(
                f"data.targets={show(self.targets)}: {', '.join(map(str, outside))} "
                f"{'is not a class' if len(outside) == 1 else 'are not classes'} of the classifier, which has "
                f"{len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): give indices in "
                f"0..{len(names) - 1}, or data.targets=null for every class"
            )
        self.class_names = list(names)

    def predict_dataloader(self) -> DataLoader:
        if self.class_names is None:
            raise UserError(
                "ClassTargetsDataModule does not know the classifier's classes: the runner hands them over "
                "(use_class_names) before predicting; outside it, call use_class_names(module.class_names) first"
            )
        targets = range(len(self.class_names)) if self.targets is None else self.targets
        items = [{"target": torch.tensor(target)} for target in targets]
        return DataLoader(items, batch_size=self.batch_size, collate_fn=collate)
