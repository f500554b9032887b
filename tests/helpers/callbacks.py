"""Callbacks that tests add to a run from the command line (`+callbacks.NAME._target_=tests.helpers.callbacks.X`):
breaking it on purpose, or recording what it trained on.

python run.py +callbacks.fault._target_=tests.helpers.callbacks.SignalAtStep +callbacks.fault.step=12
"""

import os
import signal as signals

import lightning as L
import torch


class SignalAtStep(L.Callback):
    """Sends `signal` (SIGTERM: a preemption; SIGINT: Ctrl-C) to this process once, after the optimizer step that
    reaches `step`; with `rank`, only in that rank's process."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None):
        self.step, self.signal, self.rank, self.sent = step, signals.Signals[signal], rank, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent and self.rank in (None, trainer.global_rank):
            self.sent = True
            os.kill(os.getpid(), self.signal)


class NanLossAtStep(L.Callback):
    """Turns the training loss into NaN at `step` (as an exploding loss would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            original = pl_module.training_loss
            pl_module.training_loss = lambda b: original(b) * torch.tensor(float("nan"))


class InfiniteGradientAtStep(L.Callback):
    """Makes one gradient element infinite before the optimizer step `step` (as an overflowing backward would, with
    a finite loss): the step turns weights into NaN or Inf."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            gradient = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            gradient.view(-1)[0] = float("inf")


class RecordBatches(L.Callback):
    """Saves what every training batch held (a list of dicts) to `path` when training ends."""

    def __init__(self, path: str):
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.batches, self.path)
