"""Every task under the settings that take it from a laptop to a cluster: `trainer.precision=bf16-mixed` and two
processes (`trainer=ddp_sim`, DDP over gloo).

On a CPU Lightning autocasts to bfloat16 and runs DDP as it does on GPUs, so the mistakes that only show there
fail these runs here: a bfloat16 map handed to numpy, a parameter that gets no gradient (DDP stops on it), a
global batch that does not split over the processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from framework import runner
from framework.errors import UserError
from framework.fsdp import import_classes, is_sharded, mixed_precision, shard
from framework.runner import run
from tests.helpers.config import compose_config
from tests.helpers.tasks import TASKS, check_finished, shapes_classifier_checkpoint

# The tasks that explain the shapes classifier: by default the one the session trains (shapes_checkpoint, tens of
# seconds through run.py), so their runs are slow tests; test_explaining_tasks_run_on_an_untrained_classifier runs them
# on an untrained one.
EXPLAINING = ("saliency", "adversarial", "class_visualisation")
SALIENCY_CHEAPER = [
    "data.num_predict=4",
    "data.eval_batch_size=4",
    "model.smoothgrad_samples=2",
    "model.ig_steps=4",
    "model.deletion_steps=4",
    "model.contact_sheet_images=2",
]


def slow_if_explaining(tasks) -> list:
    return [pytest.param(task, marks=pytest.mark.slow) if task in EXPLAINING else task for task in tasks]


@pytest.mark.parametrize("task", slow_if_explaining(TASKS))
def test_task_runs_in_bf16_mixed(task, tmp_path, data_dir, request):
    if task in EXPLAINING:
        request.getfixturevalue("shapes_checkpoint")  # the classifier they explain
    # after the task's own args: tiny_args pins 32-true for the other DreamBooth tests
    run(
        compose_config(
            [*TASKS[task](tmp_path, data_dir), "trainer.precision=bf16-mixed", "logger=csv"], tmp_path / "run", data_dir
        )
    )
    check_finished(tmp_path / "run", precision="bf16-mixed")


@pytest.mark.parametrize("task", EXPLAINING)
def test_explaining_tasks_run_on_an_untrained_classifier(task, tmp_path, data_dir):
    """The explaining tasks end to end in this process (their data, the classifier loaded from model.classifier.
    checkpoint, the maps, attacks or visualisations, their files and figures), on a classifier nobody trained."""
    classifier = shapes_classifier_checkpoint(tmp_path / "classifier.ckpt")
    cheaper = SALIENCY_CHEAPER if task == "saliency" else []
    args = [*TASKS[task](tmp_path, data_dir), *cheaper, f"model.classifier.checkpoint={classifier}", "logger=csv"]
    run(compose_config(args, tmp_path / "run", data_dir))
    check_finished(tmp_path / "run")
    assert (tmp_path / "run" / "predictions.json").is_file()


# shapes_captioning's two-process runs: tests/test_distributed_training.py, test_end_to_end.py and the README's sweeps.
@pytest.mark.slow
@pytest.mark.parametrize("task", [task for task in TASKS if task != "shapes_captioning"])
def test_task_runs_on_two_processes(task, tmp_path, data_dir, shapes_checkpoint, workspace):
    result = workspace.run([*TASKS[task](tmp_path, data_dir), "trainer=ddp_sim", "logger=csv"])
    check_finished(result.run_dir, strategy="ddp", devices=2)


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
    strategy, module = instantiate(cfg.trainer.strategy), runner.load_model(cfg, instantiate(cfg.data))  # its inputs
    # the config's fsdp_layers, else (a Hugging Face captioner) its family's, as configure_model takes them
    classes = strategy.layer_classes or import_classes(module.fsdp_layers())
    assert {layer.__name__ for layer in classes} == SHARDED[task]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard(module.fsdp_root(), classes, init_device_mesh("cpu", (1,)), mixed_precision("32-true"))
    finally:
        dist.destroy_process_group()
    root = module.fsdp_root()
    layers = [m for m in root.modules() if isinstance(m, classes)]
    assert len(layers) >= 4 and all(is_sharded(layer) for layer in layers)  # 2 + 2 layers in the tiny captioners
    assert all(any(isinstance(layer, c) for layer in layers) for c in classes)  # each class found
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

    assert strategy().layer_classes == ()  # the family's layers (conf/model/family/blip.yaml), at configure_model
    sdxl = compose_config(["task=sdxl_dreambooth", "trainer=fsdp", "fsdp_layers=[]"], tmp_path, data_dir)
    with pytest.raises(UserError, match=r"task=sdxl_dreambooth lists no fsdp_layers"):
        runner.instantiate(sdxl.trainer.strategy)
    with pytest.raises(UserError, match=r"fsdp_layers: cannot import layer class 'transformers.NoSuchLayer'"):
        strategy("fsdp_layers=[transformers.NoSuchLayer]")
    module = instantiate(compose_config(args, tmp_path, data_dir).model)
    with pytest.raises(UserError, match=r"BlipForConditionalGeneration has no layer of class Conv3d"):
        shard(module.model, (torch.nn.Conv3d,), mesh=None, mp_policy=mixed_precision("32-true"))
