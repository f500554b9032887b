"""TensorBoard review of a captioner after each validation epoch.

- text: a table of sample predictions against their references;
- image: a grid of validation images, each captioned with its prediction;
- image: for attention decoders, one fixed validation image with a heat map per generated word.
"""

from __future__ import annotations

import cv2
import lightning as L
import numpy as np
import torch

from datamodules.images import load_rgb
from framework.contracts import Attends, HasCaptionPredictions, ServesValExamples
from framework.loggers import tensorboard

TILE = 160  # pixels per panel
CAPTION_BAND = 36


def _tile(path: str) -> np.ndarray:
    return cv2.resize(np.asarray(load_rgb(path)), (TILE, TILE), interpolation=cv2.INTER_AREA)


def with_caption(image: np.ndarray, text: str) -> np.ndarray:
    """The image above a white band holding `text` (wrapped to two lines)."""
    band = np.full((CAPTION_BAND, image.shape[1], 3), 255, np.uint8)
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        width = cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)[0][0]
        if width > image.shape[1] - 6 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    for row, line in enumerate(lines[:2]):
        cv2.putText(band, line, (3, 14 + 15 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([image, band], axis=0)


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

    def __init__(self, num_samples: int = 8, columns: int = 4):
        self.num_samples, self.columns = num_samples, columns

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end runs after the module has gathered every rank's predictions.
        board = tensorboard(trainer)
        takes_part = isinstance(pl_module, HasCaptionPredictions)
        predictions = list(pl_module.predictions["val"].values())[: self.num_samples] if takes_part else []
        if board is None or trainer.sanity_checking or not trainer.is_global_zero or not predictions:
            return
        step = trainer.global_step
        table = ["| image | prediction | references |", "|---|---|---|"]
        table += [
            f"| {p['path'].rsplit('/', 1)[-1]} | {p['caption']} | {' / '.join(p['references'])} |" for p in predictions
        ]
        board.add_text("val/predictions", "\n".join(table), step)
        panels = [with_caption(_tile(p["path"]), p["caption"]) for p in predictions]
        board.add_image("val/captions", grid(panels, self.columns), step, dataformats="HWC")
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
        panels = [with_caption(image, "(image)")]
        panels += [with_caption(attention_overlay(image, a.float().cpu().numpy()), w) for w, a in zip(words, attention)]
        board.add_image("val/attention", grid(panels, min(len(panels), 6)), step, dataformats="HWC")
