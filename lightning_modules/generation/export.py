"""A trained DreamBooth LoRA as users load it: pytorch_lora_weights.safetensors (diffusers layout; with model.kohya
also the Kohya layout) and a README.md model card, written together into one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

import torch

from framework.errors import UserError
from framework.files import atomic_dir
from lightning_modules.generation.parts import TEXT_ENCODER_DORA
from lightning_modules.generation.sdxl import TEXT_ENCODERS, save_lora


class CardSettings(TypedDict):
    """model.card: what the exported README.md model card says of the run."""

    name: str  # the task's name
    trigger_word: str | None
    instance_prompt: str | None
    prior_preservation: bool


DIFFUSERS_USAGE = """```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{pretrained}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors
image = pipe({prompt_json}, num_inference_steps=25).images[0]
```

`pytorch_lora_weights_kohya.safetensors`, when present, is the same LoRA in the Kohya layout
(AUTOMATIC1111, ComfyUI; in diffusers:
`pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights_kohya.safetensors")`)."""

LYCORIS_USAGE = """`pytorch_lora_weights_kohya.safetensors` holds the {kind} adapters in the LyCORIS layout, which
ComfyUI (a LoRA loader node), AUTOMATIC1111 / Forge (`<lora:name:1>` in the prompt) and kohya's sd-scripts read;
diffusers' SDXL pipeline does not load LoHa or LoKr files."""

CARD = """---
base_model: {pretrained}
library_name: diffusers
tags: [text-to-image, stable-diffusion-xl, lora, dreambooth]
instance_prompt: {prompt_json}
---

# SDXL LoRA ({name})

LoRA adapters for `{pretrained}`, trained with DreamBooth{prior}.

**Trigger word:** `{trigger}`. Use it in prompts, e.g. "{prompt}".

{usage}

| setting | value |
| --- | --- |
{rows}
"""


def export_lora(
    directory: str | Path,
    unet,
    text_encoders: list[torch.nn.Module],
    hp,
    steps: int | None,
    weights: dict[str, dict] | None = None,
) -> Path:
    """pytorch_lora_weights.safetensors (+ the Kohya layout with model.kohya=true) and a README.md model card;
    `hp`: the module's hparams, `steps`: the training steps, for the card; `weights`: the state dicts of modules
    whose own are sharded ({"unet": ...}), gathered."""
    if hp.lora_weights:
        raise UserError(
            "model.lora_weights is already an exported LoRA: export a training checkpoint "
            "(mode=export ckpt_path=...) instead"
        )
    if hp.lora["use_dora"] and hp.train_text_encoder:
        raise UserError(
            f"a LoRA with model.lora.use_dora=true and model.train_text_encoder=true is not exported: "
            f"{TEXT_ENCODER_DORA}. Nothing was written; use the checkpoint (ckpt_path=...) for predict/eval, or "
            "train with model.lora.use_dora=false or model.train_text_encoder=false"
        )
    directory = Path(directory)
    alpha = hp.lora["alpha"] or hp.lora["rank"]
    with atomic_dir(directory) as tmp:
        save_lora(
            tmp,
            {"unet": unet, **dict(zip(TEXT_ENCODERS, text_encoders))},
            kohya_alpha=alpha if hp.kohya else None,
            weights=weights,
        )
        (tmp / "README.md").write_text(model_card(hp, steps), encoding="utf-8")
    return directory


def model_card(hp, steps: int | None) -> str:
    """The README.md of an exported LoRA: how to load it, its trigger word and its training settings."""
    card = hp.card or {}
    trigger = card.get("trigger_word") or "(none)"
    kind = hp.lora.get("type", "lora")
    settings = {
        "adapter": kind,
        "rank": hp.lora["rank"],
        "alpha": hp.lora["alpha"] or hp.lora["rank"],
        "dropout": hp.lora["dropout"],
        "DoRA": hp.lora["use_dora"],
        "target modules": hp.lora["target_modules"],
        "block ranks": json.dumps(hp.lora.get("block_ranks")) if hp.lora.get("block_ranks") else None,
        "text encoder LoRA": hp.train_text_encoder,
        "learning rate": (hp.optimizer or {}).get("lr"),
        "training steps": steps,
        "resolution": hp.resolution,
        "snr_gamma": hp.snr_gamma,
        "noise_offset": hp.noise_offset,
        "multires noise (iterations, discount)": [hp.multires_noise["iterations"], hp.multires_noise["discount"]]
        if hp.multires_noise and hp.multires_noise["iterations"]
        else None,
        "EMA (decay, update every)": [hp.ema["decay"], hp.ema["update_every"]] if hp.ema and hp.ema["decay"] else None,
        "prior preservation": card.get("prior_preservation"),
        "VAE": hp.vae or "the pipeline's",
    }
    prompt = card.get("instance_prompt") or f"a photo of {trigger}"
    return CARD.format(
        pretrained=hp.pretrained,
        prompt=prompt,
        prompt_json=json.dumps(prompt),
        name=card.get("name") or "DreamBooth",
        prior=" and prior preservation" if card.get("prior_preservation") else "",
        trigger=trigger,
        usage=DIFFUSERS_USAGE.format(pretrained=hp.pretrained, prompt_json=json.dumps(prompt))
        if kind == "lora"
        else LYCORIS_USAGE.format(kind={"loha": "LoHa", "lokr": "LoKr"}[kind]),
        rows="\n".join(
            f"| {key} | {json.dumps(value) if isinstance(value, list) else value} |" for key, value in settings.items()
        ),
    )
