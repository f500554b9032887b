"""A captioned image, and the fields every captioning dataset item carries for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaptionedImage:
    image_id: int | str
    path: Path
    captions: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]


def caption_item(item: CaptionedImage, item_seed: int | None) -> dict:
    """An item's fields besides its pixels: all references, and as `tokens` the caption to train on
    (picked by the training sampler's per-item seed; the first one in evaluation)."""
    pick = item_seed % len(item.tokens) if item_seed is not None else 0
    return {
        "image_id": item.image_id,
        "path": str(item.path),
        "references": list(item.captions),
        "tokens": list(item.tokens[pick]),
    }
