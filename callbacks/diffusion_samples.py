"""TensorBoard review of a text-to-image model: after each validation (and test) run, one image per
prompt, tagged `<stage>/samples/<prompt>`, holding that prompt's images for every seed side by side
(the same seeds every time, so successive steps show how the model changes)."""

from __future__ import annotations

import lightning as L
import numpy as np

from framework.loggers import tensorboard
from framework.schema import PositiveInt


class DiffusionSamples(L.Callback):
    """Reads `pl_module.generated[stage]`: rows {"prompt", "seed", "image" (PIL)}, every rank's, in order."""

    def __init__(self, tile: PositiveInt):
        """`tile`: the side in pixels of each image in the row (conf/callbacks/diffusion_samples.yaml)."""
        self.tile = tile

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        board = tensorboard(trainer)
        rows = getattr(pl_module, "generated", {}).get(stage, [])  # DreamBooth's images of the stage
        if board is None or trainer.sanity_checking or not trainer.is_global_zero or not rows:
            return
        by_prompt: dict[str, list[np.ndarray]] = {}
        for row in sorted(rows, key=lambda r: r["seed"]):
            by_prompt.setdefault(row["prompt"], []).append(np.asarray(row["image"].resize((self.tile, self.tile))))
        for prompt, images in by_prompt.items():
            board.add_image(
                f"{stage}/samples/{prompt}", np.concatenate(images, axis=1), trainer.global_step, dataformats="HWC"
            )
