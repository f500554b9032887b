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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages
from framework.pretrained import MODELS, Weights  # noqa: E402  (the one table; runs' errors name its entries)

HF_HOST, TORCHVISION_HOST = "huggingface.co", "download.pytorch.org"
CONNECT_TIMEOUT_S = 5.0


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
