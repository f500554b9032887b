"""Collecting Python objects from every process of a distributed run."""

from __future__ import annotations

import torch.distributed as dist


def gather_objects(obj) -> list:
    """A list with `obj` from every rank (just [obj] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
