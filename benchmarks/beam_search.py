"""Our batched beam search against Show-Attend-Tell's own per-image beam search, on the CPU.

Peer: sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning caption.py `caption_image_beam_search` (commit 01f749f):
one image at a time, its encoder output expanded to k rows, k shrinking as hypotheses emit <end> (they are
set aside with their scores, the best of them wins), at most 51 words. Written again here from reading it,
on the same decoder as ours; as in SAT's Attention module, the encoder output is projected again at every
step. Left out in its favour: the attention maps it also gathers for every hypothesis (ours returns none).

Sizes are SAT's: 9,487 words, 512-d embedding, LSTM and attention, a 14x14 grid of 2048 ResNet channels,
beam 5; random weights, the same for both, and the same random encoder features (the encoder runs once per
image either way, so it is left out). Both decode up to 51 words; the captions are compared (counted).

Prints the peer and the settings first. SAT's loop decodes one image at a time, so its images/s does not depend on
how many images it is given: it is timed on the first --sat-images of the features (its loop is slow on a CPU),
ours on all --images of them at once (a batch, as evaluation decodes; data.eval_batch_size is 64), and ours also
one image at a time on SAT's images, which tells what batching adds from what projecting the encoder output once
and sharing it among the beams adds. The captions of the images both decoded are compared. Then
`ratio: beam_vs_show_attend_tell = our images/s (batched) / SAT's` (above 1: ours is faster).

    python benchmarks/beam_search.py [--images 20] [--sat-images 3] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from framework.allocator import keep_freed_memory
from framework.config import model_settings
from lightning_modules.captioning.decoding import beam_search
from lightning_modules.captioning.nets import RNNDecoder

COMMIT = "01f749f503c01e2698fdf77287480892b6d07610"
PEER = "Show-Attend-Tell tutorial (sgrvinod), caption_image_beam_search: one image at a time, written again here"
SOURCE = f"https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning/blob/{COMMIT}/caption.py"
VOCAB, GRID, CHANNELS, BEAM, BOS, EOS = 9487, 14 * 14, 2048, 5, 1, 2
MAX_WORDS = 51  # SAT stops after step 51; our max_len counts the words before <eos>: 50 (+1)


@torch.no_grad()
def show_attend_tell_beam_search(decoder: RNNDecoder, features: torch.Tensor, k: int) -> list[int]:
    """caption_image_beam_search for one image's features [N, C]; returns the words after <start>."""
    encoder_out = features[None].expand(k, -1, -1)
    _, (h, c) = decoder.start(encoder_out)
    previous = torch.full((k,), BOS, dtype=torch.long)
    sequences, top_scores = previous[:, None], torch.zeros(k, 1)
    complete, complete_scores = [], []
    for step in range(1, MAX_WORDS + 1):
        memory = (encoder_out, decoder.attention.feature_proj(encoder_out))
        logits, (h, c), _ = decoder.step(previous, memory, (h, c))
        scores = top_scores.expand_as(logits) + logits.log_softmax(dim=1)
        # at the first step the k rows are the same: expand only the first
        top_scores, top_words = (scores[0] if step == 1 else scores.view(-1)).topk(k)
        rows, words = top_words // VOCAB, top_words % VOCAB
        sequences = torch.cat([sequences[rows], words[:, None]], dim=1)
        ended = words == EOS
        complete += sequences[ended].tolist()
        complete_scores += top_scores[ended].tolist()
        k -= int(ended.sum())
        if k == 0:
            break
        going = (~ended).nonzero().flatten()
        sequences, top_scores, previous = sequences[going], top_scores[going, None], words[going]
        h, c, encoder_out = h[rows[going]], c[rows[going]], encoder_out[rows[going]]
    if not complete:  # SAT's max() of no scores would raise here: the best live hypothesis, as ours returns
        complete, complete_scores = sequences.tolist(), top_scores.flatten().tolist()
    return complete[complete_scores.index(max(complete_scores))][1:]


def trim(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="decoded by ours at once")
    parser.add_argument("--sat-images", type=int, default=3, help="the first of them, decoded one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, taking turns, after an untimed one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not 1 <= args.sat_images <= args.images:
        parser.error(f"--sat-images must be between 1 and --images ({args.images}), got {args.sat_images}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as run.py does
    torch.manual_seed(0)
    print(f"peer: {PEER}")
    print(f"source: {SOURCE}")
    print(f"commit: {COMMIT}")
    print(
        f"settings: vocabulary {VOCAB}, 512-d decoder, {GRID} x {CHANNELS} encoder grid, beam {BEAM}, up to "
        f"{MAX_WORDS} words, random weights; ours on {args.images} images at once, SAT's loop and ours one at a "
        f"time on the first {args.sat_images}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}",
        flush=True,
    )
    sizes = {"embed_dim": 512, "hidden_dim": 512, "attention_dim": 512}  # SAT's; the rest: conf/model/cnn_rnn.yaml
    decoder = RNNDecoder(VOCAB, CHANNELS, **{**model_settings("cnn_rnn", scheduler=None)["decoder"], **sizes}).eval()
    features = torch.randn(args.images, GRID, CHANNELS).relu()
    one_at_a_time = features[: args.sat_images]

    def ours(images: torch.Tensor) -> list[list[int]]:
        return [trim(row) for row in beam_search(decoder, images, BOS, EOS, MAX_WORDS - 1, BEAM).tolist()]

    runs = {  # name: (images, run)
        "Show-Attend-Tell's per-image loop": (
            len(one_at_a_time),
            lambda: [show_attend_tell_beam_search(decoder, f, BEAM) for f in one_at_a_time],
        ),
        "ours, one image at a time": (len(one_at_a_time), lambda: [ours(f[None])[0] for f in one_at_a_time]),
        f"ours, {args.images} images at once": (args.images, lambda: ours(features)),
    }
    times, captions = {name: [] for name in runs}, {}
    for repeat in range(args.repeats + 1):  # the first, untimed, warms up the allocator and the kernels
        for name, (_, run) in runs.items():
            start = time.perf_counter()
            captions[name] = run()
            if repeat:
                times[name].append(time.perf_counter() - start)
    rate = {name: images / statistics.median(times[name]) for name, (images, _) in runs.items()}
    sat = captions["Show-Attend-Tell's per-image loop"]
    for name, caption_list in captions.items():
        same = sum(a == b for a, b in zip(sat, caption_list))
        ended = sum(EOS in caption for caption in caption_list)
        print(
            f"{name}: {rate[name]:.2f} images/s; captions the same as SAT's {same}/{len(sat)}, "
            f"{ended}/{len(caption_list)} ended with <eos> before {MAX_WORDS} words"
        )
    batched, sat_rate = rate[f"ours, {args.images} images at once"], rate["Show-Attend-Tell's per-image loop"]
    print(f"ratio: beam_vs_show_attend_tell = {batched / sat_rate:.2f}")


if __name__ == "__main__":
    main()
