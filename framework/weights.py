"""Torchvision ImageNet weights without downloading: from an explicit file or the local torch cache."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision import models

from framework.errors import UserError


def imagenet_state_dict(name: str, pretrained: bool | str, config_key: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision model `name`: from the file `pretrained` names, or (pretrained=true) from
    torchvision's default weights in the local torch cache.

    Nothing is downloaded: a missing file is a UserError naming `config_key` and saying how to get the file
    (scripts/download_models.py fetches them where a network is reachable).
    """
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist ({config_key})")
    else:
        weights = models.get_model_weights(name).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not path.is_file():
            raise UserError(
                f"ImageNet weights for {name} are not in the local torch cache ({path}). On a machine with network run "
                f'`python scripts/download_models.py {name}` (or `python -c "import torchvision; '
                f"torchvision.models.{name}(weights='DEFAULT')\"`) and copy the file there, or set "
                f"{config_key}=/path/to/file.pth."
            )
    return torch.load(path, map_location="cpu", weights_only=True)
