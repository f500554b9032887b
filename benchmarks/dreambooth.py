"""DreamBooth LoRA training speed: with the caches against without, and an SDXL-sized UNet on a GPU.

1. (default) LoRA training steps of DreamBoothLoRA on a tiny SDXL pipeline of the real classes
   (lightning_modules/generation/tiny.py) in one process: from images and prompts (every step decodes
   and crops the images, encodes them with the VAE and the prompts with both text encoders) against
   from the caches (data.cache_latents: latent distributions encoded once; cache_prompt_embeddings:
   each prompt encoded once). Same initial weights, batches and random draws: the first-step losses
   are printed and agree. Prints steps/s of both, the cache build time, then
   `ratio: dreambooth_cache_step_speedup = <uncached step time / cached step time>`.
2. `--sdxl-unet --device cuda`: a UNet with the configuration of stabilityai/stable-diffusion-xl-base-1.0
   (written below, random weights; needs no download), frozen in bf16 with LoRA rank-4 adapters in fp32
   on to_q/k/v/out, one 1024 px training step (latents 128x128, batch --batch-size) under bf16 autocast,
   with and without gradient checkpointing: step time and peak GPU memory, then
   `ratio: sdxl_checkpointing_step_time = <time without / time with>` (below 1: checkpointing costs time)
   and `ratio: sdxl_checkpointing_peak_memory = <peak without / peak with>` (above 1: it saves memory).
   This part imports only torch, diffusers and peft.
3. `--buckets`: aspect-ratio buckets (data.buckets=true) against the centre crop at the same pixel budget
   (--resolution^2, default 256 px here), LoRA training steps from images on the tiny pipeline with images of
   3:4, 1:1 and 16:9 (two each by default), timed in alternating rounds: steps/s of both, the mean pixels per
   image, then
   `ratio: dreambooth_buckets_vs_center_crop = <centre-crop step time / bucketed step time>` (about 1: a bucket
   holds no more pixels than the square, and batches from one bucket stack as the squares do).

    python benchmarks/dreambooth.py [--steps 10] [--resolution 128] [--device cuda]
    python benchmarks/dreambooth.py --sdxl-unet --device cuda [--batch-size 1]
    python benchmarks/dreambooth.py --buckets [--steps 6] [--rounds 5] [--resolution 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ------------------------------------------------------------------------------------- 1. caches, tiny pipeline
def save_instance_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size + size // 4, size, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def save_mixed_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` noise images of about (1.2 x resolution)^2 pixels, in turn 3:4, 1:1 and 16:9 (width:height)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        ratio = (3 / 4, 1.0, 16 / 9)[i % 3]
        width, height = round(1.2 * resolution * ratio**0.5), round(1.2 * resolution / ratio**0.5)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_settings(pipeline: Path, resolution: int, **values) -> dict:
    """conf/model/sdxl_lora.yaml's settings on the tiny pipeline, without training schedule, model card or fidelity."""
    from framework.config import model_settings

    fixed = {"pretrained": str(pipeline), "resolution": resolution, "scheduler": None, "card": None, "fidelity": None}
    return model_settings("sdxl_lora", **fixed, **values)


def train_steps(model, loader, steps: int, device: str, warmup: int = 1) -> tuple[float, float]:
    """First-step loss and seconds per step (after `warmup` untimed steps) of plain LoRA training steps."""
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    first, start, done = None, None, 0
    while done < warmup + steps:
        for batch in loader:
            loss = model.loss({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            done += 1
            start = time.perf_counter() if done == warmup else start  # the clock starts after the warm-up
            if done == warmup + steps:
                break
    return first, (time.perf_counter() - start) / steps


def cache_benchmark(args) -> None:
    import random

    from datamodules.dreambooth import DreamBoothDataModule, read_instance_folder
    from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA
    from lightning_modules.generation.tiny import save_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = save_tiny_sdxl(Path(tmp) / "pipeline", args.resolution)
        images = save_instance_images(Path(tmp) / "images", args.images, args.resolution)
        print(
            f"tiny SDXL pipeline on {args.device}, {args.images} instance images at {args.resolution} px, "
            f"batch {args.batch_size}, {args.steps} timed steps, {torch.get_num_threads()} threads"
        )
        results = {}
        for cached in (False, True):
            torch.manual_seed(0)
            random.seed(0)
            model = DreamBoothLoRA(**tiny_settings(pipeline, args.resolution, cache_prompt_embeddings=cached))
            data = DreamBoothDataModule(
                source=partial(read_instance_folder, images, "a photo of sks dog"),
                resolution=args.resolution,
                center_crop=True,
                random_flip=True,
                batch_size=args.batch_size,
                cache_latents=cached,
            )
            model.to(args.device)
            if cached:
                start = time.perf_counter()
                data.enable_latent_cache(model.encode_latent_parameters)
                print(f"latent cache build: {time.perf_counter() - start:.2f} s")
            random.seed(0)
            results[cached] = train_steps(model, data.train_dataloader(), args.steps, args.device)
            name = "cached" if cached else "uncached"
            print(
                f"{name:>8}: first-step loss {results[cached][0]:.6f}, {1 / results[cached][1]:.2f} steps/s "
                f"({results[cached][1] * 1000:.1f} ms/step)"
            )
        print(f"ratio: dreambooth_cache_step_speedup = {results[False][1] / results[True][1]:.2f}")


def bucket_benchmark(args) -> None:
    """Both set-ups built once, then timed in alternating rounds (each after an untimed epoch, so that every bucket
    shape has run once), so that a load that changes over time weighs on both alike; the median round counts."""
    import random
    import statistics

    from datamodules.dreambooth import DreamBoothDataModule, read_instance_folder
    from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA
    from lightning_modules.generation.tiny import save_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = save_tiny_sdxl(Path(tmp) / "pipeline", args.resolution)
        images = save_mixed_images(Path(tmp) / "images", args.images, args.resolution)
        print(
            f"tiny SDXL pipeline on {args.device}, {args.images} images (3:4, 1:1, 16:9) at {args.resolution}^2 px, "
            f"batch {args.batch_size}, {args.rounds} rounds of {args.steps} timed steps, "
            f"{torch.get_num_threads()} threads"
        )
        runs = {}
        for buckets in (False, True):
            torch.manual_seed(0)
            random.seed(0)
            model = DreamBoothLoRA(**tiny_settings(pipeline, args.resolution))
            data = DreamBoothDataModule(
                source=partial(read_instance_folder, images, "a photo of sks dog"),
                resolution=args.resolution,
                center_crop=True,
                buckets=buckets,
                batch_size=args.batch_size,
            )
            runs[buckets] = model, data.train_dataloader()
        seconds = {False: [], True: []}
        for _ in range(args.rounds):
            for buckets, (model, loader) in runs.items():
                seconds[buckets].append(train_steps(model, loader, args.steps, args.device, warmup=len(loader))[1])
        for buckets, (_, loader) in runs.items():
            pixels = [batch["pixels"][0, 0].numel() for batch in loader]
            shapes = sorted({tuple(batch["pixels"].shape[-2:]) for batch in loader})
            median = statistics.median(seconds[buckets])
            name = "buckets" if buckets else "centre crop"
            rounds = ", ".join(f"{t * 1000:.0f}" for t in seconds[buckets])
            print(
                f"{name:>11}: {1 / median:.2f} steps/s ({median * 1000:.1f} ms/step; rounds: {rounds}), "
                f"{sum(pixels) / len(pixels):.0f} pixels per image on average, batch shapes {shapes}"
            )
        ratio = statistics.median(seconds[False]) / statistics.median(seconds[True])
        print(f"ratio: dreambooth_buckets_vs_center_crop = {ratio:.2f}")


# ------------------------------------------------------------------------------------------ 2. SDXL-sized UNet
def sdxl_unet_step(gradient_checkpointing: bool, batch_size: int, steps: int, device: str) -> tuple[float, float]:
    """Seconds per LoRA training step and peak memory (GiB) of an SDXL UNet at 1024 px in bf16."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to(device, torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latents = torch.randn(batch_size, 4, 128, 128, device=device)
    hidden = torch.randn(batch_size, 77, 2048, device=device)
    conditioning = {
        "text_embeds": torch.randn(batch_size, 1280, device=device),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch_size, device=device),
    }
    timesteps = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            prediction = unet(latents, timesteps, hidden, added_cond_kwargs=conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up (kernels, allocator, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return seconds, peak


def sdxl_benchmark(args) -> None:
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("--sdxl-unet needs --device cuda and a CUDA GPU")
    print(
        f"SDXL UNet (random weights), LoRA rank 4, 1024 px, batch {args.batch_size}, bf16, "
        f"{torch.cuda.get_device_name()}"
    )
    results = {}
    for checkpointing in (False, True):
        results[checkpointing] = sdxl_unet_step(checkpointing, args.batch_size, args.steps, args.device)
        seconds, peak = results[checkpointing]
        print(
            f"gradient checkpointing {'on ' if checkpointing else 'off'}: {seconds * 1000:.0f} ms/step, "
            f"peak memory {peak:.2f} GiB"
        )
    print(f"ratio: sdxl_checkpointing_step_time = {results[False][0] / results[True][0]:.2f}")
    print(f"ratio: sdxl_checkpointing_peak_memory = {results[False][1] / results[True][1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sdxl-unet", action="store_true", help="the SDXL-sized UNet at 1024 px (GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 tiny, 5 SDXL)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 tiny, 1 SDXL")
    parser.add_argument("--buckets", action="store_true", help="aspect-ratio buckets against the centre crop")
    parser.add_argument("--resolution", type=int, default=None, help="tiny pipeline image size (default: 128, 256)")
    parser.add_argument("--images", type=int, default=None, help="default: 4, with --buckets 6")
    parser.add_argument("--rounds", type=int, default=5, help="--buckets: alternating timed rounds")
    args = parser.parse_args()
    if args.sdxl_unet:
        args.steps, args.batch_size = args.steps or 5, args.batch_size or 1
        sdxl_benchmark(args)
    elif args.buckets:
        args.steps, args.batch_size = args.steps or 6, args.batch_size or 2
        args.resolution, args.images = args.resolution or 256, args.images or 6
        bucket_benchmark(args)
    else:
        args.resolution, args.images = args.resolution or 128, args.images or 4
        args.steps, args.batch_size = args.steps or 10, args.batch_size or 2
        cache_benchmark(args)


if __name__ == "__main__":
    main()
