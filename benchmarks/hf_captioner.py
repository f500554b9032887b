"""HFCaptioner's training step against a plain transformers loop, and what LoRA saves of the training state.

A BLIP with the sizes of Salesforce/blip-image-captioning-base (ViT-B/16 at 384 px, 12-layer BERT-base text decoder
with cross-attention, vocabulary 30524: a BertTokenizer over a written vocabulary of that size) and random weights
(nothing is downloaded) is saved with save_pretrained, with its processor, into a temporary folder; every model
below loads from that folder, so all start from the same weights.

1. `ratio: hf_captioner_vs_transformers_loop = <loop's seconds per step / ours>` (above 1: ours is faster).
   The loop is the one transformers' image-captioning guide (docs/transformers/tasks/image_captioning) writes:
   the processor called on the images and the texts, `labels = input_ids`, `model(**inputs, labels=labels)`,
   `loss.backward()`, AdamW step, zero_grad; with BLIP's prompt before each caption ("a picture of " + caption),
   padded to the longest text (the guide pads to max_length), so both sides read the same number of tokens. Ours
   is HFCaptioner (conf/model/blip.yaml) from the same folder: `loss(batch)` on a CaptionBatch of uint8 images and
   caption words, backward, the same AdamW step. Both get the same uint8 images and captions, and the processor
   runs inside the timed step on both sides (the guide runs it in the data set's transform, once per step all the
   same). Same optimizer (torch's AdamW, not fused, lr and weight decay of conf/model/blip.yaml), same precision
   (fp32, or --precision bf16-mixed: torch.autocast to bfloat16 around the forward and the loss on both sides).
   Ours runs with label_smoothing=0.0 (blip.yaml has 0.1) and the model's config has none either, so both compute
   plain cross-entropy; the losses still differ: the loop's is the mean over every token after the first, the
   prompt's included, ours over the caption's tokens and its [SEP] (the prompt masked, BLIP's [DEC] first instead of
   [CLS]). After one untimed step each, `--rounds` rounds of `--steps` steps of each side in turn (the side that
   goes first alternating); the median round's seconds per step of each side.
2. `ratio: lora_memory_saving = <training-state bytes of full fine-tuning / of LoRA>`: per process, parameters +
   the gradients of the trainable ones + AdamW's state (read from the optimizer after one step: exp_avg,
   exp_avg_sq, step), of HFCaptioner fine-tuning every weight against model.lora.rank=16, alpha 16 (the rest of
   conf/model/hf_captioner.yaml's model.lora: dropout 0.05, no DoRA, the language model only). Activations are
   not counted (they depend on batch and precision).

Prints the settings first (device, versions, the CPU's avx2 / avx512_bf16 / amx flags, batch, steps), the first-step
losses, the seconds per step of each round, then the ratios.

    python benchmarks/hf_captioner.py                      # CPU: batch 2, 3 rounds of 3 steps each side (~2.5 min)
    python benchmarks/hf_captioner.py --precision bf16-mixed
    python benchmarks/hf_captioner.py --device cuda --batch-size 32 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from datamodules.batches import CaptionBatch
from framework.config import model_settings

SETTINGS = model_settings("blip", scheduler=None)  # the recipe's learning rate and weight decay
BASE_TOWER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
VOCAB_SIZE = 30524  # BLIP-base: bert-base-uncased's 30522 and [DEC], [ENC]
IMAGE_SIZE = 384
PROMPT = "a picture of "  # conf/model/family/blip.yaml
WORDS = (
    "a man woman child dog cat bird horse car bus train plane boat table chair bed couch kitchen street field beach "
    "sitting standing walking riding holding eating playing looking next to on in of with near the red blue green "
    "white black small large two three people group some while and"
).split()
CAPTION_WORDS = 12


def save_blip_base(directory: Path) -> None:
    """A BLIP-base-sized model (random weights) and its processor (BlipProcessor: 384 px, a BertTokenizer over a
    vocabulary of BLIP-base's size), saved with save_pretrained."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    filler = [f"token{i}" for i in range(VOCAB_SIZE - len(special) - len(WORDS))]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join([*special, *WORDS, *filler]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")  # BLIP's decoder BOS, as in its checkpoints
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    config = BlipConfig(
        text_config={
            **BASE_TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "label_smoothing": 0.0,  # the loop's loss (the model's own): plain cross-entropy
        },
        vision_config={**BASE_TOWER, "image_size": IMAGE_SIZE, "patch_size": 16},
        projection_dim=512,
        image_text_hidden_size=256,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer).save_pretrained(
        directory
    )


def cpu_flags() -> str:
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return "CPU flags unknown"
    amx = sorted(flag for flag in flags if flag.startswith("amx"))
    return (
        f"avx2 {'yes' if 'avx2' in flags else 'no'}, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
        f"amx {'yes (' + ' '.join(amx) + ')' if amx else 'no'}"
    )


def hf_captioner(folder: Path, device: torch.device, lora_rank: int | None = None):
    from lightning_modules.captioning.hf import HFCaptioner

    settings = model_settings("blip", scheduler=None, pretrained=str(folder), label_smoothing=0.0)
    if lora_rank:
        settings["lora"] = {**settings["lora"], "rank": lora_rank, "alpha": 16}
    return HFCaptioner(**settings).to(device)


def adamw(parameters) -> torch.optim.AdamW:
    recipe = SETTINGS["optimizer"]
    return torch.optim.AdamW(
        [p for p in parameters if p.requires_grad], lr=recipe["lr"], weight_decay=recipe["weight_decay"]
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformersLoop:
    """The image-captioning guide's training step, for BLIP with its prompt."""

    def __init__(self, folder: Path, device: torch.device, autocast):
        self.model = AutoModelForImageTextToText.from_pretrained(folder).to(device)
        self.model.train()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.optimizer = adamw(self.model.parameters())
        self.device, self.autocast = device, autocast

    def inputs(self, images: torch.Tensor, captions: list[str]):
        texts = [PROMPT + caption for caption in captions]
        return self.processor(images=list(images), text=texts, padding="longest", return_tensors="pt").to(self.device)

    def step(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        inputs = self.inputs(images, captions)
        labels = inputs["input_ids"]
        with self.autocast():
            outputs = self.model(**inputs, labels=labels)
        outputs.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return outputs.loss.detach()


class Ours:
    """HFCaptioner's loss on a CaptionBatch, backward, the same AdamW."""

    def __init__(self, folder: Path, device: torch.device, autocast):
        self.module = hf_captioner(folder, device)
        self.optimizer = adamw(self.module.parameters())
        self.autocast = autocast

    def step(self, batch: CaptionBatch) -> torch.Tensor:
        with self.autocast():
            loss = self.module.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def seconds_per_step(step, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def training_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters (all), gradients (of the trainable ones, as backward leaves them) and the optimizer's state
    tensors, in bytes: read after a step, before zero_grad."""
    parameters = list(module.parameters())  # shared (tied) parameters once
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {
        "parameters": sum(size(p) for p in parameters),
        "gradients": sum(size(p.grad) for p in parameters if p.requires_grad and p.grad is not None),
        "optimizer": sum(
            size(value) for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ),
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
    }


def stepped_state(module, batch: CaptionBatch, autocast) -> dict[str, int]:
    """One training step of `module` with a fresh AdamW; the training state read before zero_grad."""
    optimizer = adamw(module.parameters())
    with autocast():
        loss = module.loss(batch)
    loss.backward()
    optimizer.step()
    state = training_state_bytes(module, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return state


def describe(name: str, state: dict[str, int]) -> str:
    mib = {key: value / 2**20 for key, value in state.items() if key != "trainable"}
    total = sum(mib.values())
    return (
        f"{name}: {state['trainable'] / 1e6:.2f}M trainable parameters; parameters {mib['parameters']:.0f} MiB + "
        f"gradients {mib['gradients']:.0f} MiB + AdamW state {mib['optimizer']:.0f} MiB = {total:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    args = parser.parse_args()
    device = torch.device(args.device)
    transformers.utils.logging.disable_progress_bar()  # loading and saving bars
    started = time.perf_counter()

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    hardware = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"settings: device {device} ({hardware}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{cpu_flags()}; BLIP-base-sized, {IMAGE_SIZE} px, batch {args.batch_size}, {args.rounds} rounds x "
        f"{args.steps} steps per side, precision {args.precision}, AdamW lr {SETTINGS['optimizer']['lr']} "
        f"weight decay {SETTINGS['optimizer']['weight_decay']}"
    )

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    images = images.to(device)
    tokens = [
        [WORDS[i] for i in torch.randint(len(WORDS), (CAPTION_WORDS,), generator=generator).tolist()]
        for _ in range(args.batch_size)
    ]
    captions = [" ".join(words) for words in tokens]
    batch = CaptionBatch(size=args.batch_size, images=images, tokens=tokens)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_blip_base(folder)
        loop = TransformersLoop(folder, device, autocast)
        ours = Ours(folder, device, autocast)
        parameters = sum(p.numel() for p in loop.model.parameters()) / 1e6
        print(f"model: {parameters:.0f}M parameters, random weights, saved and loaded from one folder by both sides")
        loop_tokens = loop.inputs(images, captions)["input_ids"].shape[1]
        ids, _ = ours.module.caption_ids(ours.module.caption_texts(batch))
        print(
            f"tokens per text: loop {loop_tokens} ([CLS] prompt caption [SEP]); ours "
            f"{len(ours.module.tokenizer(PROMPT)['input_ids']) - 1} + {ids.shape[1]} ([DEC] prompt, caption [SEP])"
        )

        # The warm-up step of each also gives its loss on the first batch, from the same weights.
        first_loop = float(loop.step(images, captions))
        first_ours = float(ours.step(batch))
        print(
            f"first-step loss: transformers loop {first_loop:.4f} (model's own loss: mean over every token after the "
            f"first, prompt included), ours {first_ours:.4f} (caption tokens and [SEP] only, label smoothing 0.0)"
        )

        sides = {
            "transformers loop": functools.partial(loop.step, images, captions),
            "ours (HFCaptioner)": functools.partial(ours.step, batch),
        }
        times = {name: [] for name in sides}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                times[name].append(seconds_per_step(sides[name], args.steps, device))
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{name} {times[name][-1]:.3f} s/step" for name in sides)
                + f" ({order[0]} first)"
            )
        medians = {name: statistics.median(values) for name, values in times.items()}
        rates = [f"{name} {value:.3f} ({args.batch_size / value:.2f} images/s)" for name, value in medians.items()]
        print("median seconds per step: " + ", ".join(rates))

        # Training state: ours (full fine-tuning, already stepped) against LoRA rank 16, same folder.
        # (a fresh AdamW and one more step: gradients are read before zero_grad, which sets them to None)
        del sides, loop
        ours.optimizer = None
        full = stepped_state(ours.module, batch, autocast)
        del ours
        lora_module = hf_captioner(folder, device, lora_rank=16)
        lora = stepped_state(lora_module, batch, autocast)
    print(describe("full fine-tuning", full))
    print(describe("LoRA rank 16", lora))

    total = lambda state: state["parameters"] + state["gradients"] + state["optimizer"]  # noqa: E731
    ratio = medians["transformers loop"] / medians["ours (HFCaptioner)"]
    print(f"ratio: hf_captioner_vs_transformers_loop = {ratio:.2f}")
    print(f"ratio: lora_memory_saving = {total(full) / total(lora):.2f}")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
