"""Captioned images: the datasets and the captioning DataModules (the data sets' readers: datamodules/readers.py; the
batch captioners read: datamodules/batches.py `CaptionBatch`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batches import CaptionBatch
from datamodules.feature_cache import CachedCaptionDataset, FeatureCache
from datamodules.images import ImageFolderDataset, collate, prepared_image
from datamodules.items import CaptionedImage, caption_item
from datamodules.readers import SPLITS, Splits, read_karpathy
from datamodules.sampling import EpochSampler, ResumableLoader, fit_position, item_key
from datamodules.shapes import CaptionsPerImage, ImageSize, ShapesSet, generate_shapes
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.images import image_transform
from framework.preparation import given
from framework.schema import NonNegativeInt, PositiveInt, Seed, WritableDir
from framework.text import Vocabulary

log = logging.getLogger(__name__)
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


def collate_captions(samples: list[dict | None]) -> CaptionBatch:
    """Items (CaptionDataset, CachedCaptionDataset, ImageFolderDataset) -> CaptionBatch, by `collate`'s naming."""
    return CaptionBatch(**collate(samples))


class CaptionDataset(Dataset):
    """Images with their captions; keys are indices, or (index, seed) pairs from `EpochSampler`."""

    def __init__(self, images: list[CaptionedImage], transform, skip_bad_images: bool = False):
        self.images, self.transform, self.skip_bad_images = images, transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, item_seed = item_key(key)
        item = self.images[index]
        image = prepared_image(item.path, self.transform, self.skip_bad_images)
        return None if image is None else {"image": image, **caption_item(item, item_seed)}


class CaptionDataModule(L.LightningDataModule):
    """Captioned images with train/val/test splits, plus a folder of images for predict mode.

    `source` reads the splits: a reader such as `read_karpathy`, given as a Hydra `_partial_` config
    (see conf/data/), called with `skip_bad_images`. With `feature_cache` (a directory), a frozen
    encoder's features are computed once and train/val/test items carry them (see `enable_feature_cache`).
    """

    def __init__(
        self,
        source: Callable[..., Splits],
        image_size: PositiveInt,
        batch_size: PositiveInt,
        eval_batch_size: PositiveInt | None,
        num_workers: NonNegativeInt,
        vocab_min_count: PositiveInt,
        skip_bad_images: bool,
        images: str | None,
        feature_cache: WritableDir | None,
    ):
        """`eval_batch_size`: null = batch_size; `images`: the folder mode=predict captions (read only then);
        `feature_cache`: a folder for a frozen encoder's features (null: no cache)."""
        super().__init__()
        self.source, self.images, self.feature_cache, self.image_size = source, images, feature_cache, image_size
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers, self.vocab_min_count, self.skip_bad_images = num_workers, vocab_min_count, skip_bad_images
        self.transform = image_transform(image_size)
        self._splits: Splits | None = None
        self._cache_dirs: dict[str, Path] = {}  # split -> its feature cache, once enabled

    def prepare_data(self) -> None:
        self.splits  # noqa: B018 (reads, and for generated data sets creates, the data once per node)

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = self.source(skip_bad_images=self.skip_bad_images)
        return self._splits

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """What a captioner is built from, of what it asks for (framework/preparation.py): `vocab` (the words of the
        training captions seen at least data.vocab_min_count times), `image_size`."""
        return given(self, names, vocab=self.vocabulary, image_size=lambda: self.image_size)

    def vocabulary(self) -> list[str]:
        train = self.splits["train"]
        if not train:
            raise UserError("the data set has no training images (data.source)")
        return Vocabulary.build((tokens for item in train for tokens in item.tokens), self.vocab_min_count).words

    def set_image_transform(self, transform: Callable) -> None:
        """Prepare images the model's own way from now on (PIL image -> tensor): the captioner's image processor or
        training size (framework/preparation.py)."""
        self.transform = transform

    def training_captions(self) -> list[list[list[str]]]:
        """Per training image, its reference captions as words."""
        return [item.tokens for item in self.splits["train"]]

    @property
    def train_batch_size(self) -> int:
        """Per device and step: `batch_size` is the global batch of one optimizer step, split over the devices
        and accumulated batches (`eval_batch_size` is per device)."""
        return per_device_batch_size(self.batch_size, self.trainer)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # The loader's own generator keeps its worker seeding off the global RNG, which after a resume
        # must continue exactly where the interrupted run left it (dropout, sampling).
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.train_batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(len(dataset)) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_captions,
            generator=torch.Generator(),
        )

    def _train_sampler(self, length: int) -> EpochSampler:
        trainer = self.trainer
        if trainer is None:
            return EpochSampler(length, torch.initial_seed())
        position = fit_position(trainer, self.train_batch_size)
        return EpochSampler(length, torch.initial_seed(), trainer.world_size, trainer.global_rank, position)

    def _split_loader(self, split: str) -> DataLoader:
        if not self.splits[split]:
            raise UserError(f"the data set has no '{split}' images (data.source)")
        train = split == "train"
        if split in self._cache_dirs:
            return self._loader(CachedCaptionDataset(self.splits[split], self._cache_dirs[split]), train)
        return self._loader(CaptionDataset(self.splits[split], self.transform, self.skip_bad_images), train)

    def enable_feature_cache(self, encoder: torch.nn.Module) -> None:
        """Serve the splits of the running stage (all without a trainer) from `encoder`'s cached features (a frozen
        encoder, framework/preparation.py).

        Global rank zero builds the missing caches, on the trainer's device; the other ranks wait for it.
        """
        if self.feature_cache is None:
            return
        strategy = self.trainer.strategy if self.trainer is not None else None
        splits = STAGE_SPLITS[self.trainer.state.fn] if self.trainer is not None else SPLITS
        cache_dirs = {}
        if strategy is None or strategy.is_global_zero:
            device = strategy.root_device if strategy is not None else torch.device("cpu")
            for split in splits:
                if self.splits[split]:
                    cache = FeatureCache(
                        self.feature_cache, [item.path for item in self.splits[split]], self.transform, encoder
                    )
                    cache_dirs[split] = cache.build(
                        device, self.eval_batch_size, self.num_workers, self.skip_bad_images
                    )
        if strategy is not None:
            # The other ranks wait here for rank zero's directories (their own encoder weights may
            # differ from rank zero's until DDP syncs them).
            cache_dirs = strategy.broadcast(cache_dirs)
        self._cache_dirs.update(cache_dirs)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.images is None:
            raise UserError("mode=predict needs data.images=DIR, a folder of images to caption")
        return self._loader(ImageFolderDataset(self.images, self.transform, self.skip_bad_images), train=False)

    def val_examples(self, count: int) -> list[dict]:
        """The first `count` validation items: fixed images for the TensorBoard review."""
        dataset = CaptionDataset(self.splits["val"], self.transform, skip_bad_images=True)
        return [item for item in (dataset[i] for i in range(min(count, len(dataset)))) if item is not None]


class ShapesDataModule(CaptionDataModule):
    """The embedded synthetic data set, generated into `root` on first use (see datamodules/shapes.py; the generator's
    settings: conf/data/_shapes.yaml)."""

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
        eval_batch_size: PositiveInt | None,
        num_workers: NonNegativeInt,
        vocab_min_count: PositiveInt,
        skip_bad_images: bool,
        images: str | None,
        feature_cache: WritableDir | None,
    ):
        self.root, self.shapes = root, ShapesSet(seed, num_train, num_val, num_test, image_size, captions_per_image)
        generate = partial(generate_shapes, root, self.shapes)
        super().__init__(
            source=lambda skip_bad_images: read_karpathy(generate(), image_root=None, skip_bad_images=skip_bad_images),
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            vocab_min_count=vocab_min_count,
            skip_bad_images=skip_bad_images,
            images=images,
            feature_cache=feature_cache,
        )

    def data_paths(self) -> list[str]:
        """What the run read, for its manifest.json: the generated set's folder (and the predict folder), once there."""
        paths = [str(self.shapes.folder(self.root)), *([self.images] if self.images else [])]
        return [path for path in paths if Path(path).exists()]
