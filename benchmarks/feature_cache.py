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
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from datamodules.captions import ShapesDataModule
from framework.allocator import keep_freed_memory
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner

ROOT = Path(__file__).resolve().parents[1]


def frozen_resnet50_captioner(vocab: list[str]) -> CNNRNNCaptioner:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "cnn_rnn.yaml")
    encoder = {**cfg.encoder, "name": "resnet50", "finetune": "none"}
    return CNNRNNCaptioner(
        vocab=vocab, encoder=encoder, decoder=cfg.decoder, optimizer=cfg.optimizer, max_len=cfg.max_len
    )


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
        data = {
            "root": tmp,
            "num_train": args.images,
            "num_val": 0,
            "num_test": 0,
            "image_size": 224,
            "batch_size": args.batch_size,
            "num_workers": 0,
        }
        from_images = ShapesDataModule(**data)
        from_cache = ShapesDataModule(**data, feature_cache=f"{tmp}/cache")
        torch.manual_seed(0)
        model = frozen_resnet50_captioner(from_images.model_inputs()["vocab"])
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
