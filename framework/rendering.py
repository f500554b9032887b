"""Drawing for people to look at: tiles, captions under images, grids and stacks, heat maps over images. The
TensorBoard media of the callbacks and the sheets and overlays of the explaining tasks are made with these (OpenCV).
Images are uint8 RGB arrays [H, W, 3] (framework.images.to_rgb makes them from pixels)."""

from __future__ import annotations

import math
import os
import re

import cv2
import numpy as np

from framework.images import load_rgb

TILE = 160  # pixels per panel (at least: `enlarge` scales by whole factors)
SMALL_TILE = 128  # pixels per panel of the sheets with many panels (contact sheets)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (framework.images.load_rgb: upright, one error naming the file)."""
    return np.asarray(load_rgb(path))


def tile(path: str | os.PathLike, size: int = TILE) -> np.ndarray:
    """An image file resized to a `size` x `size` panel."""
    return cv2.resize(read_rgb(path), (size, size), interpolation=cv2.INTER_AREA)


def with_caption(image: np.ndarray, text: str, scale: float = 0.35, max_lines: int = 2) -> np.ndarray:
    """The image above a white band holding `text` in cv2's font at `scale`, wrapped to at most `max_lines` lines."""
    height = round(15 * scale / 0.35)  # pixels per line
    band = np.full((height * max_lines + 6, image.shape[1], 3), 255, np.uint8)
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        width = cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
        if width > image.shape[1] - 6 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    for row, line in enumerate(lines[:max_lines]):
        cv2.putText(band, line, (3, height * (row + 1) - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([image, band], axis=0)


def short_names(paths: list[str]) -> list[str]:
    """Image file names without the part they share and leading zeros: COCO_val2014_000000391895.jpg -> 391895."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    shared = os.path.commonprefix(stems) if len(stems) > 1 else ""
    shared = shared[: max(shared.rfind(separator) + 1 for separator in "_-. ")]  # whole words only
    return [re.sub(r"^0+(?=\d)", "", stem[len(shared) :]) for stem in stems]


def grid(panels: list[np.ndarray], columns: int) -> np.ndarray:
    """Panels of one size in rows of `columns`, the last row filled with white."""
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    blank = np.full_like(panels[0], 255)
    return np.concatenate([np.concatenate(row + [blank] * (columns - len(row)), axis=1) for row in rows], axis=0)


def stack(images: list[np.ndarray]) -> np.ndarray:
    """Images one above the other, padded with white on the right to the widest."""
    width = max(image.shape[1] for image in images)
    return np.concatenate(
        [np.pad(image, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=255) for image in images]
    )


def attention_overlay(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """A jet colour map of one word's attention, upsampled to the image and blended over it."""
    heat = cv2.resize(attention.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    heat = (255 * (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 0.5, colour, 0.5, 0)


def enlarge(image: np.ndarray, size: int) -> np.ndarray:
    """Square image scaled to at least `size` pixels (nearest neighbour: small images stay crisp)."""
    scale = math.ceil(size / image.shape[0])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale > 1 else image
