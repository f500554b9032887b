"""The batch types the models read: what the data modules' loaders give and the LightningModules take. The one module
of datamodules/ that lightning_modules/ imports (tests/test_architecture.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CaptionBatch:
    """A batch of captioned images, as the captioning data modules' loaders give it (`collate_captions`) and the
    captioners read it. Lightning moves its tensors to the device (a dataclass is a collection it traverses)."""

    size: int  # images in the batch, after leaving out the unreadable ones
    images: torch.Tensor | None = None  # [size, 3, H, W], prepared by the data module's transform
    features: torch.Tensor | None = None  # [size, C, h, w], a frozen encoder's cached feature maps instead of images
    paths: list[str] = field(default_factory=list)  # the image files
    image_ids: list[int | str] = field(default_factory=list)  # train/val/test: the data set's ids
    references: list[list[str]] = field(default_factory=list)  # train/val/test: every reference caption of an image
    tokens: list[list[str]] = field(default_factory=list)  # train/val/test: the caption to train on, as words
    skipped: int = 0  # unreadable images left out (data.skip_bad_images=true)
