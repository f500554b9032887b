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
processes.

Signals (SIGTERM, SIGINT, SIGUSR1): saving a sharded checkpoint is a collective of every rank. Lightning's own SIGTERM
handling broadcasts from inside the signal handler and stops each rank on its own flag, so a rank that got the signal
would save alone (a run hung); callbacks/signals.py has the ranks agree on a signal at the start of each training
batch, so they stop after the same batch and save `last.ckpt` together.
"""

from __future__ import annotations

from collections.abc import Sequence

import hydra
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
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
                f"trainer=fsdp: task={task} (module {name}) does not shard itself: FSDP is supported for the BLIP and "
                "ViT-GPT2 captioning tasks so far; use trainer=ddp (or trainer=ddp_sim on a CPU)"
            )
        if not layers:
            raise UserError(
                f"trainer=fsdp: task={task} lists no fsdp_layers: name the layer classes that become FSDP units "
                "(e.g. fsdp_layers=[transformers.models.blip.modeling_blip.BlipEncoderLayer])"
            )
        self.layer_classes = import_classes(layers)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


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


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 weights of a sharded `module`, on rank 0's CPU ({} on the other ranks); every rank must
    call it (the shards are gathered)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedByLayers:
    """LightningModule mixin: under FSDP2Strategy, `configure_model` shards `fsdp_root()` by the strategy's layer
    classes; the methods in `fsdp_methods` (e.g. `generate`, called outside forward) gather parameters as forward
    does."""

    fsdp_methods: tuple[str, ...] = ()

    def fsdp_root(self) -> torch.nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        # Also called by load_from_checkpoint (no trainer) and again by each trainer.fit/test/... (already sharded).
        strategy = self._trainer.strategy if self._trainer is not None else None
        root = self.fsdp_root()
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(root):
            return
        shard(root, strategy.layer_classes, self.device_mesh["data_parallel"], mixed_precision(self.trainer.precision))
        for name in self.fsdp_methods:
            register_fsdp_forward_method(root, name)
