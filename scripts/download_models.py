"""Fetch the pretrained weights tasks use into the standard caches, on a machine with network access.

    python scripts/download_models.py --list
    python scripts/download_models.py blip-base resnet50     # or: all

Hugging Face repositories go to the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) and torchvision
weights to the torch hub cache (TORCH_HOME, default ~/.cache/torch), where runs find them without a network
(runs never download). Copy those folders to offline machines, or point HF_HOME / TORCH_HOME at shared storage.
Without a network this stops within seconds with one message, before downloading anything.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass

HF_HOST, TORCHVISION_HOST = "huggingface.co", "download.pytorch.org"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Weights:
    source: str  # "hub" (a Hugging Face repository) or "torchvision" (a model name)
    name: str
    used_by: str
    allow: tuple[str, ...] | None = None  # hub files to fetch (None: all but other frameworks' duplicates)


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
# Duplicates of the safetensors/PyTorch weights in other frameworks' formats.
OTHER_FORMATS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.mlmodel", "*.pb")


class Offline(Exception):
    """No network (or HF_HUB_OFFLINE=1): nothing can be fetched here."""


def check_reachable(host: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connection to host:443 within `timeout` seconds, or Offline."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise Offline(f"cannot reach {host} ({error})") from None


def fetch_hub(weights: Weights) -> str:
    from huggingface_hub import HfApi, snapshot_download

    ignore = list(OTHER_FORMATS)
    if weights.allow is None and any(f.endswith(".safetensors") for f in HfApi().list_repo_files(weights.name)):
        ignore.append("*.bin")  # the safetensors copy is what transformers loads
    return snapshot_download(
        weights.name, allow_patterns=list(weights.allow) if weights.allow else None, ignore_patterns=ignore
    )


def fetch_torchvision(weights: Weights) -> str:
    import torch
    from torchvision import models

    default = models.get_model_weights(weights.name).DEFAULT
    default.get_state_dict(progress=True)  # into torch.hub's cache, where framework/weights.py looks
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(default.url))


def fetch(names: list[str]) -> list[str]:
    """Download each named model; Offline before anything is downloaded when a needed host is unreachable."""
    hosts = {HF_HOST if MODELS[n].source == "hub" else TORCHVISION_HOST for n in names}
    if HF_HOST in hosts and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise Offline("HF_HUB_OFFLINE is set")
    for host in sorted(hosts):
        check_reachable(host)
    return [(fetch_hub if MODELS[n].source == "hub" else fetch_torchvision)(MODELS[n]) for n in names]


def listing() -> str:
    width = max(map(len, MODELS))
    rows = [f"{name:<{width}}  {w.source:<11}  {w.name:<42}  {w.used_by}" for name, w in MODELS.items()]
    return "\n".join([f"{'name':<{width}}  {'source':<11}  {'repository / model':<42}  used by", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"models to fetch ({', '.join(MODELS)}) or 'all'")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        print(listing())
        return 0
    names = list(MODELS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)} (or all)")
    try:
        paths = fetch(names)
    except Offline as error:
        print(
            f"error: {error}: nothing was downloaded. Run this on a machine with network access and copy "
            "~/.cache/huggingface (HF_HOME) and ~/.cache/torch (TORCH_HOME) here, or point the task at local "
            "files (model.pretrained=/path/to/dir, model.encoder.pretrained=/path/to/weights.pth).",
            file=sys.stderr,
        )
        return 1
    for name, path in zip(names, paths):
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
