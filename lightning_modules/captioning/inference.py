"""Captioning images from Python with any captioner of this project:

from lightning_modules.captioning import Captioner
captioner = Captioner.from_pretrained("outputs/blip_coco/runs/<time>/export")      # or any of our .ckpt files
captioner.generate_caption("photo.jpg")                                            # -> "a dog on a couch"
captioner.generate_captions(["a.jpg", pil_image], batch_size=16)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from hydra.utils import get_class
from PIL import Image
from tqdm import tqdm

from datamodules.batches import CaptionBatch
from framework.checkpoints import check_not_retired, is_sharded_checkpoint, load_module, read_checkpoint
from framework.config import CONF, model_settings
from framework.errors import UserError
from framework.images import load_rgb
from framework.schema import Checker
from lightning_modules.captioning.base import CLASS_KEY, CaptioningModule

PACKAGE = __name__.rsplit(".", 1)[0]  # lightning_modules.captioning: the classes a checkpoint may name


@functools.cache
def configured_captioners() -> dict[type[CaptioningModule], str]:
    """The captioner classes of this package that a conf/model/<name>.yaml builds, with that name: the registry of
    checkpoints and exports, derived from the configs (a new captioner is known once its YAML exists)."""
    found = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}).get("_target_", "")
        if target.startswith(f"{PACKAGE}."):
            module_class = get_class(target)
            if issubclass(module_class, CaptioningModule):
                found.setdefault(module_class, path.stem)
    return found


def checkpoint_class(name: str | None) -> type[CaptioningModule] | None:
    """The class a checkpoint names: its full path ("lightning_modules.captioning.blip.BLIPCaptioner"), or for older
    checkpoints its class name, among the configured captioners; None if it names no captioner of this package."""
    if not isinstance(name, str):
        return None
    if "." in name:
        if not name.startswith(f"{PACKAGE}."):
            return None
        try:
            module_class = get_class(name)
        except (ImportError, ValueError):
            return None
        return module_class if isinstance(module_class, type) and issubclass(module_class, CaptioningModule) else None
    return next((cls for cls in configured_captioners() if cls.__name__ == name), None)


def checked(module_class: type[CaptioningModule], settings: dict, complete: bool) -> dict:
    """`settings` of `module_class`, checked as the runner checks a config: a bad one is one UserError naming
    model.<key>; `complete`: every argument without a default must be there."""
    checker = Checker(partial_paths=False)
    checker.check_parameters(settings, module_class, "model", partial=not complete, data_inputs=())
    if checker.problems:
        raise UserError("\n".join(checker.problems))
    return settings


def settings_for(module_class: type[CaptioningModule], **values) -> dict:
    """The constructor arguments of `module_class` as its conf/model YAML gives them (the one home of its defaults;
    no scheduler: nothing is trained), `values` replacing some; checked."""
    return checked(module_class, model_settings(configured_captioners()[module_class], scheduler=None, **values), True)


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
        """From a Hugging Face export directory (any family of conf/model/family/) or any checkpoint (.ckpt, sharded
        too) of our captioners.

        `overrides` change inference settings, e.g. `generation={"num_beams": 5}` (Hugging Face captioners) or
        `beam_size=3` (CNN-RNN), checked as the config's are. An export is recognised by its config.json's model_type
        (a family of conf/model/family/) and built with conf/model/hf_captioner.yaml's settings (its own generation
        settings kept); a checkpoint names the class that wrote it and holds its settings.
        """
        path = Path(path)
        if path.is_dir() and not is_sharded_checkpoint(path):
            from lightning_modules.captioning.hf import FAMILIES, HFCaptioner, model_type_of

            model_type = model_type_of(str(path))
            if model_type is None or not (FAMILIES / f"{model_type}.yaml").is_file():
                known = ", ".join(sorted(p.stem for p in FAMILIES.glob("*.yaml")))
                raise UserError(
                    f"{path} is not a Hugging Face export of a captioner we know (config.json model_type "
                    f"{model_type!r}; the families of conf/model/family/: {known})"
                )
            # generation=None: the export's own generation_config.json, unless overridden
            settings = settings_for(HFCaptioner, pretrained=str(path), **{"generation": None, **overrides})
            return cls(HFCaptioner(**settings), device)
        if not path.exists():
            raise UserError(f"{path} does not exist: give an export directory or a .ckpt file")
        name = read_checkpoint(path, key=None).get(CLASS_KEY)
        module_class = checkpoint_class(name)
        check_not_retired(name, path)
        if module_class is None:
            raise UserError(f"{path} is not a captioner checkpoint of this project (it names {name!r})")
        return cls(load_module(module_class, path, **checked(module_class, overrides, complete=False)), device)

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
            # float pixels (normalised) in the module's dtype; uint8 images (Hugging Face captioners) as they are
            pixels = pixels.to(self.module.device, self.module.dtype if pixels.is_floating_point() else None)
            captions += self.module.caption_batch(CaptionBatch(size=len(pixels), images=pixels))
        return captions

    @staticmethod
    def _rgb(image: str | os.PathLike | Image.Image) -> Image.Image:
        return image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image)
