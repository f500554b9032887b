"""What only a GPU runs: every task on CUDA in bf16-mixed, and FSDP2 on NCCL for the tasks that shard (on the CPU,
tests/test_fsdp.py runs the same path over gloo). Skipped where no CUDA device is present, which includes CI:
run `pytest tests/test_gpu.py` on a GPU machine (README, "From laptop to cluster", says where they have run)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tasks import TASKS, check_finished

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # runs run.py
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_on_a_gpu_in_bf16_mixed(task, tmp_path, data_dir, shapes_checkpoint, workspace):
    result = workspace.run(
        [*TASKS[task](tmp_path, data_dir), "trainer=gpu", "trainer.precision=bf16-mixed", "logger=csv"]
    )
    check_finished(result.run_dir, accelerator="gpu", precision="bf16-mixed")


@pytest.mark.parametrize("task", ["blip_shapes", "vit_gpt2_shapes", "sdxl_dreambooth"])
def test_fsdp_trains_and_its_checkpoint_exports(task, tmp_path, data_dir, workspace):
    """FSDP2 on the GPUs there are (units from the task's fsdp_layers) in bf16-mixed; the export after training and
    mode=export from the sharded checkpoint (a folder) on one GPU write finite weights."""
    args = [*TASKS[task](tmp_path, data_dir), "logger=csv"]
    devices = torch.cuda.device_count()
    run_dir = workspace.run(
        [*args, "trainer=fsdp", f"trainer.devices={devices}", "trainer.precision=bf16-mixed"]
    ).run_dir
    check_finished(run_dir, devices=devices, precision="bf16-mixed")
    export_dir = workspace.run(
        [*args, "trainer=gpu", "trainer.devices=1", "mode=export", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    ).run_dir
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    for export in (run_dir / "export", export_dir / "export"):
        weights = [load_file(path) for path in export.glob("*.safetensors")]
        assert weights and all(tensor.isfinite().all() for file in weights for tensor in file.values())
