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

import lightning as L
import torch

from framework.contracts import HasCaptionPredictions
from framework.loggers import tensorboard
from framework.rendering import attention_overlay, grid, short_names, tile, with_caption
from framework.schema import PositiveInt

CARD = 320  # pixels per captioned validation image: narrower than TensorBoard's default card, so shown 1:1
CARD_TEXT = 0.6  # cv2 font scale of its caption: letters about 13 pixels high


class CaptionMedia(L.Callback):
    """Logs captioning media to TensorBoard (other loggers are left alone)."""

    def __init__(self, num_samples: PositiveInt):
        """`num_samples`: the validation predictions shown, each with its image."""
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
            card = with_caption(tile(p["path"], CARD), p["caption"], CARD_TEXT, 3)
            board.add_image(f"val/captions/{name}", card, step, dataformats="HWC")
        if hasattr(pl_module, "attend"):  # attention decoders: attend(image) -> words, maps
            self._log_attention(board, trainer, pl_module, step)

    def _log_attention(self, board, trainer: L.Trainer, pl_module, step: int) -> None:
        examples = trainer.datamodule.val_examples(1) if hasattr(trainer.datamodule, "val_examples") else []
        if not examples:
            return
        example = examples[0]
        with torch.no_grad():
            words, attention = pl_module.attend(example["image"].to(pl_module.device))
        if attention is None or not words:
            return
        image = tile(example["path"])
        maps = [attention_overlay(image, a.float().cpu().numpy()) for a in attention]
        panels = [with_caption(panel, word, CARD_TEXT, 1) for panel, word in zip([image, *maps], ["(image)", *words])]
        # Two columns: as wide as a captioned card, so that the words read at TensorBoard's default card size.
        board.add_image("val/attention", grid(panels, 2), step, dataformats="HWC")
