"""Stop a run at the first NaN or infinite training loss or weights, or at a loss that has grown far past its first
value (a diverging run), leaving the last finite weights."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from framework.errors import UserError
from framework.schema import PositiveFloat

ADVICE = "Lower model.optimizer.lr, set trainer.gradient_clip_val, or check that batch's data."


class NonFiniteLossGuard(L.Callback):
    """Stops training with a UserError naming the step, with the last finite weights put back, so that the checkpoint
    saved on the way out (last_checkpoint's save_on_exception) holds them.

    The loss is checked before backward, so that step never reaches the weights. A step can also make them
    non-finite from a finite loss (a learning rate far too large): the weights are checked after each optimizer
    step and copied while finite. That copy (trainable parameters and floating-point buffers, where they live) is
    what this costs: its memory (with Adam five copies of the trainable weights instead of four; with LoRA only the
    adapters), per optimizer step one pass to check and one to copy (less than Adam's step reads), and under
    DDP/FSDP a scalar all-reduce per check, so that every rank stops at the same step. The optimizer states and step
    count saved are those after the failed step.
    """

    def __init__(self, divergence_factor: PositiveFloat | None):
        """`divergence_factor`: stop once |train/loss| exceeds this many times the first (nonzero) |train/loss| of
        the fit; None: only non-finite values stop a run."""
        self.divergence_factor = divergence_factor
        self.copy: list[torch.Tensor] = []  # the weights after optimizer step `self.step`, checked finite
        self.step = -1
        self.first_loss: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.copy = [tensor.clone() for _, tensor in weights(pl_module)]
        self.step = trainer.global_step
        self.first_loss = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not all_finite(trainer, [loss.detach()]):
            value = loss.detach().float().cpu().item()
            shown = value if not math.isfinite(value) else "not finite on another rank"
            self.restore(pl_module)  # the forward pass may have changed buffers (BatchNorm statistics)
            raise UserError(
                f"train/loss is {shown} at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
                f"{trainer.fit_loop.epoch_loop.batch_idx}); the run stopped before the weights changed. {ADVICE}"
            )
        if self.divergence_factor is not None:
            self.check_divergence(trainer, pl_module, float(loss.detach().float().abs()))

    def check_divergence(self, trainer: L.Trainer, pl_module: L.LightningModule, magnitude: float) -> None:
        if self.first_loss is None and magnitude > 0:
            self.first_loss = magnitude
        diverged = self.first_loss is not None and magnitude > self.divergence_factor * self.first_loss
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):  # any rank
            self.restore(pl_module)
            raise UserError(
                f"train/loss reached {magnitude:.4g} at global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}), more than {self.divergence_factor:g} times its first value "
                f"{self.first_loss:.4g}: the run diverged and stopped (callbacks.nonfinite_loss.divergence_factor="
                f"{self.divergence_factor:g}; null turns this check off). The likely cause is the learning rate: lower "
                "model.optimizer.lr, or set trainer.gradient_clip_val"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # no optimizer step in this batch (gradient accumulation)
            return
        named = weights(pl_module)
        tensors = [tensor for _, tensor in named]
        if all_finite(trainer, tensors):
            if same_shapes(self.copy, tensors):
                torch._foreach_copy_(self.copy, tensors)
            else:  # the module replaced tensors (style transfer's image at its next scale)
                self.copy = [tensor.clone() for tensor in tensors]
            self.step = trainer.global_step
            return
        bad = [name for name, tensor in named if not torch.isfinite(tensor).all()]
        self.restore(pl_module)
        raise UserError(
            f"the weights are not finite after the optimizer step at global step {self.step} (epoch "
            f"{trainer.current_epoch}, batch {batch_idx}; {len(bad)} of {len(named)} tensors, e.g. "
            f"{', '.join(bad[:3]) or 'on another rank'}); the run stopped with the weights from before that step. "
            f"{ADVICE}"
        )

    def restore(self, pl_module: L.LightningModule) -> None:
        tensors = [tensor for _, tensor in weights(pl_module)]
        if same_shapes(tensors, self.copy):  # else the module replaced them since the copy, with finite ones
            torch._foreach_copy_(tensors, self.copy)


def same_shapes(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
    return [t.shape for t in tensors] == [t.shape for t in others]


def weights(pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
    """What training changes: the trainable parameters and the floating-point buffers (this rank's shard of sharded
    ones), detached: writing them writes the module's."""
    named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
    named += [(name, b) for name, b in pl_module.named_buffers() if b.is_floating_point()]
    return [(name, (t.to_local() if isinstance(t, DTensor) else t).detach()) for name, t in named]


def all_finite(trainer: L.Trainer, tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite, on every rank (one synchronisation)."""
    # The largest magnitude: NaN when any element is NaN, and no overflow. Empty shards (a rank's share of a small
    # sharded tensor) have none, and would raise on this rank alone while the others wait for it.
    largest = torch.nn.utils.get_total_norm([t for t in tensors if t.numel()], norm_type=math.inf)
    return trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(largest)), all=True)
