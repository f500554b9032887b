"""Training epochs of a captioner with a frozen ResNet-50 encoder: from images against from cached features.

The default CNN-RNN decoder on a frozen torchvision ResNet-50 (random weights), trained with its
`loss()` and AdamW in a plain loop over ShapesDataModule's train loader: the same generated shapes
images at 224 px, batch 16, the same initial weights, batch order and captions in both runs; one
run reads the images, the other `data.feature_cache` (built first, timed separately).

Prints the cache build time, every epoch's time and the first-step loss of both runs (equal up to
the fp16 rounding of the cached features), then `ratio: feature_cache_epoch_speedup = <best epoch
time from images / best epoch time from the cache>` (above 1: the cache is faster).

    python benchmarks/feature_cache.py [--images 64] [--epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from framework.allocator import keep_freed_memory
from framework.config import compose
from framework.preparation import model_inputs
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner


def build(args: argparse.Namespace, data_dir: str, feature_cache: str | None):
    """The shapes captioning task's data module and CNN-RNN captioner (conf/ gives every other setting), with a frozen
    ResNet-50 (random weights) and the benchmark's images."""
    cfg = compose(
        [
            "task=shapes_captioning",
            f"paths.data_dir={data_dir}",
            f"data.num_train={args.images}",
            "data.num_val=0",
            "data.num_test=0",
            "data.image_size=224",
            f"data.batch_size={args.batch_size}",
            "data.num_workers=0",
            f"data.feature_cache={feature_cache or 'null'}",
            "model.encoder.name=resnet50",
            "model.encoder.finetune=none",
            "model.scheduler=null",  # a plain loop: the optimizer alone
        ]
    )
    data = instantiate(cfg.data)
    return data, lambda: instantiate(cfg.model, **model_inputs(CNNRNNCaptioner, data))


def train(model: CNNRNNCaptioner, loader: DataLoader, epochs: int) -> tuple[float, list[float]]:
    """The first step's loss and the time of each epoch."""
    torch.manual_seed(0)  # the same batch order, captions and dropout in both runs
    optimizer = model.configure_optimizers()
    model.train()
    first_loss, times = None, []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            loss = model.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first_loss = loss.item() if first_loss is None else first_loss
        times.append(time.perf_counter() - start)
    return first_loss, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()  # as run.py does
    with tempfile.TemporaryDirectory() as tmp:
        from_images, build_model = build(args, tmp, None)
        from_cache, _ = build(args, tmp, f"{tmp}/cache")
        from_cache.prepare_data()
        torch.manual_seed(0)
        model = build_model()
        cached_model = copy.deepcopy(model)
        print(
            f"{args.images} shapes images at 224 px, batch {args.batch_size}, frozen ResNet-50, "
            f"{torch.get_num_threads()} threads"
        )

        start = time.perf_counter()
        from_cache.enable_feature_cache(cached_model.encoder)
        print(f"cache build: {time.perf_counter() - start:.2f} s")
        runs = {
            "images": train(model, from_images.train_dataloader(), args.epochs),
            "cache": train(cached_model, from_cache.train_dataloader(), args.epochs),
        }
    for name, (first_loss, times) in runs.items():
        epochs = ", ".join(f"{t:.2f}" for t in times)
        print(f"from {name:>6}: epochs {epochs} s | first-step loss {first_loss:.6f}")
    (image_loss, image_times), (cache_loss, cache_times) = runs["images"], runs["cache"]
    print(f"first-step loss difference: {abs(image_loss - cache_loss):.1e}")
    if abs(image_loss - cache_loss) > 1e-3:
        raise SystemExit("the first-step losses from images and from the cache differ")
    print(f"ratio: feature_cache_epoch_speedup = {min(image_times) / min(cache_times):.2f}")


if __name__ == "__main__":
    main()
