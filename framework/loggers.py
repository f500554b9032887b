"""The run's loggers as callbacks and modules use them; what the run's log (run.log) and TensorBoard hold."""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

# Records for the run's log alone (conf/hydra/default.yaml routes them to its file handler): what the console
# already shows through rich, e.g. the summary table.
RUN_LOG = logging.getLogger("framework.run_log")
# TensorBoard shows 10 steps per image or text card, sampled, unless told more (0, "all", shows none at all with its
# fast loader): enough for a validation at every epoch of long runs.
REVIEW_FLAGS = "--samples_per_plugin images=1000,text=1000"
# Not hyperparameters (where files go, which callbacks and loggers run): left out of TensorBoard's HPARAMS columns.
NOT_HPARAMS = ("paths.", "logger.", "callbacks.", "hydra.")


def tensorboard(trainer: L.Trainer) -> SummaryWriter | None:
    """The TensorBoard writer of the trainer's first TensorBoardLogger; None without one (e.g. logger=csv)."""
    return next((logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


def share_console_logs() -> None:
    """Make the run's log hold what the console shows from Python's logging, once.

    Warnings (Lightning's, torch's) become log records, so they reach run.log too. Lightning gives its `lightning`
    logger a console handler of its own, which prints every Lightning line a second time where the root logger has
    handlers already (Hydra's console and run.log): it is removed there.
    """
    logging.captureWarnings(True)
    if logging.getLogger().hasHandlers():
        lightning = logging.getLogger("lightning")
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)


def has_events(directory: Path) -> bool:
    return next(directory.rglob("events.out.tfevents.*"), None) is not None


def review_url(metrics: dict[str, float], optimized_metric: str | None) -> str:
    """TensorBoard's first page (TIME SERIES) with the losses and the optimised metric pinned on top: otherwise it
    begins with `epoch` and the learning rates. Its default address; TensorBoard prints the one it serves."""
    names = ["train/loss", "val/loss"]
    if optimized_metric and "/" in optimized_metric:
        names += [optimized_metric, "test/" + optimized_metric.split("/", 1)[1]]
    pinned = [{"plugin": "scalars", "tag": name} for name in dict.fromkeys(names) if name in metrics]
    cards = urllib.parse.quote(json.dumps(pinned, separators=(",", ":")), safe="/[]{}:,")
    return f"http://localhost:6006/?pinnedCards={cards}#timeseries"


def add_review_layout(trainer: L.Trainer, optimized_metric: str | None) -> None:
    """TensorBoard's CUSTOM SCALARS tab: the loss of every stage in one chart, then the optimised metric of every
    stage in one chart (TensorBoard's other tabs sort the tags alphabetically: `epoch` and learning rates first)."""
    board = tensorboard(trainer)
    if board is None:
        return
    name = optimized_metric.split("/", 1)[1] if optimized_metric and "/" in optimized_metric else "loss"
    charts = {chart: ["Multiline", [rf"^[^/]+/{re.escape(chart)}$"]] for chart in dict.fromkeys(["loss", name])}
    board.add_custom_scalars({"loss" if name == "loss" else f"loss and {optimized_metric}": charts})


def log_final_metrics(trainer: L.Trainer, config: dict[str, Any], metrics: dict[str, float]) -> None:
    """The final metrics in TensorBoard's HPARAMS tab, with the run's hyperparameters (`config`, flattened).

    The run is a session of the hparams plugin. Its metric columns are the last values of the run's scalars, so the
    final metrics are logged at the last step (where a scalar was last logged earlier, e.g. train/loss every
    log_every_n_steps). No experiment summary is written: TensorBoard then builds it from every session under its
    logdir, with the hyperparameters that differ between runs (a sweep's) first.
    """
    board = tensorboard(trainer)
    if board is None or not metrics or not trainer.is_global_zero:  # other ranks' experiment is a stand-in
        return
    for name, value in metrics.items():
        board.add_scalar(name, value, trainer.global_step)
    values = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in config.items()
        if not key.startswith(NOT_HPARAMS)
    }
    _, session_start, session_end = hparams(values, {})
    writer = board._get_file_writer()  # as Lightning's TensorBoardLogger.log_hyperparams writes them
    writer.add_summary(session_start)
    writer.add_summary(session_end)
    board.flush()
