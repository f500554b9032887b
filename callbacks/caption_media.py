"""TensorBoard review of a captioner after each validation epoch.

- text: sample predictions, each with its image's short name and references (`val/predictions`; a list, as
  TensorBoard squeezes a table's short columns to a few letters wide);
- images: one card per sample image, captioned with its prediction (`val/captions/<short name>`), at a size whose
  caption TensorBoard shows readable at its default card size;
- image: for attention decoders, one fixed validation image with a heat map per generated word, two panels a row.
Every validation is logged at its global step: TensorBoard keeps 10 steps per card unless started with
`--samples_per_plugin images=N,text=N` (framework/loggers.py REVIEW_FLAGS, printed at the end of a run).
"""

from __future__ import annotations

import os
import re

import cv2
import lightning as L
import numpy as np
import torch

from datamodules.images import load_rgb
from framework.contracts import Attends, HasCaptionPredictions, ServesValExamples
from framework.loggers import tensorboard

TILE = 160  # pixels per panel
CARD = 320  # pixels per captioned validation image: narrower than TensorBoard's default card, so shown 1:1
CARD_TEXT = 0.6  # cv2 font scale of its caption: letters about 13 pixels high


def _tile(path: str, size: int = TILE) -> np.ndarray:
    return cv2.resize(np.asarray(load_rgb(path)), (size, size), interpolation=cv2.INTER_AREA)


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
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    blank = np.full_like(panels[0], 255)
    return np.concatenate([np.concatenate(row + [blank] * (columns - len(row)), axis=1) for row in rows], axis=0)


def attention_overlay(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """A jet colour map of one word's attention, upsampled to the image and blended over it."""
    heat = cv2.resize(attention.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    heat = (255 * (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 0.5, colour, 0.5, 0)


class CaptionMedia(L.Callback):
    """Logs captioning media to TensorBoard (other loggers are left alone)."""

    def __init__(self, num_samples: int = 8):
        self.num_samples = num_samples

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end runs after the module has gathered every rank's predictions.
        board = tensorboard(trainer)
        takes_part = isinstance(pl_module, HasCaptionPredictions)
        predictions = list(pl_module.predictions["val"].values())[: self.num_samples] if takes_part else []
        if board is None or trainer.sanity_checking or not trainer.is_global_zero or not predictions:
            return
        step = trainer.global_step
        names = short_names([p["path"] for p in predictions])
        samples = [
            f"- **{name}**: {p['caption']}\n    - references: {' / '.join(p['references'])}"
            for name, p in zip(names, predictions)
        ]
        board.add_text("val/predictions", "\n".join(samples), step)
        for name, p in zip(names, predictions):
            card = with_caption(_tile(p["path"], CARD), p["caption"], CARD_TEXT, 3)
            board.add_image(f"val/captions/{name}", card, step, dataformats="HWC")
        if isinstance(pl_module, Attends):
            self._log_attention(board, trainer, pl_module, step)

    def _log_attention(self, board, trainer: L.Trainer, pl_module, step: int) -> None:
        examples = trainer.datamodule.val_examples(1) if isinstance(trainer.datamodule, ServesValExamples) else []
        if not examples:
            return
        example = examples[0]
        with torch.no_grad():
            words, attention = pl_module.attend(example["image"].to(pl_module.device))
        if attention is None or not words:
            return
        image = _tile(example["path"])
        maps = [attention_overlay(image, a.float().cpu().numpy()) for a in attention]
        panels = [with_caption(panel, word, CARD_TEXT, 1) for panel, word in zip([image, *maps], ["(image)", *words])]
        # Two columns: as wide as a captioned card, so that the words read at TensorBoard's default card size.
        board.add_image("val/attention", grid(panels, 2), step, dataformats="HWC")
