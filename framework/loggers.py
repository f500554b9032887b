"""The run's loggers as callbacks and modules use them."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter


def tensorboard(trainer: L.Trainer) -> SummaryWriter | None:
    """The TensorBoard writer of the trainer's first TensorBoardLogger; None without one (e.g. logger=csv)."""
    return next((logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
