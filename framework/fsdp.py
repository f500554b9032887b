"""FSDP auto-wrap policies from config: each task names the layer classes that become FSDP units."""

from __future__ import annotations

import hydra
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from framework.errors import UserError


def layer_policy(layers: list[str]) -> ModuleWrapPolicy | None:
    """Wrap every module of the named classes (dotted paths, from the task's `fsdp_layers`) in its own FSDP unit;
    no names: FSDP wraps the whole model as one unit."""
    if not layers:
        return None
    classes = set()
    for name in layers:
        try:
            classes.add(hydra.utils.get_class(name))
        except Exception as error:
            raise UserError(f"fsdp_layers: cannot import layer class '{name}' ({error})") from None
    return ModuleWrapPolicy(classes)
