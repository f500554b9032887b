"""Data for personalising a text-to-image model (DreamBooth, style LoRA): the data module.

Training examples come from a reader (`source`: dreambooth_sources.py); training items and prompt sets are
dreambooth_items.py's. Each training item holds an instance example and, with prior preservation, a class example
(the diffusers script's layout: instance halves first, class halves second, in one batch), resized to `resolution`
or, with `buckets`, to its aspect-ratio bucket (datamodules/buckets.py), every batch from one bucket.
Validation, test and predict items are prompts with seeds.

Preparation that needs the model is named as data and its results taken as data (the data module holds no model;
framework/preparation.py): `missing_class_images()` names the class images data.class_images lacks (prior preservation),
which the LightningModule writes there; `views_to_encode()` gives every image and its mirror image once
(data.cache_latents), whose latent distributions `set_latent_cache` takes back, after which items carry those
instead of pixels.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.buckets import BucketSampler, bucket_sizes, nearest_bucket
from datamodules.dreambooth_items import (
    Interpolation,
    Prompts,
    PromptSet,
    TrainingImages,
    collate_prompts,
    collate_training,
    crop_and_flip,
    interpolation_mode,
    read_prompts,
)
from datamodules.dreambooth_sources import (
    Example,
    image_files,
    read_captioned_images,
    read_examples,
    read_instance_folder,
    with_masks,
)
from datamodules.images import image_paths
from datamodules.sampling import EpochSampler, ResumableLoader, fit_position
from framework.distributed import per_device_batch_size
from framework.errors import UserError
from framework.files import writable_dir
from framework.preparation import given
from framework.schema import (
    ExistingDir,
    MultipleOf,
    NonEmpty,
    NonNegativeInt,
    PositiveInt,
    Range,
    Seed,
    WritableDir,
)

# The readers are data.source targets in conf/data/ and, with crop_and_flip, imported from here.
__all__ = ["DreamBoothDataModule", "crop_and_flip", "read_captioned_images", "read_instance_folder"]

log = logging.getLogger(__name__)


class DreamBoothDataModule(L.LightningDataModule):
    """Training examples from `source`, optional class images for prior preservation, prompt sets for
    validation (`validation_prompts`), test (`test_prompts`, mode=eval) and predict (`prompts`). The settings and their
    defaults: conf/data/dreambooth_folder.yaml, conf/data/captioned_images.yaml."""

    def __init__(
        self,
        source: Callable[[], list[Example]],
        trigger_token: str | None,
        # SDXL's VAE makes latents of 1/8 the size, which the pipeline's sides must be a multiple of
        resolution: Annotated[int, Range(min=64), MultipleOf(8)],
        center_crop: bool,
        random_flip: bool,
        buckets: bool,
        interpolation: Interpolation,
        repeats: PositiveInt,
        batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        skip_bad_images: bool,
        cache_latents: bool,
        caption_dropout: Annotated[float, Range(min=0, below=1)],
        masks: ExistingDir | None,
        prior_preservation: bool,
        class_prompt: str | None,
        class_images: WritableDir | None,
        num_class_images: PositiveInt,
        class_batch_size: PositiveInt,
        validation_prompts: Prompts,
        test_prompts: Prompts,
        prompts: Prompts,
        seeds: Annotated[list[Seed], NonEmpty()],
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
        self.repeats, self.num_workers, self.batch_size = repeats, num_workers, batch_size
        self.skip_bad_images, self.cache_latents = skip_bad_images, cache_latents
        self.caption_dropout, self.masks = caption_dropout, Path(masks).expanduser() if masks else None
        self.prior_preservation, self.class_prompt = prior_preservation, class_prompt
        self.class_images = Path(class_images) if class_images else None
        self.num_class_images, self.class_batch_size = num_class_images, class_batch_size
        self.prompt_sets = {  # read now: a prompts file that cannot be read or is empty stops the run before work
            "val": read_prompts(validation_prompts, "data.validation_prompts"),
            "test": read_prompts(test_prompts, "data.test_prompts"),
            "predict": read_prompts(prompts, "data.prompts"),
        }
        self.seeds = list(seeds)
        self._instances: list[Example] | None = None
        self._classes: list[Example] | None = None
        self._latents: dict | None = None

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        """What DreamBoothLoRA takes from the data (its `data_inputs`): the resolution it generates images at, and the
        class prompt whose drift from the base model it measures."""
        return given(self, names, resolution=lambda: self.resolution, class_prompt=lambda: self.class_prompt)

    def setup(self, stage: str) -> None:
        """Training reads and checks its images first (every one decoded; see `instances`): a folder without images or
        an unreadable image stops the run here, before class images are generated or latents cached."""
        if stage == "fit":
            self.instances  # noqa: B018 - read now

    @property
    def instances(self) -> list[Example]:
        """The training examples, read and checked once (every image decoded: an unreadable one stops the run
        here, or is left out with data.skip_bad_images=true, rather than in the middle of training)."""
        if self._instances is None:
            examples = self.source()
            if self.masks is not None:
                examples = with_masks(examples, self.masks)
            self._instances = self._readable(examples, "data.source")
            self._check(self._instances)
        return self._instances

    def _readable(self, examples: list[Example], what: str) -> list[Example]:
        return read_examples(examples, self.skip_bad_images, what)

    def _check(self, examples: list[Example]) -> None:
        sizes = bucket_sizes(self.resolution) if self.buckets else [(self.resolution, self.resolution)]
        small = []
        for example in examples:
            width, height = example.size  # upright
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
        """The class images of prior preservation, read and checked once (after `missing_class_images` were written)."""
        if not self.prior_preservation:
            return []
        if self._classes is None:
            images = image_files(self.class_images, "data.class_images")[: self.num_class_images]
            self._classes = self._readable([Example(image, self.class_prompt) for image in images], "data.class_images")
        return self._classes

    def missing_class_images(self) -> list[tuple[str, int, Path]]:
        """(prompt, seed, path) of each class image prior preservation still lacks, for the module to write there.
        Images already there are kept and reused; each is written atomically, so an interrupted run leaves only
        complete images and the next run names the rest."""
        if not self.prior_preservation:
            return []
        self._classes = None  # read again once complete
        folder, prompt = self.class_images, self.class_prompt
        writable_dir(folder, "data.class_images")
        missing = [
            (prompt, i, folder / f"class_{i:05d}.png")
            for i in range(len(image_paths(folder)[0]), self.num_class_images)
        ]
        if missing:
            log.info("generating %d class images of '%s' into %s", len(missing), prompt, folder)
        return missing

    def train_prompts(self) -> set[str]:
        prompts = {e.prompt for e in self.instances} | ({self.class_prompt} if self.prior_preservation else set())
        return prompts | ({""} if self.caption_dropout else set())

    def reference_images(self) -> list[Image.Image]:
        """The real instance images, for subject fidelity (CLIP-I, DINO)."""
        return [e.image.load() for e in self.instances]

    def views_to_encode(self, batch_size: int = 8) -> Iterator[tuple[list, torch.Tensor]]:
        """With data.cache_latents, until `set_latent_cache`: every training image and its mirror image, as batches of
        one size (views, pixels in [-1, 1]), read as they are drawn; hand their latent parameters to
        `set_latent_cache`, training then reads them from memory.

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
        for chunk in tqdm(chunks, desc="caching latents", unit="batch"):
            views = []
            for example, size in chunk:
                seeded = random.Random(f"{torch.initial_seed()}:{example.image.name}")
                pair = dataset.crops(example, size, seeded, (False, True))
                views += [((example.image.name, size), view) for view in pair]
            yield views, torch.stack([view.pop("pixels") for _, view in views])

    def set_latent_cache(self, encoded: list[tuple[list, torch.Tensor]]) -> None:
        """Serve the views of `views_to_encode` with their latent parameters (mean and log variance, one per view)
        from now on; an empty list (nothing was to encode) changes nothing."""
        latents = {}
        for views, parameters in encoded:
            for (key, view), latent in zip(views, parameters.float().cpu()):
                latents.setdefault(key, []).append({**view, "latent_parameters": latent})  # unflipped, then flipped
        self._latents = latents or self._latents

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
            self.caption_dropout,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.training_images()
        batch_size = per_device_batch_size(self.batch_size, self.trainer)
        return ResumableLoader(
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
