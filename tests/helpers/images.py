"""Small images written to disk: content and style images, stand-ins for a data set's photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth random colour pattern (width, height), as PNG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


def write_noise(path: Path, seed: int = 0) -> None:
    """A 32x32 image of random pixels (its folders made): a stand-in for a data set's photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
