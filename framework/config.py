"""Small helpers around configs: OmegaConf nodes as plain values, flat hparams tables, checked values."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from framework.errors import UserError


def to_plain(value: Any) -> Any:
    """Plain dicts and lists for config nodes, so checkpoints hold no OmegaConf objects (weights_only loads)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for hparams tables."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def positive(value: Any, key: str, integer: bool = False) -> Any:
    """`value` if it is a positive number (with `integer`, a whole one); a UserError naming `key` otherwise."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UserError(f"{key}={value} must be a positive {'whole number' if integer else 'number'}")
    if not value > 0:
        raise UserError(f"{key}={value} must be positive")
    return value
