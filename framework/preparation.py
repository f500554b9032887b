"""What a model and its data take from each other, in one place: the runner does it with both objects in hand, so that
neither the LightningModule nor the data module calls the other (docs/ARCHITECTURE.md, Preparation).

Before the model is built, `model_inputs`: a module class names the constructor arguments it takes from its data in
`data_inputs` (a captioner's vocabulary and image size, a classifier's classes, the images of style transfer); the data
module's `model_inputs(names)` gives those (`given`: each computed only when asked for). Its `prepare_data`
(generating a synthetic set, say) runs first, one process of the node at a time.

Then `Preparation`, a callback the runner gives every trainer, at the start of each stage (`setup`: the data module's
own setup has run, the module's has not) links what each side offers, by the plain methods named here:

| what | the module | the data module |
| --- | --- | --- |
| images prepared as the model needs them | `image_transform()` (None: unknown) | `set_image_transform(transform)` |
| a frozen encoder's features, cached once | `frozen_encoder()` (None: not frozen) | `enable_feature_cache(encoder)` |
| the training captions (SCST's CIDEr-D) | `use_training_captions(captions)` | `training_captions()` |
| real images to score generated ones by | `use_reference_images(read)` | `reference_images()` (read lazily) |
| the folder predict images come from | `image_root` | `images` |
| the classes to choose from | `class_names` | `use_class_names(names)` |

and at fit start (`on_fit_start`: the model is on its device, cast to its precision), DreamBooth's preparation that
needs the model: the class images the data lacks (`missing_class_images()`, `class_batch_size`) written by the module
(`write_class_images(missing, batch_size, write)`) on global rank 0 while the others wait (every rank generates under
FSDP, whose forward is a collective; rank 0 writes), then the latent cache: every rank encodes the views the data names
(`views_to_encode()`) with `encode_latent_parameters(pixels)` and hands them back (`set_latent_cache(encoded)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L

from framework.errors import UserError
from framework.files import node_lock
from framework.fsdp import FSDP2Strategy


def model_inputs(module_class: type, datamodule: L.LightningDataModule | None) -> dict:
    """The constructor arguments `module_class` takes from the data (its `data_inputs`), the data prepared first."""
    names = tuple(getattr(module_class, "data_inputs", ()))
    if not names:
        return {}
    if not hasattr(datamodule, "model_inputs"):
        raise UserError(f"{module_class.__name__} is built from its data ({', '.join(names)}): choose the task's data")
    # One process of the node at a time: the others (the job's ranks, other jobs) wait, then find the data prepared
    # (prepare_data is idempotent: Lightning runs it again in fit).
    with node_lock("prepare"):
        datamodule.prepare_data()
    return datamodule.model_inputs(names)


def given(datamodule: object, names: tuple[str, ...], **providers: Callable[[], Any]) -> dict[str, Any]:
    """A data module's `model_inputs(names)`: each named input from its provider (called only when asked for); a
    name it does not provide is one UserError."""
    missing = [name for name in names if name not in providers]
    if missing:
        raise UserError(
            f"the model takes {', '.join(missing)} from its data, which {type(datamodule).__name__} does not give "
            f"(it gives {', '.join(providers)}): choose the task's data config"
        )
    return {name: providers[name]() for name in names}


def offers(obj: object, *names: str) -> bool:
    return obj is not None and all(hasattr(obj, name) for name in names)


class Preparation(L.Callback):
    """Added by the runner to every trainer (framework/runner.py build_trainer); see the module's docstring."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if offers(pl_module, "image_transform") and offers(data, "set_image_transform"):
            transform = pl_module.image_transform()
            if transform is not None:  # None: the model does not know (the data's own is used)
                data.set_image_transform(transform)
        if offers(pl_module, "frozen_encoder") and offers(data, "enable_feature_cache"):
            encoder = pl_module.frozen_encoder()
            if encoder is not None:
                data.enable_feature_cache(encoder)
        if stage == "fit" and offers(pl_module, "use_training_captions") and offers(data, "training_captions"):
            pl_module.use_training_captions(data.training_captions())
        if offers(pl_module, "use_reference_images") and offers(data, "reference_images"):
            pl_module.use_reference_images(data.reference_images)
        if offers(pl_module, "image_root") and offers(data, "images"):
            pl_module.image_root = data.images
        if offers(pl_module, "class_names") and offers(data, "use_class_names"):
            data.use_class_names(pl_module.class_names)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if offers(data, "missing_class_images") and offers(pl_module, "write_class_images"):
            every_rank = isinstance(trainer.strategy, FSDP2Strategy)
            if every_rank or trainer.is_global_zero:
                missing = data.missing_class_images() if trainer.is_global_zero else None
                if every_rank:
                    missing = trainer.strategy.broadcast(missing)
                pl_module.write_class_images(missing, data.class_batch_size, write=trainer.is_global_zero)
            trainer.strategy.barrier()
        if offers(data, "views_to_encode") and offers(pl_module, "encode_latent_parameters"):
            # one batch at a time; each batch's latents go to the CPU
            encoded = [
                (views, pl_module.encode_latent_parameters(pixels).cpu()) for views, pixels in data.views_to_encode()
            ]
            data.set_latent_cache(encoded)
