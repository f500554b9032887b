"""Training throughput of a BLIP-base-sized captioner: fp32 against bf16-mixed, with and without gradient checkpointing.

transformers' BlipForConditionalGeneration with the sizes of Salesforce/blip-image-captioning-base (ViT-B/16 at
384 px, 12-layer BERT-base text decoder with cross-attention, vocabulary 30524) and random weights (nothing is
downloaded). A training step is what HFCaptioner does for BLIP: forward with the captions as labels (prompt masked,
label smoothing), backward, AdamW, with conf/model/blip.yaml's label smoothing, learning rate and weight decay.
bf16-mixed is torch.autocast to bfloat16 around forward and loss, fp32 weights and optimizer, as Lightning's
`precision=bf16-mixed` does.

Prints images/s of each setting (and peak memory on CUDA), then `ratio:` lines, baseline time / ours:
`bf16_mixed_vs_fp32` (without checkpointing) and `gradient_checkpointing_vs_none_<precision>` (below 1:
checkpointing costs time; it buys memory).

    python benchmarks/blip_throughput.py                                   # CPU: batch 2, 3 timed steps each (~1.5 min)
    python benchmarks/blip_throughput.py --device cuda --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from framework.config import model_settings

SETTINGS = model_settings("blip", scheduler=None)  # the recipe's label smoothing, learning rate and weight decay
BASE_TOWER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
PROMPT_TOKENS, CAPTION_TOKENS = 4, 16  # "[DEC] a picture of" + a caption of 16 tokens


def blip_base() -> BlipForConditionalGeneration:
    config = BlipConfig(
        text_config={
            **BASE_TOWER,
            "vocab_size": 30524,
            "max_position_embeddings": 512,
            "label_smoothing": SETTINGS["label_smoothing"],
        },
        vision_config={**BASE_TOWER, "image_size": 384, "patch_size": 16},
        projection_dim=512,
        image_text_hidden_size=256,
        label_smoothing=SETTINGS["label_smoothing"],
    )
    return BlipForConditionalGeneration(config)


def batch(size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (size, PROMPT_TOKENS + CAPTION_TOKENS), generator=generator)
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = -100
    return {
        "pixel_values": torch.randn(size, 3, 384, 384, generator=generator).to(device),
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
    }


def images_per_second(model, inputs: dict, precision: str, checkpointing: bool, steps: int) -> tuple[float, float]:
    """(images/s over `steps` timed training steps after one warm-up step, peak GiB on CUDA else nan)."""
    device = inputs["pixel_values"].device
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    recipe = SETTINGS["optimizer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return len(inputs["pixel_values"]) * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on the CPU, 32 on a GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default: 3 on the CPU, 20 on a GPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    batch_size, steps = args.batch_size or (2 if on_cpu else 32), args.steps or (3 if on_cpu else 20)
    torch.manual_seed(0)
    model = blip_base().to(device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"BLIP-base-sized ({parameters:.0f}M parameters, random weights), 384 px, batch {batch_size}, "
        f"{steps} timed steps, {name}, torch {torch.__version__}"
    )

    speed = {}
    for precision in ("32-true", "bf16-mixed"):
        for checkpointing in (False, True):
            rate, peak = images_per_second(model, batch(batch_size, device), precision, checkpointing, steps)
            speed[precision, checkpointing] = rate
            memory = "" if on_cpu else f", peak memory {peak:.1f} GiB"
            print(
                f"{precision:>10}, gradient checkpointing {'on ' if checkpointing else 'off'}: "
                f"{rate:7.2f} images/s{memory}"
            )
    # Times are per image, so baseline time / ours = our images/s / baseline images/s.
    print(f"ratio: bf16_mixed_vs_fp32 = {speed['bf16-mixed', False] / speed['32-true', False]:.2f}")
    for precision, label in (("32-true", "fp32"), ("bf16-mixed", "bf16_mixed")):
        print(f"ratio: gradient_checkpointing_vs_none_{label} = {speed[precision, True] / speed[precision, False]:.2f}")


if __name__ == "__main__":
    main()
