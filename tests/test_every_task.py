"""Every task under the settings that take it from a laptop to a cluster: `trainer.precision=bf16-mixed` and two
processes (`trainer=ddp_sim`, DDP over gloo).

On a CPU Lightning autocasts to bfloat16 and runs DDP as it does on GPUs, so the mistakes that only show there
fail these runs here: a bfloat16 map handed to numpy, a parameter that gets no gradient (DDP stops on it), a
global batch that does not split over the processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from hydra.utils import instantiate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from framework import runner
from framework.errors import UserError
from framework.fsdp import is_sharded, mixed_precision, shard
from framework.runner import run
from lightning_modules.generation.tiny import save_tiny_sdxl
from tests.conftest import TINY_SHAPES, compose_config, read_metrics, run_cli
from tests.test_blip import OVERFIT, tiny_blip_dir
from tests.test_classifier import shapes_checkpoint  # noqa: F401 (session fixture: the explaining tasks use it)
from tests.test_dreambooth import RESOLUTION, save_images, tiny_args
from tests.test_explain import SALIENCY
from tests.test_fast_style import TINY_CLI
from tests.test_style_transfer import write_image
from tests.test_vit_gpt2 import save_tiny_vit_gpt2


def fast_style_args(root: Path) -> list[str]:
    (root / "content").mkdir()
    for i in range(4):
        write_image(root / "content" / f"c{i}.png", (48, 40), seed=i)
    style = write_image(root / "style.png", (64, 64), seed=99)
    return [
        "task=fast_style",
        *TINY_CLI,
        f"data.folder={root / 'content'}",
        f"data.style={style}",
        "trainer.max_epochs=1",
    ]


# Each task shrunk to seconds (the tiny models its own tests build; one epoch or a few steps), with global batches
# that two processes can share.
TASKS = {
    "shapes_captioning": lambda root, data: ["task=shapes_captioning", *TINY_SHAPES, "trainer.max_epochs=1"],
    "blip_shapes": lambda root, data: [
        "task=blip_shapes",
        f"model.pretrained={tiny_blip_dir(data)}",
        *OVERFIT,
        "trainer.max_epochs=1",
    ],
    "vit_gpt2_shapes": lambda root, data: [
        "task=vit_gpt2_shapes",
        f"model.pretrained={save_tiny_vit_gpt2(root / 'm')}",
        *OVERFIT,
        "data.batch_size=2",
        "trainer.max_epochs=1",
    ],
    "sdxl_dreambooth": lambda root, data: tiny_args(
        save_tiny_sdxl(root / "sdxl", RESOLUTION),
        save_images(root / "dog", 2),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.batch_size=2",
        "data.test_prompts=[]",
    ),
    "shapes_classifier": lambda root, data: ["task=shapes_classifier", "trainer.max_epochs=1"],
    "saliency": lambda root, data: ["task=saliency", *SALIENCY],
    "adversarial": lambda root, data: ["task=adversarial", "model.attack=pgd", "data.num_predict=4"],
    "class_visualisation": lambda root, data: ["task=class_visualisation", "model.steps=5", "data.targets=[0,3]"],
    "style_transfer": lambda root, data: [
        "task=style_transfer",
        "data.image_size=48",
        "data.iterations=4",
        "model.image_every_n_steps=2",
    ],
    "fast_style": lambda root, data: fast_style_args(root),
}


def check_finished(run_dir: Path, **trainer: object) -> None:
    """The run used the trainer settings and every figure it wrote is finite."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert {key: config[key] for key in trainer} == trainer
    metrics = read_metrics(run_dir)
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_in_bf16_mixed(task, tmp_path, data_dir, shapes_checkpoint):  # noqa: F811
    # after the task's own args: tiny_args pins 32-true for the other DreamBooth tests
    run(
        compose_config(
            [*TASKS[task](tmp_path, data_dir), "trainer.precision=bf16-mixed", "logger=csv"], tmp_path / "run", data_dir
        )
    )
    check_finished(tmp_path / "run", precision="bf16-mixed")


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_on_two_processes(task, tmp_path, data_dir, shapes_checkpoint):  # noqa: F811
    run_cli([*TASKS[task](tmp_path, data_dir), "trainer=ddp_sim", "logger=csv"], tmp_path / "run", data_dir)
    check_finished(tmp_path / "run", strategy="ddp", devices=2)


# The tasks trainer=fsdp shards, with the classes of their fsdp_layers.
SHARDED = {
    "blip_shapes": {"BlipEncoderLayer", "BlipTextLayer"},
    "vit_gpt2_shapes": {"ViTLayer", "GPT2Block"},
    "sdxl_dreambooth": {"BasicTransformerBlock", "ResnetBlock2D"},  # the UNet's; the VAE and text encoders stay whole
}


@pytest.mark.parametrize("task", list(SHARDED))
def test_fsdp_units_are_the_layers_the_task_names(task, tmp_path, data_dir):
    """trainer=fsdp shards the task's model as configure_model does (here over a one-process gloo group): each layer
    of the classes in `fsdp_layers` is its own FSDP unit, the task's root (the transformers model, SDXL's UNet) the
    root unit, every parameter in it a DTensor. (tests/test_fsdp.py trains sharded over two processes.)"""
    cfg = compose_config([*TASKS[task](tmp_path, data_dir), "trainer=fsdp"], tmp_path / "run", data_dir)
    strategy, module = instantiate(cfg.trainer.strategy), instantiate(cfg.model)
    assert {layer.__name__ for layer in strategy.layer_classes} == SHARDED[task]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard(module.fsdp_root(), strategy.layer_classes, init_device_mesh("cpu", (1,)), mixed_precision("32-true"))
    finally:
        dist.destroy_process_group()
    root = module.fsdp_root()
    layers = [m for m in root.modules() if isinstance(m, strategy.layer_classes)]
    assert len(layers) >= 4 and all(is_sharded(layer) for layer in layers)  # 2 + 2 layers in the tiny captioners
    assert all(any(isinstance(layer, c) for layer in layers) for c in strategy.layer_classes)  # each class found
    assert is_sharded(root) and all(isinstance(p, DTensor) for p in root.parameters())


@pytest.mark.parametrize("task", [task for task in TASKS if task not in SHARDED])
def test_tasks_that_do_not_shard_refuse_fsdp(task, tmp_path, data_dir):
    cfg = compose_config([f"task={task}", "trainer=fsdp"], tmp_path, data_dir)
    refusal = rf"trainer=fsdp: task={task} \(module \w+\) does not shard itself.*trainer=ddp"
    with pytest.raises(UserError, match=refusal):
        runner.instantiate(cfg.trainer.strategy)


def test_fsdp_layers_must_name_layer_classes_of_the_model(tmp_path, data_dir):
    args = [*TASKS["blip_shapes"](tmp_path, data_dir), "trainer=fsdp"]

    def strategy(*overrides):
        return runner.instantiate(compose_config([*args, *overrides], tmp_path, data_dir).trainer.strategy)

    with pytest.raises(UserError, match=r"task=blip_shapes lists no fsdp_layers"):
        strategy("fsdp_layers=[]")
    with pytest.raises(UserError, match=r"fsdp_layers: cannot import layer class 'transformers.NoSuchLayer'"):
        strategy("fsdp_layers=[transformers.NoSuchLayer]")
    module = instantiate(compose_config(args, tmp_path, data_dir).model)
    with pytest.raises(UserError, match=r"BlipForConditionalGeneration has no layer of class Conv3d"):
        shard(module.model, (torch.nn.Conv3d,), mesh=None, mp_policy=mixed_precision("32-true"))
