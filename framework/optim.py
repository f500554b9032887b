"""Optimizers and schedulers from config: one `configure_optimizers` for every LightningModule."""

from __future__ import annotations

import functools

import torch

from framework.errors import UserError

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch's fused Adam/AdamW kernels run (plain tensors and FSDP2 DTensors)


def fused_adam_by_default(factory, device: torch.device, mixed_precision: bool):
    """`factory` (a partial of the optimizer config) with `fused=True` when it makes torch.optim.Adam or AdamW on a
    device with the fused kernel and the config chooses no implementation (`fused` or `foreach`): one kernel for all
    parameters instead of a Python loop over them (torch's default off CUDA; foreach on CUDA), the same update
    within float rounding. It counts where there are many small tensors, such as LoRA's two matrices per layer.
    Under Lightning's mixed precision (`*-mixed`) `foreach=True` instead: Lightning refuses gradient clipping with
    an optimizer that unscales gradients itself, as the fused ones declare."""
    chosen = {"fused", "foreach"} & set(factory.keywords)
    if factory.func not in (torch.optim.Adam, torch.optim.AdamW) or chosen or device.type not in FUSED_ADAM_DEVICES:
        return factory
    return functools.partial(factory, **({"foreach": True} if mixed_precision else {"fused": True}))


class ConfiguredOptimizers:
    """Mix into a LightningModule (before `L.LightningModule`) whose hparams hold `optimizer` and optionally
    `scheduler`, both `_partial_` configs. What differs between tasks are the hooks below."""

    scheduler_interval = "epoch"  # Lightning's lr_scheduler "interval": "epoch" or "step"

    def optimizer_params(self):
        """The parameters (or parameter groups) to optimise: by default the trainable ones of `trainer.model`, the
        module as the strategy wrapped it (FSDP-safe)."""
        return [p for p in self.trainer.model.parameters() if p.requires_grad]

    def optimizer_factory(self):
        """`params -> optimizer`: the `_partial_` optimizer config, with plain lists rather than ListConfig (e.g.
        `betas`), so that checkpoints load with weights_only."""
        from hydra.utils import instantiate  # here, not at the top: benchmarks import the modules without Hydra

        return instantiate(self.hparams.optimizer, _convert_="all")

    def configure_optimizers(self) -> dict | torch.optim.Optimizer:
        from hydra.utils import instantiate

        if not self.hparams.get("optimizer"):
            raise UserError("model.optimizer is not set: give a _partial_ optimizer config to train (see conf/model/)")
        optimizer = self.optimizer_factory()(self.optimizer_params())
        if not self.hparams.get("scheduler"):
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
