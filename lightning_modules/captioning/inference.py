"""Captioning images from Python with any captioner of this project:

from lightning_modules.captioning import Captioner
captioner = Captioner.from_pretrained("outputs/blip_coco/runs/<time>/export")      # or any of our .ckpt files
captioner.generate_caption("photo.jpg")                                            # -> "a dog on a couch"
captioner.generate_captions(["a.jpg", pil_image], batch_size=16)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from datamodules.captions import CaptionBatch
from framework.checkpoints import is_sharded_checkpoint, load_module, read_checkpoint
from framework.errors import UserError
from framework.images import load_rgb
from lightning_modules.captioning.base import CaptioningModule
from lightning_modules.captioning.blip import BLIPCaptioner
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.vit_gpt2 import ViTGPT2Captioner

# Checkpoints name their class (CaptioningModule.on_save_checkpoint); only these classes are loaded.
CHECKPOINT_CLASSES = {cls.__name__: cls for cls in (CNNRNNCaptioner, BLIPCaptioner, ViTGPT2Captioner)}
# Hugging Face directories, by config.json's model_type.
EXPORT_CLASSES = {"blip": BLIPCaptioner, "vision-encoder-decoder": ViTGPT2Captioner}


class Captioner:
    """A captioner in evaluation mode on `device`, with the image preprocessing it was trained with."""

    def __init__(self, module: CaptioningModule, device: str | torch.device = "cpu"):
        self.module = module.to(device).eval()
        self.transform = module.image_transform()
        if self.transform is None:
            raise UserError(
                "this checkpoint does not record its image size (image_size): retrain it, or caption with "
                "mode=predict and the data's data.image_size"
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> Captioner:
        """From a Hugging Face export directory (BLIP, ViT-GPT2) or any checkpoint (.ckpt, sharded too) of our
        captioners.

        `overrides` change inference settings, e.g. `generation={"num_beams": 5}` (BLIP, ViT-GPT2) or
        `beam_size=3` (CNN-RNN).
        """
        path = Path(path)
        if path.is_dir() and not is_sharded_checkpoint(path):
            config = path / "config.json"
            model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
            if model_type not in EXPORT_CLASSES:
                raise UserError(
                    f"{path} is not a Hugging Face export of a captioner we know (config.json model_type "
                    f"{model_type!r}; known: {', '.join(EXPORT_CLASSES)})"
                )
            return cls(EXPORT_CLASSES[model_type](pretrained=str(path), **overrides), device)
        if not path.exists():
            raise UserError(f"{path} does not exist: give an export directory or a .ckpt file")
        name = read_checkpoint(path, key=None).get("captioner")
        if name not in CHECKPOINT_CLASSES:
            raise UserError(f"{path} is not a captioner checkpoint of this project (it names {name!r})")
        module = load_module(CHECKPOINT_CLASSES[name], path, **overrides)
        return cls(module, device)

    def generate_caption(self, image: str | os.PathLike | Image.Image) -> str:
        """The caption of one image (a path or a PIL image)."""
        return self.generate_captions([image])[0]

    @torch.no_grad()
    def generate_captions(self, images: Sequence[str | os.PathLike | Image.Image], batch_size: int = 16) -> list[str]:
        """Captions of images (paths or PIL images), `batch_size` at a time."""
        captions = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="captioning", unit="batch", disable=len(starts) <= 1):
            pixels = torch.stack([self.transform(self._rgb(image)) for image in images[start : start + batch_size]])
            pixels = pixels.to(self.module.device, self.module.dtype)
            captions += self.module.caption_batch(CaptionBatch(size=len(pixels), images=pixels))
        return captions

    @staticmethod
    def _rgb(image: str | os.PathLike | Image.Image) -> Image.Image:
        return image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image)
