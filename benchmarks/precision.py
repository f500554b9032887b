"""Training throughput of a task at fp32 against bf16-mixed, built from the same config tree as run.py.

    python benchmarks/precision.py trainer=gpu                      # the default task: shapes captioner
    python benchmarks/precision.py trainer=gpu task=blip_shapes model.pretrained=DIR

For each precision the task's data module and model are built from the composed config (same seed) and
trained for `--epochs` epochs without validation, checkpoints or loggers; the last epoch is timed (the
first one warms up: cuDNN autotuning, allocator, data workers). Prints the training images/s of both, then
`ratio: bf16_mixed_speedup = <fp32 epoch time / bf16-mixed epoch time>` (above 1: bf16-mixed is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class

from framework.allocator import keep_freed_memory
from framework.config import compose
from framework.preparation import model_inputs
from framework.runner import build_trainer, instantiate


class EpochTimer(L.Callback):
    """Wall time and batch count of every training epoch (the device synchronised at both ends)."""

    def __init__(self):
        self.epochs: list[tuple[float, int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.start, self.batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.epochs.append((time.perf_counter() - self.start, self.batches))

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()


def last_epoch(overrides: list[str], precision: str, epochs: int, workdir: Path) -> tuple[float, int, int]:
    """(seconds, batches, global batch size) of the last of `epochs` training epochs at `precision`."""
    cfg = compose(
        [
            f"paths.log_dir={workdir}",
            "callbacks=none",
            f"trainer.precision={precision}",
            f"trainer.max_epochs={epochs}",
            "trainer.limit_val_batches=0",
            "+trainer.enable_checkpointing=false",
            "+trainer.enable_progress_bar=false",
            *overrides,
        ],
        output_dir=workdir,
    )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, **model_inputs(get_class(cfg.model._target_), datamodule))
    timer = EpochTimer()
    trainer = build_trainer(cfg, with_loggers=False)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    seconds, batches = timer.epochs[-1]
    return seconds, batches, cfg.data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for run.py")
    args = parser.parse_args()
    keep_freed_memory()
    times = {}
    with tempfile.TemporaryDirectory() as workdir:
        for precision in ("32-true", "bf16-mixed"):
            seconds, batches, batch_size = last_epoch(args.overrides, precision, args.epochs, Path(workdir))
            times[precision] = seconds
            print(
                f"{precision:>10}: {batches} steps of {batch_size} images in {seconds:.2f} s = "
                f"{batches * batch_size / seconds:.1f} images/s"
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; overrides: {' '.join(args.overrides) or '(none)'}")
    print(f"ratio: bf16_mixed_speedup = {times['32-true'] / times['bf16-mixed']:.2f}")


if __name__ == "__main__":
    main()
