"""Fetch pretrained weights into the standard caches, on a machine with network access.

    python scripts/download_models.py --list                       # the models the configs name, and where
    python scripts/download_models.py Salesforce/blip-image-captioning-base resnet50
    python scripts/download_models.py all                          # every model --list shows

Any Hugging Face hub id (owner/name) or torchvision model name is taken; --list shows those that conf/ names
(framework/pretrained.py `configured_models`). Hugging Face repositories go to the Hugging Face cache (HF_HOME,
default ~/.cache/huggingface) and torchvision ImageNet weights to the torch hub cache (TORCH_HOME, default
~/.cache/torch), where runs find them without a network (runs never download). Copy those folders to offline
machines, or point HF_HOME / TORCH_HOME at shared storage. Without a network this stops within seconds with one
message, before downloading anything.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import posixpath
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages
from framework.pretrained import Weights, configured_models, is_hub_id, torchvision_models  # noqa: E402

HF_HOST, TORCHVISION_HOST = "huggingface.co", "download.pytorch.org"
CONNECT_TIMEOUT_S = 5.0

# Duplicates of the safetensors/PyTorch weights in other frameworks' formats.
OTHER_FORMATS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.pb", "openvino_*")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


class Offline(Exception):
    """No network (or HF_HUB_OFFLINE=1): nothing can be fetched here."""


def check_reachable(host: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connection to host:443 within `timeout` seconds, or Offline."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise Offline(f"cannot reach {host} ({error})") from None


def matches(file: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(posixpath.basename(file), pattern) for pattern in patterns)


def files_to_fetch(files: list[str]) -> list[str]:
    """The files of a hub repository that transformers and diffusers load: without other frameworks' formats, without
    .bin weights where safetensors exist, and for a diffusers pipeline (model_index.json) without its single-file
    checkpoints at the top and without precision variants (name.fp16.safetensors): the fp32 weights of each part."""
    kept = [file for file in files if not matches(file, OTHER_FORMATS)]
    if any(file.endswith(".safetensors") for file in kept):
        kept = [file for file in kept if not file.endswith(".bin")]
    if "model_index.json" in files:
        kept = [
            file
            for file in kept
            if not (matches(file, WEIGHTS) and ("/" not in file or posixpath.basename(file).count(".") > 1))
        ]
    return kept


def fetch_hub(weights: Weights) -> str:
    from huggingface_hub import HfApi, snapshot_download

    return snapshot_download(weights.name, allow_patterns=files_to_fetch(HfApi().list_repo_files(weights.name)))


def fetch_torchvision(weights: Weights) -> str:
    import torch
    from torchvision import models

    default = models.get_model_weights(weights.name).DEFAULT
    default.get_state_dict(progress=True)  # into torch.hub's cache, where framework/weights.py looks
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(default.url))


def fetch(models: list[Weights]) -> list[str]:
    """Download each model; Offline before anything is downloaded when a needed host is unreachable."""
    hosts = {HF_HOST if weights.source == "hub" else TORCHVISION_HOST for weights in models}
    if HF_HOST in hosts and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise Offline("HF_HUB_OFFLINE is set")
    for host in sorted(hosts):
        check_reachable(host)
    return [(fetch_hub if weights.source == "hub" else fetch_torchvision)(weights) for weights in models]


def listing(models: dict[str, Weights]) -> str:
    width = max(len(name) for name in models)
    rows = [f"{name:<{width}}  {w.source:<11}  {'; '.join(w.used_by)}" for name, w in models.items()]
    return "\n".join([f"{'model':<{width}}  {'source':<11}  named by", *rows])


def resolve(names: list[str], known: dict[str, Weights]) -> tuple[list[Weights], list[str]]:
    """The models to fetch for `names` (hub ids, torchvision names, or all), and the names that are neither."""
    if names == ["all"]:
        return list(known.values()), []
    models, unknown = [], []
    for name in names:
        if name in known:
            models.append(known[name])
        elif is_hub_id(name):
            models.append(Weights("hub", name, ()))
        elif name in torchvision_models():
            models.append(Weights("torchvision", name, ()))
        else:
            unknown.append(name)
    return models, unknown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("names", nargs="*", help="hub ids (owner/name), torchvision model names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the models the configs name, and exit")
    args = parser.parse_args(argv)
    known = configured_models()
    if args.list or not args.names:
        print(listing(known))
        return 0
    models, unknown = resolve(args.names, known)
    if unknown:
        parser.error(
            f"unknown model(s) {', '.join(unknown)}: give a Hugging Face hub id (owner/name) or a torchvision model "
            f"name; the configs name {', '.join(known)} (or all)"
        )
    try:
        paths = fetch(models)
    except Offline as error:
        print(
            f"error: {error}: nothing was downloaded. Run this on a machine with network access and copy "
            "~/.cache/huggingface (HF_HOME) and ~/.cache/torch (TORCH_HOME) here, or point the task at local "
            "files (model.pretrained=/path/to/dir, model.encoder.pretrained=/path/to/weights.pth).",
            file=sys.stderr,
        )
        return 1
    for weights, path in zip(models, paths):
        print(f"{weights.name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
