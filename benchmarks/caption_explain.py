"""Words explained per second (as task=caption_explain computes the maps) for a batch of images against one image
at a time.

    python benchmarks/caption_explain.py                 # shapes-sized CNN-RNN (conf/model/cnn_rnn.yaml), 64 px, CPU
    python benchmarks/caption_explain.py --device cuda --images 64 --batch-size 64

Weights are random (speed does not depend on them; nothing is downloaded): the captioner is conf/model/cnn_rnn.yaml's,
saved as a checkpoint in a temporary folder and explained with conf/model/caption_explain.yaml's settings (without the
randomisation check); captions are the greedy ones of those weights, `--max-len` words at most. Ends with one line
per method, `ratio: caption_explain_batching_<method> = <time one image at a time / time batched>`, then the same for
all the methods together (what one task=caption_explain run computes): `ratio: caption_explain_batching = ...`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from saliency import timed  # benchmarks/saliency.py, next to this script

from datamodules.shapes import COLOURS, SHAPES, SIZES
from framework.config import model_settings
from framework.text import Vocabulary
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.explain.caption_explain import CAPTION_METHODS, CaptionExplainModule

DEFAULT_METHODS = model_settings("caption_explain")["methods"]


def random_captioner(folder: Path, image_size: int, max_len: int) -> Path:
    """A CNN-RNN captioner of conf/model/cnn_rnn.yaml with random weights and a shapes vocabulary, saved as training
    saves it (the checkpoint model.captioner names)."""
    vocab = [*Vocabulary.SPECIALS, *SHAPES, *COLOURS, *SIZES, "a", "the", "of", "is", "left", "right", "above"]
    settings = model_settings("cnn_rnn", vocab=vocab, image_size=image_size, max_len=max_len, scheduler=None)
    settings.pop("_recursive_", None)
    captioner = CNNRNNCaptioner(**settings)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(captioner)
    trainer.save_checkpoint(folder / "captioner.ckpt", weights_only=True)
    return folder / "captioner.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=CAPTION_METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many timings counts")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        settings = model_settings(
            "caption_explain",
            captioner=str(random_captioner(Path(folder), args.image_size, args.max_len)),
            methods=list(args.methods),
            randomisation=False,
            image_size=args.image_size,
            object_words=None,
        )
        module = CaptionExplainModule(**settings).to(device).eval()
    pixels = torch.rand(args.images, 3, args.image_size, args.image_size, device=device)

    def explain(method: str, batch_size: int) -> int:
        """The maps of every word of every image, `batch_size` images at a time; the number of words."""
        explained = 0
        for start in range(0, args.images, batch_size):
            batch = pixels[start : start + batch_size]
            generated = module.scorer.generate(batch)
            rows = [{"image": str(i), "caption": " ".join(words)} for i, words in enumerate(generated.words)]
            words = module._words(batch, generated, rows)
            module._maps(method, module.scorer, module.attributions, batch, generated.tokens, words)
            explained += len(words.positions)
        return explained

    print(f"CNN-RNN {args.image_size}px, {args.images} images, device {device}, torch {torch.__version__}")
    times = {}  # method: (batched, one image at a time), seconds
    for method in args.methods:
        count = explain(method, args.batch_size)  # warm-up, and the number of words
        batched = min(timed(lambda: explain(method, args.batch_size), device) for _ in range(args.repeats))
        single = min(timed(lambda: explain(method, 1), device) for _ in range(args.repeats))
        times[method] = batched, single
        print(
            f"{method:22s} {count} words  batched ({args.batch_size}): {count / batched:8.1f} words/s   "
            f"one image at a time: {count / single:8.1f} words/s"
        )
    for method, (batched, single) in times.items():
        print(f"ratio: caption_explain_batching_{method} = {single / batched:.2f}")
    batched, single = (sum(column) for column in zip(*times.values()))
    print(f"ratio: caption_explain_batching = {single / batched:.2f}")


if __name__ == "__main__":
    main()
