"""Stop a run at the first NaN or infinite training loss, before it reaches the weights."""

from __future__ import annotations

import lightning as L
import torch

from framework.errors import UserError


class NonFiniteLossGuard(L.Callback):
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Before backward, so the optimizer never steps on NaN gradients and the checkpoint saved on
        # the way out (last_checkpoint, save_on_exception) holds the last finite weights.
        if not torch.isfinite(loss).all():
            raise UserError(
                f"train/loss is {loss.detach().float().cpu().item()} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}); the run stopped "
                "before the weights changed. Lower model.optimizer.lr, set trainer.gradient_clip_val, "
                "or check that batch's data."
            )
