"""The contracts by which modules, data modules and callbacks take part in a run (docs/ARCHITECTURE.md, Protocols).

A class takes part by declaring a contract: it derives from it. Where it is used the contract is checked with
`isinstance` (the protocols are runtime-checkable) or, for the class attributes the runner reads before it builds
the module, `issubclass`. A class that declares a protocol but lacks one of its methods or class attributes (a
misspelt name, say) is a TypeError when the class is created, naming the class and what it lacks; a declared
instance attribute it never sets is an AttributeError where it is read. Nothing is switched off in silence.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable


class Contract(Protocol):
    """The base of the protocols below; checks each class that declares one (it must define no other member: a
    protocol's members are what isinstance looks for)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls._is_protocol:
            check_members(cls)


def check_members(cls: type) -> None:
    """TypeError if `cls` lacks a method of a protocol it declares (an instance attribute, set in `__init__`, cannot
    be seen here)."""
    missing = []
    for protocol in cls.__mro__:
        if not getattr(protocol, "_is_protocol", False) or protocol in (Contract, Protocol):
            continue
        methods = [name for name, value in vars(protocol).items() if inspect.isfunction(value) and name[0] != "_"]
        for name in methods:
            owner = next(klass for klass in cls.__mro__ if name in vars(klass) or klass is protocol)
            if owner is protocol or getattr(owner, "_is_protocol", False):
                missing.append(f"{name} ({protocol.__name__})")
    if missing:
        name = f"{cls.__module__}.{cls.__qualname__}"
        raise TypeError(f"{name} declares a contract but does not define {', '.join(missing)}")


# -- runner -> LightningModule (framework/runner.py) ------------------------------------------------------------------
class BuildsFromConfig:
    """Marker. The runner's eval/predict/export without ckpt_path build the module from cfg.model (e.g. the pretrained
    weights named there, or the model an explaining module explains) instead of asking for a checkpoint."""


class InferenceOverrides:
    """The runner's eval/predict/export, loading the module from a checkpoint, override these hparams with the
    values in cfg.model (beam size, generation settings, ...). Each must be a parameter of the class's __init__:
    checked when the class is created."""

    inference_hparams: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names = getattr(cls, "inference_hparams", None)
        # __init__(..., **kwargs) passes on to its bases': their parameters count too
        inits = [vars(klass)["__init__"] for klass in cls.__mro__ if "__init__" in vars(klass)]
        parameters = {name for init in inits for name in inspect.signature(init).parameters}
        if names is None or any(name not in parameters for name in names):
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__}.inference_hparams={names}: give a tuple of __init__ parameters "
                f"(it has {', '.join(sorted(parameters - {'self', 'args', 'kwargs'}))})"
            )


@runtime_checkable
class Exports(Contract, Protocol):
    def export(self, directory: str | Path) -> Path:
        """Writes the module in the format its ecosystem loads (a Hugging Face save_pretrained dir, diffusers LoRA
        weights, ONNX) into `directory` and returns the path to load. The runner calls it in mode=export and after
        training (export_after_train), on global rank 0 (every rank under FSDP, which gathers the shards)."""


@runtime_checkable
class SavesPredictions(Contract, Protocol):
    def save_predictions(self, rows: list[dict], output_dir: Path) -> dict[str, float]:
        """Writes what predict produced into the run dir, instead of the runner's predictions.json/.csv, and returns
        the predict metrics. The runner calls it on global rank 0 once predict is over, with every rank's rows
        (`predict_step` returns a list of dicts with a unique "image" key), once per image, in path order."""


# -- callbacks -> LightningModule / LightningDataModule (callbacks/) --------------------------------------------------
@runtime_checkable
class HasCaptionPredictions(Contract, Protocol):
    """`predictions[stage]` ("val", "test"): image id -> {"caption", "references", "path"}, every rank's, gathered by
    the module at the stage's epoch end. CaptionMedia (after validation) and CaptionPredictions (after test) read it
    on global rank 0."""

    predictions: dict[str, dict]
