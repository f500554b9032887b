"""Memory and step time of BLIP-base training: one process (and DDP) against FSDP2 (trainer=fsdp) on 2 processes.

The model of benchmarks/blip_throughput.py (BlipForConditionalGeneration with the sizes of
Salesforce/blip-image-captioning-base, random weights, nothing downloaded), trained with AdamW on 2 images of 384 px
a step: in one process (2 threads), with DDP over 2 processes and sharded as trainer=fsdp shards it
(`framework.fsdp.shard` with BLIP's `fsdp_layers`) over 2 processes (gloo on the CPU, 1 image and 1 thread a process,
as trainer=ddp_sim and trainer=fsdp_sim).

Memory: the training state each process holds between steps after its first step: parameters, gradients and
optimizer states, counted as the bytes of each process's tensors (for FSDP, their local shards). Activations and the
parameters a unit gathers for its forward and backward are transient and not counted.

Step time: one untimed step of each, then the median of --steps timed ones (for 2 processes, from a barrier to a
barrier; DDP and FSDP2 take turns step by step, both models held at once, so that changes in the machine's load fall
on both). All three do the same work on the same 2 cores; DDP and FSDP2 differ only in what each process holds and
communicates: DDP holds the whole model and all-reduces the gradients, FSDP2 gathers every unit's parameters for its
forward and again for its backward and reduce-scatters its gradients.

Prints the bytes per process of one process and of the FSDP2 ranks, then
`ratio: fsdp_memory_saving = <one process / per FSDP rank (largest)>`, the seconds per step of the three, then
`ratio: fsdp_step_time_vs_one_process` and `ratio: fsdp_step_time_vs_ddp`, the other's step time / FSDP2's (below 1:
FSDP2's steps are slower).

    python benchmarks/sharding.py [--steps 2]   # CPU, 2 gloo processes: ~2.5 min on 2 cores, 16-17 GiB of RAM
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from blip_throughput import batch, blip_base  # benchmarks/blip_throughput.py, next to this script
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from framework.fsdp import import_classes, mixed_precision, shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 2


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    optimizer.step()


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes of parameters, gradients and optimizer states held here (after a step)."""
    parameters = list(model.parameters())
    return {
        "parameters": sum(local_bytes(p) for p in parameters),
        "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
        "optimizer states": sum(
            local_bytes(value) for state in optimizer.state.values() for value in state.values() if value.dim() > 0
        ),
    }


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> float:
    """The time of one training step (in a process group, from all ranks' start to all ranks' end)."""
    distributed = dist.is_initialized()
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    train_step(model, optimizer, inputs)
    if distributed:
        dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, port: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the two ranks share the cores
    # BLIP's class embedding [1, 1, 768] gets a gradient of other strides than its bucket's: one small copy a step
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        inputs = batch(1, torch.device("cpu"))
        torch.manual_seed(0)
        sharded = blip_base()
        layers = OmegaConf.load(os.path.join(ROOT, "conf", "model", "sharding", "blip.yaml")).fsdp_layers
        shard(sharded, import_classes(layers), init_device_mesh("cpu", (RANKS,)), mixed_precision("32-true"))
        torch.manual_seed(0)
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
        replicated = DistributedDataParallel(blip_base(), gradient_as_bucket_view=True)
        runs = {"DDP": (replicated, adamw(replicated)), "FSDP2": (sharded, adamw(sharded))}
        for model, optimizer in runs.values():
            train_step(model, optimizer, inputs)  # warm-up: kernels, optimizer state
        memory = training_state_bytes(*runs["FSDP2"])
        # the two take turns step by step, so that a change in the machine's load falls on both
        times = {name: [] for name in runs}
        for _ in range(steps):
            for name, (model, optimizer) in runs.items():
                times[name].append(step_seconds(model, optimizer, inputs))
        results[rank] = memory, statistics.median(times["DDP"]), statistics.median(times["FSDP2"])
    finally:
        dist.destroy_process_group()


def one_process_main(_, steps: int, results) -> None:
    """The one-process setting, in a process of its own: its 3.4 GiB go back to the system before the ranks start."""
    torch.set_num_threads(RANKS)  # the cores the ranks share
    torch.manual_seed(0)
    model = blip_base()
    optimizer = adamw(model)
    inputs = batch(RANKS, torch.device("cpu"))
    train_step(model, optimizer, inputs)  # warm-up, and the state counted
    memory = training_state_bytes(model, optimizer)
    results["one process"] = memory, statistics.median(step_seconds(model, optimizer, inputs) for _ in range(steps))


def show(name: str, state: dict[str, int]) -> int:
    total = sum(state.values())
    parts = ", ".join(f"{key} {value / 2**20:.0f} MiB" for key, value in state.items())
    print(f"{name}: {total / 2**20:.0f} MiB ({parts})")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps of each setting")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    print(
        f"BLIP-base-sized, random weights, AdamW, {RANKS} images of 384 px a step: one process of {RANKS} threads, "
        f"{RANKS} gloo processes of 1 image and 1 thread; {args.steps} timed steps after 1; torch {torch.__version__}",
        flush=True,
    )
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(one_process_main, args=(args.steps, results), nprocs=1)
        single_state, single_seconds = results["one process"]
        single = show("one process", single_state)
        mp.spawn(rank_main, args=(find_free_network_port(), args.steps, results), nprocs=RANKS)
        per_rank = [show(f"FSDP2 rank {rank} of {RANKS}", results[rank][0]) for rank in range(RANKS)]
        ddp, fsdp = results[0][1:]  # the ranks wait for each other: their times are the same
    print(f"ratio: fsdp_memory_saving = {single / max(per_rank):.2f}")
    print(
        f"seconds per step (median of {args.steps}): one process {single_seconds:.2f}, DDP {ddp:.2f}, FSDP2 {fsdp:.2f}"
    )
    print(f"ratio: fsdp_step_time_vs_one_process = {single_seconds / fsdp:.2f}")
    print(f"ratio: fsdp_step_time_vs_ddp = {ddp / fsdp:.2f}")


if __name__ == "__main__":
    main()
