"""Frozen-encoder features computed once into an on-disk cache, and a dataset serving captions with them.

A cache is keyed by the ordered image paths (with size and mtime), the transform and the encoder
weights; the key picks the directory `root/<hash>/` holding `features.npy` (fp16 feature maps
[images, C, h, w], memory-mapped when read), `key.json` and `skipped.json` (the rows of unreadable
images, when skipping them). A finished directory is a valid cache: it is built under a temporary
name and renamed into place, so concurrent builders never see half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datamodules.images import read_or_skip
from datamodules.items import CaptionedImage, caption_item
from datamodules.sampling import item_key
from framework.errors import UserError
from framework.files import writable_dir


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state_dict tensors, in sorted-key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """The encoder feature maps of a list of images, cached under `root/<short hash of the key>/`."""

    def __init__(
        self, root: str | os.PathLike, paths: Sequence[str | os.PathLike], transform, encoder: torch.nn.Module
    ):
        self.paths = [Path(p) for p in paths]
        self.transform, self.encoder = transform, encoder
        stats = [p.stat() for p in self.paths]
        images = [[str(p), stat.st_size, stat.st_mtime_ns] for p, stat in zip(self.paths, stats)]
        encoder_class = f"{type(encoder).__module__}.{type(encoder).__qualname__}"
        self.key = {
            "images": images,
            "transform": repr(transform),
            "encoder": {"class": encoder_class, "sha256": weights_digest(encoder)},
        }
        name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(root) / name

    def build(
        self,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        skip_bad_images: bool = False,
    ) -> Path:
        """Encode the images into the cache unless it exists; return its directory. The encoder is left as it was."""
        if self.directory.is_dir():
            return self.directory
        writable_dir(self.directory.parent, "data.feature_cache")
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.tmp-", dir=self.directory.parent))
        try:
            os.chmod(tmp, 0o755)
            self._encode(tmp, torch.device(device), batch_size, num_workers, skip_bad_images)
            (tmp / "key.json").write_text(json.dumps(self.key, indent=1), encoding="utf-8")
            try:
                os.rename(tmp, self.directory)
            except OSError:
                if not self.directory.is_dir():  # not a lost race: something else is in the way
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.directory

    def _encode(
        self, out: Path, device: torch.device, batch_size: int, num_workers: int, skip_bad_images: bool
    ) -> None:
        loader = DataLoader(
            _Images(self.paths, self.transform, skip_bad_images),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        parameter = next(self.encoder.parameters())
        was_training, was_on = self.encoder.training, parameter.device
        features, written = None, np.zeros(len(self.paths), dtype=bool)
        self.encoder.eval().to(device)
        try:
            with torch.no_grad():
                for indices, images in tqdm(loader, desc="caching encoder features", unit="batch"):
                    if not indices:
                        continue
                    maps = self.encoder(images.to(device, parameter.dtype)).to(torch.float16).cpu().numpy()
                    if features is None:
                        features = open_memmap(
                            out / "features.npy", mode="w+", dtype=np.float16, shape=(len(self.paths), *maps.shape[1:])
                        )
                    features[indices] = maps
                    written[indices] = True
        finally:
            self.encoder.train(was_training).to(was_on)
        if features is None:
            raise UserError(f"none of the {len(self.paths)} images to cache is readable (e.g. {self.paths[0]})")
        features.flush()
        (out / "skipped.json").write_text(json.dumps(np.flatnonzero(~written).tolist()), encoding="utf-8")


class _Images(Dataset):
    def __init__(self, paths: list[Path], transform, skip_bad_images: bool):
        self.paths, self.transform, self.skip_bad_images = paths, transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor] | None:
        image = read_or_skip(self.paths[index], self.skip_bad_images)
        return None if image is None else (index, self.transform(image))


def _collate(samples: list[tuple[int, torch.Tensor] | None]) -> tuple[list[int], torch.Tensor | None]:
    kept = [s for s in samples if s is not None]
    return [i for i, _ in kept], torch.stack([image for _, image in kept]) if kept else None


class CachedCaptionDataset(Dataset):
    """CaptionDataset items with the cached feature map [C, h, w] as "features" (float32) instead of "image"."""

    def __init__(self, images: list[CaptionedImage], directory: str | os.PathLike):
        self.images, self.directory = images, Path(directory)
        self.skipped = set(json.loads((self.directory / "skipped.json").read_text(encoding="utf-8")))
        self.features = None  # memory-mapped on first use, in the process (loader worker) that reads

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, item_seed = item_key(key)
        if index in self.skipped:
            return None
        if self.features is None:
            self.features = np.load(self.directory / "features.npy", mmap_mode="r")
        features = torch.from_numpy(self.features[index].astype(np.float32))
        return {"features": features, **caption_item(self.images[index], item_seed)}
