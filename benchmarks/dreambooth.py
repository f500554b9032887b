"""DreamBooth LoRA training speed: against diffusers' script, with the latent cache, buckets, an SDXL-sized UNet.

1. (default) `task=sdxl_dreambooth` against its peer, the training step of huggingface/diffusers
   examples/dreambooth/train_dreambooth_lora_sdxl.py (PEER_COMMIT below) as the script writes it, re-implemented
   here (DiffusersScript), on a tiny SDXL pipeline of the real classes (lightning_modules/generation/tiny.py): same
   images, resolution, batch size, rank-4 LoRA on the same UNet modules, fp32, seed. Ours is DreamBoothLoRA and its
   data module through a Lightning Trainer, as run.py trains them (the Trainer's per-step work is part of what users
   get; the task's callbacks, validation, logger and progress bar are left out, as the script's tracker and bar).
   At 64 and 128 px, batch 1 and 2: the script, ours with defaults and ours with data.cache_latents=true timed in
   interleaved rounds; the median round's steady-state steps/s of each; first-step losses on one batch with the
   same draws. Ours runs AdamW fused (the task's default: one kernel for all adapter tensors, the same update within
   float rounding), the script torch's default AdamW (a loop over the tensors off CUDA), as each is configured. Then,
   the lowest over the settings,
   `ratio: dreambooth_vs_diffusers_script = <ours steps/s / the script's>` (defaults: prompt embeddings cached, VAE
   encode every step, as the script), `ratio: dreambooth_vs_diffusers_script_cached = ...` (latent cache too: the
   script at that commit has none), `ratio: dreambooth_cache_step_speedup = <cached / uncached steps/s of ours>` and
   `ratio: dreambooth_cached_without_trainer_vs_diffusers_script = ...`: the cached module's own steps (loss,
   backward, clipping, its optimizer) in a plain loop, timed in the same rounds: what Lightning's per-step work costs,
   and the most our own code can give while the UNet's forward and backward, which both sides share, stay as they are.
   With `--compiled`, also ours with model.compile=true (and the latent cache): its first step (where inductor
   compiles the UNet's forward and backward) printed apart, its steady-state steps timed in the same rounds, its
   first-step loss on the same batch, then `ratio: dreambooth_compiled_vs_diffusers_script = ...`.
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

    python benchmarks/dreambooth.py [--steps 40] [--rounds 3] [--resolutions 64 128] [--batch-sizes 1 2]
    python benchmarks/dreambooth.py --compiled --resolutions 64 --batch-sizes 1
    python benchmarks/dreambooth.py --sdxl-unet --device cuda [--batch-size 1]
    python benchmarks/dreambooth.py --buckets [--steps 6] [--rounds 5] [--resolution 256]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
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


# ------------------------------------------------------------------------------- 1. the diffusers script, tiny pipeline
PEER = "huggingface/diffusers examples/dreambooth/train_dreambooth_lora_sdxl.py"
PEER_COMMIT = "000280f56a6a81e355313e77ec831575ad571d8b"
PROMPT = "a photo of sks dog"


def save_instance_images(folder: Path, count: int, size: int, height: int | None = None) -> Path:
    """`count` noise images of `size` px wide and `height` (default 1.25 x size) tall."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (height or size + size // 4, size, 3), np.uint8)).save(folder / f"{i}.png")
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
    return model_settings("sdxl_lora", **{**fixed, **values})


def tiny_dreambooth(pipeline: Path, images: Path, resolution: int, batch_size: int, model: dict, **data):
    """DreamBoothLoRA (conf/model/sdxl_lora.yaml with `model` replacing some) and its data module (task=sdxl_dreambooth
    composed as run.py composes it, `data` replacing some of its data settings) on the tiny pipeline and an image
    folder, seeded as run.py seeds a run."""
    import random

    from framework.config import compose
    from framework.runner import instantiate
    from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA

    data = {"source.folder": images, "source.prompt": f"'{PROMPT}'", "resolution": resolution, **data}
    data["batch_size"] = batch_size
    overrides = [f"data.{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in data.items()]
    torch.manual_seed(0)
    random.seed(0)
    module = DreamBoothLoRA(**tiny_settings(pipeline, resolution, **model))
    datamodule = instantiate(compose(["task=sdxl_dreambooth", *overrides]).data)
    return module, datamodule


def epochs(loader, steps: int):
    """The first `steps` batches of `loader` read epoch after epoch (a new pass, shuffled anew, each epoch), as a
    training loop reads them."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def train_steps(model, loader, steps: int, device: str, warmup: int = 1) -> float:
    """Seconds per step (after `warmup` untimed steps) of plain LoRA training steps."""
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    start = None
    for done, batch in enumerate(epochs(loader, warmup + steps), 1):
        loss = model.loss({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        start = time.perf_counter() if done == warmup else start  # the clock starts after the warm-up
    return (time.perf_counter() - start) / steps


class ScriptImages(torch.utils.data.Dataset):
    """The script's DreamBoothDataset without class images: resize (shorter side), random or centre crop, to
    tensor, normalise to [-1, 1]; every item read from its file."""

    def __init__(self, folder: Path, size: int, center_crop: bool = False):
        from torchvision import transforms

        self.paths = list(folder.iterdir())
        crop = transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size)
        resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR)
        self.transforms = transforms.Compose([resize, crop, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image
        from PIL.ImageOps import exif_transpose

        image = exif_transpose(Image.open(self.paths[index]))
        return {"instance_images": self.transforms(image.convert("RGB") if image.mode != "RGB" else image)}


def script_collate(examples: list[dict]) -> dict:
    pixels = torch.stack([e["instance_images"] for e in examples])
    return {"pixel_values": pixels.to(memory_format=torch.contiguous_format).float()}


TOKENIZERS = ("tokenizer", "tokenizer_2")


class DiffusersScript:
    """The training step of the diffusers script (PEER at PEER_COMMIT) with its defaults, fp32, no prior
    preservation, frozen text encoders: the parts loaded from the pipeline folder as the script loads them, rank-4
    LoRA on the UNet's to_q/k/v/out.0, the prompt embeddings and add_time_ids computed once, its shuffled DataLoader
    (main process); per step: VAE encode and sample, noise, timesteps, add_noise, UNet, MSE to the noise, backward,
    clip_grad_norm_(1.0), AdamW (its betas, eps, weight decay 1e-2), the lr scheduler, zero_grad, loss.item().
    The LoRA layers are peft's (unet.add_adapter, as the script's later versions add them): the commit's
    LoRALinearLayer.set_lora_layer is gone from the diffusers installed here; the arithmetic is the same.
    Left out: Accelerate (no-ops on one CPU process), its tqdm bar and tracker logging (ours runs without progress
    bar and logger too) and checkpoints every 500 steps."""

    def __init__(self, pipeline: Path, images: Path, resolution: int, batch_size: int, lr: float, seed: int = 0):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        from lightning_modules.generation.sdxl import encode_prompts

        torch.manual_seed(seed)
        tokenizers = [AutoTokenizer.from_pretrained(pipeline, subfolder=f, use_fast=False) for f in TOKENIZERS]
        encoders = [
            CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2"),
        ]
        self.noise_scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
        self.vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
        for part in (self.vae, self.unet, *encoders):
            part.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", self.optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        with torch.no_grad():  # encode_prompts is the script's encode_prompt (penultimate states, pooled of the 2nd)
            self.hidden, self.pooled = encode_prompts(tokenizers, encoders, [PROMPT])
        self.loader = torch.utils.data.DataLoader(
            ScriptImages(images, resolution), batch_size=batch_size, shuffle=True, collate_fn=script_collate
        )

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        n = len(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,)).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditions = {"time_ids": self.time_ids.repeat(n, 1), "text_embeds": self.pooled.repeat(n, 1)}
        prediction = self.unet(noisy, timesteps, self.hidden.repeat(n, 1, 1), added_cond_kwargs=conditions).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="mean")

    def train(self, steps: int, clock: list[float]) -> None:
        """`steps` training steps (epochs over the loader as the script's loop), the time after each in `clock`."""
        self.unet.train()
        for batch in epochs(self.loader, steps):
            loss = self.loss(batch["pixel_values"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.logged = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}  # as it logs
            clock.append(time.perf_counter())


def fit_ours(module, datamodule, steps: int) -> list[float]:
    """`steps` steps of `task=sdxl_dreambooth`'s training through a Lightning Trainer (its trainer settings less
    precision, validation, logger, checkpoints and progress bar); the time after each step."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.clock: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.clock.append(time.perf_counter())

    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule)
    return clock.clock


def loop_ours(module, datamodule, steps: int) -> list[float]:
    """`steps` of the same training steps without the Trainer, right after a fit_ours run of that module: its loss,
    backward, clipping to 1.0 and the optimizer the Trainer made for it, in a plain loop over its data; the time after
    each. What ours would cost if Lightning's per-step work were free: the ceiling of our own code."""
    optimizer = module.trainer.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clock = []
    for batch in epochs(datamodule.train_dataloader(), steps):
        loss = module.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        clock.append(time.perf_counter())
    return clock


def first_step_losses(
    tmp: Path, pipeline: Path, resolution: int, batch_size: int, compiled: bool = False
) -> dict[str, float]:
    """The first loss of each side on the same batch (copies of one square image at `resolution`: no crop or order to
    draw) with the same random draws (VAE sample, noise, timesteps) from seed 0; with `compiled`, also of ours with
    model.compile=true (with gradients on: the training graph, which the timed runs use)."""
    import shutil

    folder = save_instance_images(tmp / f"square_{resolution}_{batch_size}", 1, resolution, height=resolution)
    for i in range(1, batch_size):
        shutil.copy(folder / "0.png", folder / f"{i}.png")
    losses = {}
    script = DiffusersScript(pipeline, folder, resolution, batch_size, lr=1e-4)
    pixels = next(iter(script.loader))["pixel_values"]
    torch.manual_seed(0)
    losses["script"] = script.loss(pixels).item()
    variants = [("ours", False, False), ("ours cached", True, False)] + [("ours compiled", True, True)] * compiled
    for name, cached, compile in variants:
        module, data = tiny_dreambooth(
            pipeline, folder, resolution, batch_size, {"compile": compile}, cache_latents=cached
        )
        data.set_latent_cache([(v, module.encode_latent_parameters(pixels)) for v, pixels in data.views_to_encode()])
        batch = next(iter(data.train_dataloader()))
        torch.manual_seed(0)
        started = time.perf_counter()
        losses[name] = module.loss(batch).item()
        if compile:  # the forward compiles here (the timed module reuses it; its first step compiles the backward)
            print(
                f"{resolution:>4} px batch {batch_size}  compiling the forward: {time.perf_counter() - started:.1f} s"
            )
    return losses


def steps_per_second(clock: list[float], warmup: int) -> float:
    return (len(clock) - warmup) / (clock[-1] - clock[warmup - 1])


def peer_benchmark(args) -> None:
    """Per setting: the script, ours with defaults and ours with data.cache_latents=true, each built once, then timed
    in interleaved rounds (script, ours, ours cached; each round `warmup` untimed steps then `steps`); steps/s is the
    median over rounds."""
    import logging
    import statistics

    from lightning_modules.generation.tiny import save_tiny_sdxl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"peer: {PEER} @ {PEER_COMMIT} (training step re-implemented here: DiffusersScript)")
    print(
        f"settings: tiny SDXL pipeline of the real classes (lightning_modules/generation/tiny.py), {args.images} "
        f"noise images (w x 1.25w px, random crop, no flip), resolutions {args.resolutions}, batch sizes "
        f"{args.batch_sizes}, LoRA rank 4 on to_q/k/v/out.0, fp32, AdamW lr 1e-4 constant (ours fused, the task's "
        f"default; the script torch's default implementation), grad clip 1.0, seed 0, "
        f"{args.rounds} interleaved rounds of {args.warmup} untimed + {args.steps} timed steps, "
        f"{torch.get_num_threads()} threads, {args.device}"
    )
    print(
        "first-step loss: every side on one batch (copies of one square image) with the same draws from seed 0; at "
        "batch > 1 the script's randn_like follows its latents' strided layout, so its noise holds the same numbers "
        "in other places and its loss differs"
    )
    print("ours: DreamBoothLoRA + DreamBoothDataModule (conf/model/sdxl_lora.yaml, conf/data/dreambooth_folder.yaml)")
    print("      through a Lightning Trainer (task=sdxl_dreambooth's trainer settings, no validation/logger/bar)")
    sides = ("script", "ours", "ours cached", "no Trainer") + ("ours compiled",) * args.compiled
    ratios = {"dreambooth_vs_diffusers_script": [], "dreambooth_vs_diffusers_script_cached": []}
    ratios["dreambooth_cache_step_speedup"] = []
    ratios["dreambooth_cached_without_trainer_vs_diffusers_script"] = []
    if args.compiled:
        ratios["dreambooth_compiled_vs_diffusers_script"] = []
    constant = {"_target_": "diffusers.optimization.get_scheduler", "_partial_": True, "name": "constant"}
    constant |= {"num_warmup_steps": 0, "num_training_steps": 10**6}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for resolution in args.resolutions:
            pipeline = save_tiny_sdxl(tmp / f"pipeline_{resolution}", resolution)
            images = save_instance_images(tmp / f"images_{resolution}", args.images, resolution)
            for batch_size in args.batch_sizes:
                losses = first_step_losses(tmp, pipeline, resolution, batch_size, args.compiled)
                script = DiffusersScript(pipeline, images, resolution, batch_size, lr=1e-4)
                runs = {"script": lambda clock, s=script: s.train(args.warmup + args.steps, clock)}
                for name, cached in (("ours", False), ("ours cached", True)):
                    module, data = tiny_dreambooth(
                        pipeline, images, resolution, batch_size, {"scheduler": constant}, cache_latents=cached
                    )
                    runs[name] = lambda clock, m=module, d=data: clock.extend(fit_ours(m, d, args.warmup + args.steps))
                # after "ours cached" in each round: the same module and data
                runs["no Trainer"] = lambda clock, m=module, d=data: clock.extend(
                    loop_ours(m, d, args.warmup + args.steps)
                )
                if args.compiled:
                    module, data = tiny_dreambooth(
                        pipeline,
                        images,
                        resolution,
                        batch_size,
                        {"scheduler": constant, "compile": True},
                        cache_latents=True,
                    )
                    started = time.perf_counter()
                    first = fit_ours(module, data, 1)  # compiles the UNet's forward and backward
                    print(f"{resolution:>4} px batch {batch_size}  first compiled step: {first[0] - started:.1f} s")
                    runs["ours compiled"] = lambda clock, m=module, d=data: clock.extend(
                        fit_ours(m, d, args.warmup + args.steps)
                    )
                rates = {name: [] for name in sides}
                for _ in range(args.rounds):
                    for name in sides:
                        clock = []
                        runs[name](clock)
                        rates[name].append(steps_per_second(clock, args.warmup))
                median = {name: statistics.median(rates[name]) for name in sides}
                for name in sides:
                    rounds = ", ".join(f"{r:.2f}" for r in rates[name])
                    print(
                        f"{resolution:>4} px batch {batch_size}  {name:>13}: {median[name]:6.2f} steps/s "
                        f"(rounds: {rounds})" + (f", first-step loss {losses[name]:.6f}" if name in losses else "")
                    )
                ratios["dreambooth_vs_diffusers_script"].append(median["ours"] / median["script"])
                ratios["dreambooth_vs_diffusers_script_cached"].append(median["ours cached"] / median["script"])
                ratios["dreambooth_cache_step_speedup"].append(median["ours cached"] / median["ours"])
                ratios["dreambooth_cached_without_trainer_vs_diffusers_script"].append(
                    median["no Trainer"] / median["script"]
                )
                if args.compiled:
                    ratios["dreambooth_compiled_vs_diffusers_script"].append(median["ours compiled"] / median["script"])
    print("ratios per setting (" + ", ".join(f"{r}px/b{b}" for r in args.resolutions for b in args.batch_sizes) + ")")
    for name, values in ratios.items():
        print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in values))
    for name, values in ratios.items():  # the lowest setting: what holds at every one
        print(f"ratio: {name} = {min(values):.2f}")


def bucket_benchmark(args) -> None:
    """Both set-ups built once, then timed in alternating rounds (each after an untimed epoch, so that every bucket
    shape has run once), so that a load that changes over time weighs on both alike; the median round counts."""
    import statistics

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
            model, data = tiny_dreambooth(
                pipeline, images, args.resolution, args.batch_size, {}, center_crop=True, buckets=buckets
            )
            runs[buckets] = model, data.train_dataloader()
        seconds = {False: [], True: []}
        for _ in range(args.rounds):
            for buckets, (model, loader) in runs.items():
                seconds[buckets].append(train_steps(model, loader, args.steps, args.device, warmup=len(loader)))
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
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 40 peer, 6 buckets, 5 SDXL)")
    parser.add_argument("--batch-size", type=int, default=None, help="--buckets, --sdxl-unet (default: 2, 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="against the script")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="against the script")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round against the script")
    parser.add_argument("--compiled", action="store_true", help="against the script: ours with model.compile too")
    parser.add_argument("--buckets", action="store_true", help="aspect-ratio buckets against the centre crop")
    parser.add_argument("--resolution", type=int, default=256, help="--buckets: the pixel budget's side")
    parser.add_argument("--images", type=int, default=None, help="default: 5, with --buckets 6")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default: 3, --buckets 5)")
    args = parser.parse_args()
    if args.sdxl_unet:
        args.steps, args.batch_size = args.steps or 5, args.batch_size or 1
        sdxl_benchmark(args)
    elif args.buckets:
        args.steps, args.batch_size = args.steps or 6, args.batch_size or 2
        args.images, args.rounds = args.images or 6, args.rounds or 5
        bucket_benchmark(args)
    else:
        args.steps, args.images, args.rounds = args.steps or 40, args.images or 5, args.rounds or 3
        peer_benchmark(args)


if __name__ == "__main__":
    main()
