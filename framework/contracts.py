"""The contracts by which modules, data modules and callbacks take part in a run (docs/ARCHITECTURE.md, Protocols).

A class takes part by declaring a contract: it derives from it. Where it is used the contract is checked with
`isinstance` (the protocols are runtime-checkable) or, for the class attributes the runner reads before it builds
the module, `issubclass`. A class that declares a protocol but lacks one of its methods or class attributes (a
misspelt name, say) is a TypeError when the class is created, naming the class and what it lacks; a declared
instance attribute it never sets is an AttributeError where it is read. Nothing is switched off in silence.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


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


class ExplainsCheckpoint(BuildsFromConfig):
    """Marker. As BuildsFromConfig, also with ckpt_path: ckpt_path names the model the module explains (its config
    reads it as ${ckpt_path}), not a checkpoint of the module."""


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


# -- runner -> LightningDataModule ------------------------------------------------------------------------------------
@runtime_checkable
class ProvidesModelInputs(Contract, Protocol):
    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments the module is built with from the data (a captioner's vocabulary, a classifier's labels,
        the image size). The runner calls it before building the module, after the data module's `prepare_data`
        (framework/runner.py `model_inputs`: one process of a node at a time)."""


# -- LightningModule -> LightningDataModule ---------------------------------------------------------------------------
@runtime_checkable
class CachesFeatures(Contract, Protocol):
    def enable_feature_cache(self, encoder: torch.nn.Module) -> None:
        """Serve the running stage's splits as `encoder`'s cached features instead of images. A captioner with a
        frozen encoder calls it in its `setup`, on every rank (global rank 0 builds the caches, the others wait)."""


@runtime_checkable
class TakesImageTransform(Contract, Protocol):
    def set_image_transform(self, transform: Callable) -> None:
        """Prepare images with `transform` (PIL image -> tensor) from now on. Hugging Face captioners call it in their
        `setup` with their image processor, which then decides size and normalisation."""


@runtime_checkable
class NeedsModelOutputs(Contract, Protocol):
    """A data module whose preparation needs the model's outputs (DreamBooth: generated class images, the VAE's
    latents). It names what it needs as data and takes the results as data; the module does the model's work at fit
    start (`on_fit_start`): global rank 0 writes the class images while the other ranks wait at a barrier, then every
    rank encodes the latent cache. `class_batch_size`: how many class images to generate at a time."""

    class_batch_size: int

    def missing_class_images(self) -> list[tuple[str, int, Path]]:
        """(prompt, seed, path) of each class image the data still lacks: write each there (framework.files.write_png)
        before the data is read."""

    def views_to_encode(self) -> Iterator[tuple[list, torch.Tensor]]:
        """The training views the latent cache needs (none without data.cache_latents, or once set): batches
        (views, pixels in [-1, 1]), read as they are drawn."""

    def set_latent_cache(self, encoded: list[tuple[list, torch.Tensor]]) -> None:
        """Serve the training items from the latent distribution parameters (mean and log variance) of the batches'
        pixels, handed back with their views, from now on; an empty list changes nothing."""


@runtime_checkable
class ServesReferenceImages(Contract, Protocol):
    def reference_images(self) -> list:
        """The real images generated ones are compared with (subject fidelity: CLIP-I, DINO). Read by the
        DreamBooth module on global rank 0 when it scores a validation or test stage, only if it scores."""


@runtime_checkable
class ServesImageFolder(Contract, Protocol):
    """`images`: the folder the predict images come from (None: the data set's own), set by the data module's
    __init__ (data.images). The explaining modules name their files by the path under it."""

    images: str | None


# -- callbacks -> LightningModule / LightningDataModule (callbacks/) --------------------------------------------------
@runtime_checkable
class HasCaptionPredictions(Contract, Protocol):
    """`predictions[stage]` ("val", "test"): image id -> {"caption", "references", "path"}, every rank's, gathered by
    the module at the stage's epoch end. CaptionMedia (after validation) and CaptionPredictions (after test) read it
    on global rank 0."""

    predictions: dict[str, dict]


@runtime_checkable
class HasGeneratedSamples(Contract, Protocol):
    """`generated[stage]` ("val", "test"): rows {"prompt", "seed", "image" (PIL)}, every rank's. DiffusionSamples
    reads it after validation and test, on global rank 0."""

    generated: dict[str, list[dict]]


@runtime_checkable
class Attends(Contract, Protocol):
    def attend(self, image: torch.Tensor) -> tuple[list[str], torch.Tensor | None]:
        """The greedy caption's words of one prepared image [3, H, W] and the decoder's attention per word [words,
        h, w] (None without attention). CaptionMedia calls it after validation, on global rank 0, on the data
        module's first `val_examples` image."""


@runtime_checkable
class ServesValExamples(Contract, Protocol):
    def val_examples(self, count: int) -> list[dict]:
        """The first `count` readable validation items ({"image": prepared tensor, "path", ...}): fixed images for
        the TensorBoard review (CaptionMedia)."""
