"""Pretrained weights without downloading, and the one table of the models scripts/download_models.py fetches.

Runs never download: Hugging Face models load from a local `save_pretrained` folder or from the local Hugging Face
cache (`load_offline`), torchvision weights from a file or the torch cache (framework/weights.py). A missing model is
one UserError naming the config key and the `scripts/download_models.py` command that fetches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from framework.errors import UserError


@dataclass(frozen=True)
class Weights:
    source: str  # "hub" (a Hugging Face repository) or "torchvision" (a model name)
    name: str
    used_by: str
    allow: tuple[str, ...] | None = None  # hub files to fetch (None: all but other frameworks' duplicates)


# scripts/download_models.py NAME fetches MODELS[NAME]; torchvision names are the models' own.
MODELS = {
    "blip-base": Weights("hub", "Salesforce/blip-image-captioning-base", "task=blip_coco/blip_flickr8k (default)"),
    "blip-large": Weights(
        "hub",
        "Salesforce/blip-image-captioning-large",
        "task=blip_* model.pretrained=Salesforce/blip-image-captioning-large",
    ),
    "vit-gpt2": Weights("hub", "nlpconnect/vit-gpt2-image-captioning", "task=vit_gpt2_coco (default)"),
    "vit-base": Weights("hub", "google/vit-base-patch16-224-in21k", "task=vit_gpt2_coco model.encoder_pretrained"),
    "gpt2": Weights("hub", "openai-community/gpt2", "task=vit_gpt2_coco model.decoder_pretrained"),
    "sdxl-base": Weights(
        "hub",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "SDXL DreamBooth LoRA (fp32 weights)",
        allow=("*.json", "*.txt", "*/model.safetensors", "*/diffusion_pytorch_model.safetensors"),
    ),
    "sdxl-vae-fp16": Weights("hub", "madebyollin/sdxl-vae-fp16-fix", "SDXL: a VAE that runs in fp16"),
    "clip-vit-b32": Weights(
        "hub", "openai/clip-vit-base-patch32", "SDXL DreamBooth fidelity: CLIP-T, CLIP-I (model.fidelity.clip)"
    ),
    "dino-vits16": Weights("hub", "facebook/dino-vits16", "SDXL DreamBooth fidelity: DINO (model.fidelity.dino)"),
    "resnet50": Weights("torchvision", "resnet50", "CNN-RNN encoder (model.encoder.pretrained=true), saliency"),
    "densenet201": Weights("torchvision", "densenet201", "CNN-RNN encoder (model.encoder.name=densenet201)"),
    "vgg19": Weights("torchvision", "vgg19", "style transfer (Gatys et al.)"),
    "vgg16": Weights("torchvision", "vgg16", "style transfer (perceptual loss of fast style transfer)"),
}
HUB_NAMES = {weights.name: name for name, weights in MODELS.items() if weights.source == "hub"}


def download_command(repository: str, fallback: str = "") -> str:
    """How to fetch a hub repository: its scripts/download_models.py name (else `fallback`'s), or `hf download`."""
    name = HUB_NAMES.get(repository, fallback)
    return f"python scripts/download_models.py {name}" if name else f"hf download {repository}"


def load_offline(load: Callable, source: str, key: str, *, subfolder: str | None = None, download: str = ""):
    """`load(source, local_files_only=True)` (a `from_pretrained`), from a local folder or the local Hugging Face
    cache; a missing folder, a folder of something else and an uncached hub id are each one UserError naming `key`.
    `download`: the scripts/download_models.py name(s) to suggest for a hub id that is not in MODELS."""
    local = Path(source).expanduser()
    where = f"{key}={source}" + (f" (its '{subfolder}')" if subfolder else "")
    try:
        return load(
            str(local) if local.is_dir() else source,
            local_files_only=True,
            **({"subfolder": subfolder} if subfolder else {}),
        )
    except (OSError, ValueError) as error:
        if source.startswith(("/", ".", "~")) and not local.is_dir():
            raise UserError(f"the folder {source} ({key}) does not exist") from None
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if local.is_dir():
            raise UserError(f"{where} is not a save_pretrained directory of this model ({reason})") from None
        raise UserError(
            f"{where} is neither a local directory nor in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub), and runs never download. On a machine with "
            f"network run `{download_command(source, download)}` (then copy the cache here if needed), "
            f"or set {key}=/path/to/a/save_pretrained/dir ({reason})"
        ) from None
