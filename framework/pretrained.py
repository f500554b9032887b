"""Pretrained weights without downloading, and the models the configs name (what scripts/download_models.py lists).

Runs never download: Hugging Face models load from a local `save_pretrained` folder or from the local Hugging Face
cache (`load_offline`), torchvision weights from a file or the torch cache (framework/weights.py). A missing model is
one UserError naming the config key and the `scripts/download_models.py` command that fetches it.

The models a task may need are not listed by hand: `configured_models()` finds them in conf/, as the model settings
name them: Hugging Face hub ids (`owner/name`, e.g. model.pretrained) and torchvision model names (e.g.
model.encoder.name=resnet50), each with the config files and keys that name it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from framework.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
DOWNLOAD = "python scripts/download_models.py"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
GLOBAL_PACKAGE = "# @package _global_"  # a config file whose keys are the whole config's (tasks, experiments)


@dataclass(frozen=True)
class Weights:
    source: Literal["hub", "torchvision"]  # a Hugging Face repository, or a torchvision model's ImageNet weights
    name: str  # the hub id, or the torchvision model name
    used_by: tuple[str, ...]  # where conf/ names it: "conf/model/blip.yaml: model.pretrained", ...


def download_command(*names: str) -> str:
    """The command that fetches hub ids or torchvision model names into the local caches."""
    return f"{DOWNLOAD} {' '.join(names)}"


@functools.cache
def torchvision_models() -> frozenset[str]:
    """The names of torchvision's models that have pretrained weights."""
    from torchvision import models

    return frozenset(name for name in models.list_models() if models.get_model_weights(name) is not None)


def is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and HUB_ID.fullmatch(value) is not None


def model_settings_in(path: Path, conf: Path = CONF) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every model setting a config file of `conf` gives: all of a model/ file, the `model` block
    of a file of the whole config (a task, an experiment)."""
    import yaml

    text = path.read_text(encoding="utf-8-sig")
    config = yaml.safe_load(text) or {}
    if text.lstrip().startswith(GLOBAL_PACKAGE):
        config = config.get("model") if isinstance(config.get("model"), dict) else {}
    elif conf / "model" not in path.parents:
        return

    def walk(node: Any, key: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for name, value in node.items():
                yield from walk(value, f"{key}.{name}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{key}[{i}]")
        else:
            yield key, node

    yield from walk(config, "model")


def configured_models(conf: Path = CONF) -> dict[str, Weights]:
    """Every hub id and torchvision model name that a model setting in conf/ gives, with where: hub ids first, each
    group sorted by name."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        for key, value in model_settings_in(path, conf):
            source = "hub" if is_hub_id(value) else "torchvision" if value in torchvision_models() else None
            if source is not None:
                where = f"{path.relative_to(conf.parent)}: {key}"
                found.setdefault((source, value), []).append(where)
    ordered = sorted(found, key=lambda item: (item[0] != "hub", item[1].lower()))
    return {name: Weights(source, name, tuple(found[source, name])) for source, name in ordered}


def load_offline(load: Callable, source: str, key: str, *, subfolder: str | None = None, download: str = ""):
    """`load(source, local_files_only=True)` (a `from_pretrained`), from a local folder or the local Hugging Face
    cache; a missing folder, a folder of something else and an uncached hub id are each one UserError naming `key`
    and, for a hub id, the command that fetches it (`download`: what to fetch, when that is not `source` itself)."""
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
            f"network run `{download_command(download or source)}` (then copy the cache here if needed), "
            f"or set {key}=/path/to/a/save_pretrained/dir ({reason})"
        ) from None
