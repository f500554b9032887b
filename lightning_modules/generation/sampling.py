"""Images from a DreamBooth LoRA: generation with fixed seeds, the guards that stop a run on NaN or all-black images,
fidelity scoring (fidelity.py) of a stage's images, predict's rows and files, and the class images of prior
preservation."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from framework.distributed import gather_objects
from framework.errors import UserError
from framework.files import write_json, write_png
from framework.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning_modules.generation.fidelity import Fidelity

log = logging.getLogger(__name__)

GENERATION_HINT = (
    "the run stopped. Under trainer.precision=16-mixed set model.vae_fp32=true (or an fp16-fixed model.vae); "
    "otherwise training diverged: lower model.optimizer.lr or set trainer.gradient_clip_val"
)


class InferenceSettings(TypedDict):
    """model.inference: how validation, eval and predict generate images."""

    scheduler: str | None  # a diffusers scheduler class name; null: the pipeline's own (parts.inference_scheduler)
    num_inference_steps: PositiveInt
    guidance_scale: NonNegativeFloat  # classifier-free guidance; <= 1: none


class FidelitySettings(TypedDict):
    """model.fidelity: the models that score generated images (a hub id in the local cache or a folder; null: off),
    and the weights of the score that selects the best checkpoint (`selection_score`)."""

    clip: str | None  # CLIP-T, CLIP-I
    dino: str | None  # DINO
    select: dict[Literal["CLIP-T", "CLIP-I", "DINO"], PositiveFloat] | None
    class_drift_images: NonNegativeInt  # val/class_drift from this many seeds (0: off)


def check_selection(fidelity: FidelitySettings | None) -> None:
    """model.fidelity.select names only metrics whose model is set."""
    fidelity = fidelity or {}
    needs = {"CLIP-T": "clip", "CLIP-I": "clip", "DINO": "dino"}
    for metric in fidelity.get("select") or {}:
        if not fidelity.get(needs[metric]):
            raise UserError(
                f"model.fidelity.select weighs {metric}, which needs model.fidelity.{needs[metric]} (null here): set "
                f"that model, or leave {metric} out of the selection"
            )


def selection_score(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """The weighted mean of the selected metrics: what model.fidelity.select ranks checkpoints by."""
    return sum(weights[name] * metrics[name] for name in weights) / sum(weights.values())


@torch.no_grad()
def generate(
    pipeline, prompts: list[str], seeds: list[int], resolution: int, inference: InferenceSettings, at_step: str
) -> list:
    """PIL images for prompts, one fixed seed each (CPU generators: the same images on any device). The VAE decodes
    without autocast, in its own dtype; images holding NaN or inf stop the run (`at_step` says when)."""
    latents = pipeline(
        prompt=list(prompts),
        height=resolution,
        width=resolution,
        num_inference_steps=inference["num_inference_steps"],
        guidance_scale=inference["guidance_scale"],
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="latent",
    ).images
    vae = pipeline.vae
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    broken = sorted({p for p, image in zip(prompts, images) if not torch.isfinite(image).all()})
    if broken:
        raise UserError(f"images generated{at_step} hold NaN or inf (prompts: {' | '.join(broken)}): {GENERATION_HINT}")
    return pipeline.image_processor.postprocess(images.float(), output_type="pil")


def write_images(
    generate: Callable[[list[str], list[int]], list], requests: list[tuple], batch_size: int, write: bool = True
) -> None:
    """Generates each (prompt, seed, path) of `requests`, `batch_size` at a time, and writes it there (atomically);
    `write=False`: generates only (a rank taking part in a sharded model's generation that another rank writes)."""
    with tqdm(total=len(requests), desc="class images", unit="img", disable=not requests or not write) as progress:
        for start in range(0, len(requests), batch_size):
            prompts, seeds, paths = zip(*requests[start : start + batch_size])
            images = generate(list(prompts), list(seeds))
            if write:
                for path, image in zip(paths, images):
                    write_png(path, image)
            progress.update(len(paths))


def image_rows(batch: dict, images: list[Image.Image]) -> list[dict]:
    """A prompt-set batch's rows: prompt, seed, index (the item's place in the set) and the image."""
    return [
        {"prompt": p, "seed": s, "index": i, "image": image}
        for p, s, i, image in zip(batch["prompt"], batch["seed"], batch["index"], images)
    ]


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows, once each (DistributedSampler pads by repeating items), in index order."""
    by_index = {row["index"]: row for part in gather_objects(rows) for row in part}
    return [by_index[i] for i in sorted(by_index)]


def check_black(rows: list[dict], stage: str, at_step: str) -> None:
    """Stop when every image of a prompt (its grid) is black: a broken VAE or a diverged model."""
    grids: dict[str, list[bool]] = {}
    for row in rows:
        grids.setdefault(row["prompt"], []).append(not np.asarray(row["image"]).any())
    black = [prompt for prompt, flags in grids.items() if all(flags)]
    if black:
        raise UserError(
            f"the {stage} images{at_step} are all black for prompt(s) {' | '.join(black)}: {GENERATION_HINT}"
        )


class LazyFidelity:
    """The fidelity models (model.fidelity.clip / .dino), loaded on first use; none when neither is set."""

    def __init__(self, config: FidelitySettings | None):
        self.config = config or {}
        self.models: Fidelity | None = None

    def get(self) -> Fidelity | None:
        if self.models is None and (self.config.get("clip") or self.config.get("dino")):
            self.models = Fidelity(self.config.get("clip"), self.config.get("dino"))
        return self.models

    def score(self, rows: list[dict], references: Callable[[], list[Image.Image] | None], device) -> dict[str, float]:
        """CLIP-T, CLIP-I, DINO of the rows' images (empty without rows or models; only then `references()` runs)."""
        models = self.get() if rows else None
        if models is None:
            return {}
        return models.to(device)([r["image"] for r in rows], [r["prompt"] for r in rows], references())


def prompt_slug(prompt: str, limit: int = 40) -> str:
    """A prompt as part of a file name: lower-case letters and digits, runs of anything else as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit] or "prompt"


def prediction_rows(rows: list[dict]) -> list[dict]:
    """Predict's rows: the image's file name (index, prompt, seed), prompt, seed and the image."""
    return [
        {
            "image": f"{row['index']:04d}_{prompt_slug(row['prompt'])}_seed{row['seed']}.png",
            "prompt": row["prompt"],
            "seed": row["seed"],
            "pil": row["image"],
        }
        for row in rows
    ]


def save_predictions(rows: list[dict], output_dir: Path) -> dict[str, float]:
    """PNGs under output_dir/images/ and predictions.json: file, prompt, seed."""
    for row in rows:
        write_png(output_dir / "images" / row["image"], row["pil"])
    listing = [{key: row[key] for key in ("image", "prompt", "seed")} for row in rows]
    write_json(output_dir / "predictions.json", listing)
    log.info("wrote %d images to %s", len(rows), output_dir / "images")
    return {"predict/images": float(len(rows))}
