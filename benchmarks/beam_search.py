"""Batched beam search against decoding one image at a time, on the CPU.

Both decode the same encoder features with the same decoder and must give the same captions; the
encoder is left out (it runs once per image either way). Two decoders:

- shapes: conf/model/cnn_rnn.yaml as `python run.py` trains it (random weights, or --ckpt a trained one);
- show-attend-tell: the COCO-size decoder of Xu et al. 2015 (9,487 words, 512-d embedding, LSTM and
  attention, ResNet-50 7x7x2048 grid), random weights.

Prints images/s for beam 3 and 5, then one `ratio:` line per decoder and beam size
(one-at-a-time time / batched time; above 1: batched is faster).

    python benchmarks/beam_search.py [--images 100] [--ckpt outputs/.../checkpoints/last.ckpt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from framework.allocator import keep_freed_memory
from lightning_modules.captioning.decoding import beam_search
from lightning_modules.captioning.nets import RNNDecoder

ROOT = Path(__file__).resolve().parents[1]
SHAPES_VOCAB = 30


def shapes_decoder(images: int, ckpt: str | None) -> tuple[RNNDecoder, torch.Tensor, int]:
    """The default captioner's decoder and its encoder's features for random 64 px images."""
    from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner

    if ckpt:
        model = CNNRNNCaptioner.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    else:
        cfg = OmegaConf.load(ROOT / "conf" / "model" / "cnn_rnn.yaml")
        vocab = ["<pad>", "<bos>", "<eos>", "<unk>", *(f"w{i}" for i in range(SHAPES_VOCAB - 4))]
        model = CNNRNNCaptioner(
            vocab=vocab, encoder=cfg.encoder, decoder=cfg.decoder, optimizer={}, max_len=cfg.max_len
        )
    model.eval()
    with torch.no_grad():
        features, _ = model.encode(torch.randn(images, 3, 64, 64))
    return model.decoder, features, model.hparams.max_len


def show_attend_tell_decoder(images: int) -> tuple[RNNDecoder, torch.Tensor, int]:
    decoder = RNNDecoder(vocab_size=9487, feature_dim=2048, embed_dim=512, hidden_dim=512, attention_dim=512)
    return decoder.eval(), torch.randn(images, 49, 2048).relu(), 20


def fastest(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the least disturbed by other work), and the result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def trim(row: torch.Tensor, eos: int = 2) -> list[int]:
    tokens = row.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ckpt", help="a trained CNNRNNCaptioner checkpoint for the shapes decoder")
    args = parser.parse_args()
    keep_freed_memory()  # as run.py does
    torch.manual_seed(0)
    print(f"{args.images} images, {torch.get_num_threads()} threads, best of {args.repeats}")

    ratios = {}
    for name, (decoder, features, max_len) in {
        "shapes": shapes_decoder(args.images, args.ckpt),
        "show_attend_tell": show_attend_tell_decoder(args.images),
    }.items():
        for beam in (3, 5):
            decode = lambda batch: beam_search(decoder, batch, 1, 2, max_len, beam)  # noqa: E731
            batched_time, batched = fastest(lambda: decode(features), args.repeats)
            single_time, single = fastest(lambda: [decode(f[None])[0] for f in features], args.repeats)
            same = sum(trim(a) == trim(b) for a, b in zip(batched, single))
            print(
                f"{name:>16} beam {beam}: batched {args.images / batched_time:8.1f} images/s | "
                f"one at a time {args.images / single_time:8.1f} images/s | same captions {same}/{args.images}"
            )
            if same != args.images:
                raise SystemExit(f"{name} beam {beam}: batched and one-at-a-time decoding disagree")
            ratios[f"{name}_beam{beam}_batched_vs_one_at_a_time"] = single_time / batched_time
    for name, ratio in ratios.items():
        print(f"ratio: {name} = {ratio:.2f}")


if __name__ == "__main__":
    main()
