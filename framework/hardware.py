"""The machine a run gets: `trainer.accelerator: auto` and `trainer.precision: auto` made
concrete, device counts checked.

    accelerator: auto  ->  gpu when CUDA has a device, else cpu
    precision:   auto  ->  bf16-mixed on GPUs with bfloat16 (Ampere and newer), else 32-true
                           (CPUs and older GPUs: fp16 autocast needs loss scaling and overflows in places such
                           as the SDXL VAE, so it is asked for explicitly with trainer.precision=16-mixed)

So `python run.py task=blip_coco trainer.devices=4` trains with DDP on 4 GPUs in bf16-mixed on a 4-GPU machine
(Lightning picks DDP for several devices), and `python run.py` runs on the CPU where there is no GPU. The run's
config.yaml records the concrete values. Checked here, before anything is built: GPUs asked for that the machine
does not have (the types and ranges of every trainer setting: framework/schema.py).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, ListConfig

from framework.errors import UserError

log = logging.getLogger(__name__)

GPU_NAMES = ("gpu", "cuda")


def resolve_trainer(trainer: DictConfig, cuda_devices: int | None = None, bf16: bool | None = None) -> DictConfig:
    """Replace `auto` accelerator and precision in `trainer` (a cfg.trainer node, changed in place) by what this
    machine runs, and check the request against it. `cuda_devices` and `bf16` default to what torch sees."""
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    requested = str(trainer.get("accelerator", "auto"))
    if requested == "auto":
        trainer.accelerator = "gpu" if cuda_devices else "cpu"
        if not cuda_devices and wanted_devices(trainer.get("devices", 1)) > 1:
            raise UserError(
                f"trainer.devices={trainer.devices} asks for {trainer.devices} GPUs, but this machine has "
                "no CUDA GPU: for several CPU processes use trainer=ddp_sim (or trainer.accelerator=cpu)"
            )
    if trainer.accelerator in GPU_NAMES:
        check_gpus(trainer, cuda_devices)
    if str(trainer.get("precision", "auto")) == "auto":
        on_gpu = trainer.accelerator in GPU_NAMES
        if on_gpu and bf16 is None:
            bf16 = torch.cuda.is_bf16_supported()
        trainer.precision = "bf16-mixed" if on_gpu and bf16 else "32-true"
    elif trainer.accelerator == "cpu" and str(trainer.precision) in ("16-mixed", "16"):
        # What Lightning would run instead, recorded as what ran: CPUs have no fp16 autocast.
        log.warning("trainer.precision=%s: CPUs have no fp16 mixed precision; running bf16-mixed", trainer.precision)
        trainer.precision = "bf16-mixed"
    log.info(
        "trainer: accelerator=%s devices=%s precision=%s",
        trainer.accelerator,
        trainer.get("devices"),
        trainer.precision,
    )
    return trainer


def check_gpus(trainer: DictConfig, cuda_devices: int) -> None:
    if not cuda_devices:
        raise UserError(
            f"trainer.accelerator={trainer.accelerator} (trainer=gpu, ddp or fsdp) but this machine has no "
            "CUDA GPU (torch.cuda.device_count() is 0): drop trainer=gpu/ddp/fsdp to run on the CPU "
            "(trainer.accelerator=auto picks a GPU when there is one), or use trainer=ddp_sim for "
            "several CPU processes"
        )
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, ListConfig)):
        too_high = [index for index in devices if int(index) >= cuda_devices]
        if too_high:
            raise UserError(
                f"trainer.devices={list(devices)} names GPU {too_high[0]}, but this machine has "
                f"{cuda_devices} (indices 0..{cuda_devices - 1})"
            )
    elif wanted_devices(devices) > cuda_devices:
        raise UserError(
            f"trainer.devices={devices} asks for more GPUs than this machine has ({cuda_devices}): "
            f"use trainer.devices={cuda_devices} (or -1 for all), or trainer.num_nodes for more machines"
        )


def wanted_devices(devices) -> int:
    """How many devices a `trainer.devices` value asks for (-1 and 'auto': all there are, counted as 1 here)."""
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, str):
        return 1 if devices == "auto" else len([d for d in devices.split(",") if d.strip()])
    return len(devices)
