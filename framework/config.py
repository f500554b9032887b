"""Small helpers around configs: OmegaConf nodes as plain values, flat hparams tables, checked values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from framework.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
# The only defaults in the signature of a class or function that a `_target_` in conf/ names (every other setting's
# default lives in its YAML, once): arguments that checkpoints written before them lack, or that only checkpoints
# set (load_from_checkpoint builds the module from the checkpoint's hyperparameters). tests/test_architecture.py
# fails on any other.
SIGNATURE_DEFAULTS = {
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.vae_fp32": "checkpoints from before model.vae_fp32",
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.multires_noise": (
        "checkpoints from before model.multires_noise (None: off)"
    ),
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.ema": "checkpoints from before model.ema (None: off)",
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.compile": "checkpoints from before model.compile",
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.quantize_base": "checkpoints from before the key",
    "lightning_modules.generation.dreambooth_lora.DreamBoothLoRA.class_prompt": (
        "checkpoints from before the class drift (a data input; None: no class drift)"
    ),
    "lightning_modules.captioning.cnn_rnn.CNNRNNCaptioner.scst": "checkpoints from before model.scst (None: no SCST)",
    "lightning_modules.captioning.cnn_rnn.CNNRNNCaptioner.metrics": "checkpoints from before model.metrics (None)",
    "lightning_modules.captioning.cnn_rnn.CNNRNNCaptioner.image_size": (
        "checkpoints from before the captioner recorded its training images' size (None: the data's transform)"
    ),
    "lightning_modules.explain.classifier.ShapesClassifier.image_size": (
        "checkpoints from before the shapes classifier recorded its training images' size (None: any size)"
    ),
    "lightning_modules.captioning.hf.HFCaptioner.architecture": (
        "only checkpoints set it: the model's config and processor files, to rebuild it without model.pretrained"
    ),
    # Data inputs of training only (the style image, the crop size checked against the loss network): not saved, so
    # a checkpoint loaded for predict or export builds the module without them.
    "lightning_modules.style.fast_style.FastStyle.style": "a data input of training only; checkpoints lack it",
    "lightning_modules.style.fast_style.FastStyle.crop_size": "a data input of training only; checkpoints lack it",
}


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


def compose(overrides: list[str], output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The config `python run.py OVERRIDES` runs, composed in this process (a required run, benchmarks, tests, the
    Captioner API); `output_dir`: its run dir (paths.output_dir, which Hydra's runtime gives a real run)."""
    from hydra import compose as compose_config
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [*overrides, *([f"paths.output_dir='{output_dir}'"] if output_dir is not None else [])]
    if GlobalHydra.instance().is_initialized():  # inside run.py's Hydra app: its config tree is this one
        return compose_config("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose_config("config", overrides=overrides)


def yaml_settings(group: Path, name: str) -> dict[str, Any]:
    """The settings of `group`/<name>.yaml with its defaults list applied as Hydra applies it to a model config: a
    plain entry (`- hf_captioner`) is a file of the same group under this one, a `key: name` entry a file of the
    subgroup `key` placed at `key` (files of the whole config, `# @package _global_`, are not model settings);
    `- name@key` (a block of its own, e.g. the explaining tasks' classifier) is left to the caller to give."""
    path = group / f"{name}.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    settings: dict[str, Any] = {}
    for entry in config.get("defaults", []):
        if isinstance(entry, str) and "@" not in entry and entry != "_self_":
            settings = OmegaConf.to_container(OmegaConf.merge(settings, yaml_settings(group, entry)))
        elif isinstance(entry, dict):
            ((key, choice),) = entry.items()
            if not (group / key / f"{choice}.yaml").read_text(encoding="utf-8").startswith("# @package _global_"):
                settings[key] = OmegaConf.to_container(OmegaConf.load(group / key / f"{choice}.yaml"))
    own = {key: value for key, value in config.items() if not key.startswith("_") and key != "defaults"}
    return OmegaConf.to_container(OmegaConf.merge(settings, own))


def model_settings(name: str, **values: Any) -> dict[str, Any]:
    """The constructor arguments conf/model/<name>.yaml gives (the one home of a module's defaults), `values` replacing
    some: for code that builds a module without Hydra (tests, benchmarks). Keys whose value is an interpolation of the
    composed config (e.g. `resolution: ${data.resolution}`) must be among `values`."""
    settings = yaml_settings(CONF / "model", name)
    settings.update(values)
    unresolved = [key for key, value in flatten(settings).items() if isinstance(value, str) and "${" in value]
    if unresolved:
        raise ValueError(
            f"conf/model/{name}.yaml: give {', '.join(unresolved)} (interpolations of the composed config)"
        )
    return settings


def positive(value: Any, key: str, integer: bool = False) -> Any:
    """`value` if it is a positive number (with `integer`, a whole one); a UserError naming `key` otherwise."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UserError(f"{key}={value} must be a positive {'whole number' if integer else 'number'}")
    if not value > 0:
        raise UserError(f"{key}={value} must be positive")
    return value
