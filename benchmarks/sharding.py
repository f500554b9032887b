"""Memory of a BLIP-base training state, one process against FSDP2 (trainer=fsdp) over 2 processes.

The model of benchmarks/blip_throughput.py (BlipForConditionalGeneration with the sizes of
Salesforce/blip-image-captioning-base, random weights, nothing downloaded), trained for one step with AdamW: once in
one process, once sharded as trainer=fsdp shards it (`framework.fsdp.shard` with BLIP's `fsdp_layers`) over 2
processes (gloo on the CPU). What is measured is the training state each process holds between steps: parameters,
gradients and optimizer states, counted as the bytes of each process's tensors (for FSDP, their local shards).
Activations and the parameters a unit gathers for its forward and backward are transient and not counted.

Prints the bytes per process of each, then `ratio: fsdp_memory_saving = <one process / per FSDP rank (largest)>`.

    python benchmarks/sharding.py            # CPU, 2 gloo processes (~2 min on 2 cores)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from blip_throughput import batch, blip_base  # benchmarks/blip_throughput.py, next to this script
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from framework.fsdp import import_classes, mixed_precision, shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 2


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def training_state_bytes(model: torch.nn.Module) -> dict[str, int]:
    """One AdamW step on one 384 px image; then the bytes of parameters, gradients and optimizer states held here."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    model(**batch(1, torch.device("cpu"))).loss.backward()
    optimizer.step()
    parameters = list(model.parameters())
    return {
        "parameters": sum(local_bytes(p) for p in parameters),
        "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
        "optimizer states": sum(
            local_bytes(value) for state in optimizer.state.values() for value in state.values() if value.dim() > 0
        ),
    }


def sharded_rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the two ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        torch.manual_seed(0)
        model = blip_base()
        layers = OmegaConf.load(os.path.join(ROOT, "conf", "model", "sharding", "blip.yaml")).fsdp_layers
        shard(model, import_classes(layers), init_device_mesh("cpu", (RANKS,)), mixed_precision("32-true"))
        results[rank] = training_state_bytes(model)
    finally:
        dist.destroy_process_group()


def show(name: str, state: dict[str, int]) -> int:
    total = sum(state.values())
    parts = ", ".join(f"{key} {value / 2**20:.0f} MiB" for key, value in state.items())
    print(f"{name}: {total / 2**20:.0f} MiB ({parts})")
    return total


def main() -> None:
    torch.manual_seed(0)
    single = show("one process", training_state_bytes(blip_base()))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sharded_rank, args=(find_free_network_port(), results), nprocs=RANKS)
        per_rank = [show(f"FSDP2 rank {rank} of {RANKS}", results[rank]) for rank in range(RANKS)]
    print(f"ratio: fsdp_memory_saving = {single / max(per_rank):.2f}")


if __name__ == "__main__":
    main()
