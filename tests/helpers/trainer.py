"""A Lightning Trainer for the tests that train in-process: on the CPU, nothing printed or written unless asked."""

from __future__ import annotations

import lightning as L


def quiet_trainer(**settings) -> L.Trainer:
    """`settings` go to L.Trainer and win over these: no logger, checkpoints, progress bar or model summary."""
    quiet = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**quiet, **settings})
