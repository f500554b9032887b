"""trainer.accelerator/precision `auto`: what the composed trainer becomes on machines with and without GPUs.

Machines with GPUs are faked (torch's and Lightning's CUDA device counts), so CI shows what a 4-GPU node gets.
"""

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from framework.allocator import keep_freed_memory
from framework.checks import check_config
from framework.errors import UserError
from framework.hardware import resolve_trainer
from tests.helpers.config import compose_config, fake_gpus


def trainer_for(overrides, tmp_path, data_dir, gpus: int, bf16: bool = True):
    """The trainer a run builds on a machine with `gpus` GPUs: its config checked, then resolved."""
    cfg = compose_config(overrides, tmp_path, data_dir)
    check_config(cfg)
    with fake_gpus(gpus, bf16):
        resolve_trainer(cfg.trainer)
        return cfg.trainer, instantiate(cfg.trainer, logger=False)


def test_headline_command_on_four_gpus_is_ddp_in_bf16(tmp_path, data_dir):
    """python run.py task=blip_coco trainer.devices=4, on a node with 4 bf16 GPUs, with no other flag."""
    config, trainer = trainer_for(["task=blip_coco", "trainer.devices=4"], tmp_path, data_dir, gpus=4)
    assert (config.accelerator, config.devices, config.precision) == ("gpu", 4, "bf16-mixed")
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 4
    assert trainer.precision == "bf16-mixed" and trainer.strategy.root_device.type == "cuda"


def test_default_command_without_gpu_runs_on_the_cpu_in_fp32(tmp_path, data_dir):
    config, trainer = trainer_for([], tmp_path, data_dir, gpus=0)
    assert (config.accelerator, config.precision) == ("cpu", "32-true")
    assert isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.strategy.root_device.type == "cpu"


def test_default_command_on_a_gpu_machine_uses_one_gpu(tmp_path, data_dir):
    config, trainer = trainer_for([], tmp_path, data_dir, gpus=2)
    assert (config.accelerator, config.devices, config.precision) == ("gpu", 1, "bf16-mixed")
    assert trainer.num_devices == 1


def test_gpus_without_bfloat16_train_in_fp32(tmp_path, data_dir):
    config, _ = trainer_for(["trainer=gpu"], tmp_path, data_dir, gpus=1, bf16=False)
    assert config.precision == "32-true"


def test_explicit_choices_are_kept(tmp_path, data_dir):
    config, _ = trainer_for(["trainer=cpu"], tmp_path, data_dir, gpus=4)
    assert (config.accelerator, config.precision) == ("cpu", "32-true")
    config, _ = trainer_for(["trainer.precision=16-mixed"], tmp_path, data_dir, gpus=1)
    assert config.precision == "16-mixed"
    config, trainer = trainer_for(["trainer=ddp_sim"], tmp_path, data_dir, gpus=4)
    assert config.accelerator == "cpu" and trainer.num_devices == 2


@pytest.mark.parametrize(
    ("overrides", "gpus", "message"),
    [
        (["trainer=gpu"], 0, "trainer.accelerator=gpu (trainer=gpu, ddp or fsdp) but this machine has no CUDA GPU"),
        (["trainer=ddp", "trainer.devices=4"], 0, "this machine has no CUDA GPU"),
        (["trainer.devices=4"], 0, "trainer.devices=4 asks for 4 GPUs, but this machine has no CUDA GPU"),
        (["trainer.devices=8"], 4, "trainer.devices=8 asks for more GPUs than this machine has (4)"),
        (["trainer=gpu", "trainer.devices=[0,5]"], 4, "trainer.devices=[0, 5] names GPU 5, but this machine has 4"),
        (["trainer.max_epochs=abc"], 0, "trainer.max_epochs=abc: takes a whole number >= -1 (or null)"),
        (["trainer.accumulate_grad_batches=0"], 0, "trainer.accumulate_grad_batches=0: takes a whole number >= 1"),
    ],
)
def test_impossible_requests_are_one_clear_error(overrides, gpus, message, tmp_path, data_dir):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        trainer_for(overrides, tmp_path, data_dir, gpus=gpus)


def test_freed_memory_stays_in_the_heap_where_the_c_library_is_glibc():
    """What run.py does first (framework/allocator.py): glibc keeps freed blocks for the next step's temporaries."""
    import platform

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
def test_trainer_gpu_without_a_gpu_is_one_clear_error_from_the_cli(workspace):
    result = workspace.run(["trainer=gpu"], check=False)
    assert result.returncode != 0
    assert "trainer.accelerator=gpu (trainer=gpu, ddp or fsdp) but this machine has no CUDA GPU" in result.stderr
    assert "No supported gpu backend" not in result.stderr
