"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy.

`trainer=fsdp` (GPUs) and `trainer=fsdp_sim` (2 CPU processes, gloo) use `FSDP2Strategy`: every process is a
data-parallel rank holding 1/N of the parameters, gradients and optimizer states. A task takes part by listing the
layer classes that become FSDP units in `fsdp_layers` and by a module that mixes in `ShardedByLayers`, whose
`configure_model` shards it: each module of those classes is one unit (its parameters are gathered for its forward and
freed after), the rest of the model is the root unit.

Precision: `trainer.precision=bf16-mixed` keeps parameters, gradients and optimizer states in fp32 (the sharded
master weights); each unit gathers its parameters as bf16 for compute and reduces gradients in fp32
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`). Lightning's bf16 autocast stays on around each step
as under DDP, so the ops autocast keeps in fp32 (softmax, norms, losses) stay in fp32.

Checkpoints are torch.distributed.checkpoint directories (one shard file per rank plus Lightning's `meta.pt`);
framework/checkpoints.py reads them on one process, and DCP reshards them when a run resumes on another number of
processes. A module whose checkpoints hold only the weights it trains (DreamBooth LoRA: the adapters, not the frozen
SDXL) sets `strict_loading = False`: its sharded checkpoints load the weights they have, the others stay as built.

Signals (SIGTERM, SIGINT, SIGUSR1): saving a sharded checkpoint is a collective of every rank. Lightning's own SIGTERM
handling broadcasts from inside the signal handler and stops each rank on its own flag, so a rank that got the signal
would save alone (a run hung); callbacks/signals.py has the ranks agree on a signal at the start of each training
batch, so they stop after the same batch and save `last.ckpt` together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from framework.errors import UserError


def import_classes(names: Sequence[str]) -> tuple[type, ...]:
    classes = []
    for name in names:
        try:
            classes.append(hydra.utils.get_class(name))
        except Exception as error:
            raise UserError(f"fsdp_layers: cannot import layer class '{name}' ({error})") from None
    return tuple(classes)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy as pure FSDP2: one data-parallel dimension over every process, no tensor parallelism
    (its `data_parallel_size="auto"` would mean one rank per node and tensor parallelism within the node).

    `layers`: the task's `fsdp_layers`; `task` and `module` (the task name and its LightningModule class) let a task
    that cannot be sharded fail here, before any process is started."""

    def __init__(self, layers: Sequence[str], task: str, module: str | None, **kwargs):
        super().__init__(tensor_parallel_size=1, **kwargs)
        module_class = hydra.utils.get_class(module) if module else None
        if module_class is None or not issubclass(module_class, ShardedByLayers):
            name = module_class.__name__ if module_class else "none"
            raise UserError(
                f"trainer=fsdp: task={task} (module {name}) does not shard itself: FSDP is supported for the Hugging "
                "Face captioners (model=hf_captioner, blip, vit_gpt2) and SDXL DreamBooth LoRA (task=sdxl_dreambooth) "
                "so far; use trainer=ddp (or trainer=ddp_sim on a CPU)"
            )
        if not layers and not module_class.layers_from_model:
            raise UserError(
                f"trainer=fsdp: task={task} lists no fsdp_layers: name the layer classes that become FSDP units "
                "(e.g. fsdp_layers=[transformers.models.blip.modeling_blip.BlipEncoderLayer])"
            )
        self.layer_classes = import_classes(layers)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        # Lightning reseeds the global RNGs here (reset_seed); every process has run the same seeding and model
        # building (the launcher starts each from the script), so keeping their states keeps them alike on all ranks
        # and where one process has them: a sharded run draws (noise, dropout) what a one-process run draws. (Not the
        # CUDA ones: nothing drew from them before, and reading every GPU's would open a context on each, per rank.)
        states = _collect_rng_states(include_cuda=False)
        super().setup_environment()
        _set_rng_states(states)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """ModelParallelStrategy's, except that a module with `strict_loading = False` (its checkpoints hold only what
        it trains) leaves its frozen parameters out here already: Lightning's copies every weight to the CPU first,
        the frozen SDXL UNet's shards included, at every save."""
        if self.lightning_module.strict_loading:
            return super().lightning_module_state_dict()
        options = StateDictOptions(
            full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True, ignore_frozen_params=True
        )
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """ModelParallelStrategy's, except for a sharded checkpoint of a module with `strict_loading = False`: the
        weights the checkpoint holds are loaded (Lightning's load asks for every weight of the module), the others
        stay as the module was built; every trained parameter must be there."""
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if module.strict_loading or not (path / _METADATA_FILENAME).is_file():
            return super().load_checkpoint(path, weights_only)
        keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {key.removeprefix("state_dict.") for key in keys if key.startswith("state_dict.")}
        weights = get_model_state_dict(self.model)
        missing = sorted(name for name, p in module.named_parameters() if p.requires_grad and name not in saved)
        unexpected = sorted(saved - set(weights))
        if missing or unexpected:
            example = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model has not"
            raise UserError(
                f"checkpoint {path} does not fit this model ({len(missing)} trained weights missing, "
                f"{len(unexpected)} unknown; it {example}): it was written with other model settings"
            )
        weights = {k: v for k, v in weights.items() if k in saved}
        dcp.load({"state_dict": weights}, checkpoint_id=path)
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):  # as Lightning's load
            state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{index}"], options=options)
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy for a Lightning precision: bf16 compute on fp32 master weights for bf16-mixed, else none
    (32-true; bf16-true converts the module itself)."""
    if str(precision) == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(
    module: torch.nn.Module, layer_classes: tuple[type, ...], mesh, mp_policy: MixedPrecisionPolicy
) -> torch.nn.Module:
    """`fully_shard` every module of `layer_classes` (innermost first), then `module` as the root unit."""
    layers = [m for m in reversed(list(module.modules())) if isinstance(m, layer_classes) and m is not module]
    if not layers:
        names = ", ".join(c.__name__ for c in layer_classes)
        raise UserError(f"fsdp_layers: {type(module).__name__} has no layer of class {names}: name its layer classes")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    return fully_shard(module, mesh=mesh, mp_policy=mp_policy)


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def full_state_dict(module: torch.nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded fp32 weights of a sharded `module` (with `trained_only`, its parameters that require grad and
    its buffers), on rank 0's CPU ({} on the other ranks); every rank must call it (the shards are gathered)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(module, options=options)


class ShardedByLayers:
    """LightningModule mixin: under FSDP2Strategy, `configure_model` shards `fsdp_root()` by the strategy's layer
    classes; the methods in `fsdp_methods` (e.g. `generate`, called outside forward) gather parameters as forward
    does."""

    fsdp_methods: tuple[str, ...] = ()
    layers_from_model = False  # true: without fsdp_layers in the config, the module's own `fsdp_layers()`

    def fsdp_layers(self) -> list[str]:
        """The layer classes that become FSDP units when the config names none (layers_from_model)."""
        raise NotImplementedError

    def fsdp_root(self) -> torch.nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        # Also called by load_from_checkpoint (no trainer) and again by each trainer.fit/test/... (already sharded).
        strategy = self._trainer.strategy if self._trainer is not None else None
        root = self.fsdp_root()
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(root):
            return
        layers = strategy.layer_classes or import_classes(self.fsdp_layers())
        shard(root, layers, self.device_mesh["data_parallel"], mixed_precision(self.trainer.precision))
        for name in self.fsdp_methods:
            register_fsdp_forward_method(root, name)
