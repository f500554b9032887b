"""DDP from configuration alone: `data.batch_size` is the global batch, so trainer=ddp_sim (2 processes) trains
the model one process trains - the same images per optimizer step and the same gradients."""

from __future__ import annotations

import pytest

from framework.distributed import per_device_batch_size
from framework.errors import UserError
from tests.helpers.config import TINY_SHAPES, read_metrics

# Dropout masks and BatchNorm batch statistics are drawn per process, so they are switched off here: a frozen
# (BatchNorm in eval mode) encoder and no decoder dropout; everything else trains as usual.
SAME_IN_BOTH = [
    *TINY_SHAPES,
    "data.num_train=96",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "model.encoder.finetune=none",
    "model.decoder.dropout=0",
    "logger=csv",
]
CAPTION_METRICS = ["test/BLEU-1", "test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr"]


@pytest.mark.slow
def test_ddp_sim_training_gives_the_single_process_test_metrics(workspace):
    single_run = workspace.run(SAME_IN_BOTH).run_dir
    ddp_run = workspace.run([*SAME_IN_BOTH, "trainer=ddp_sim"]).run_dir
    single, distributed = read_metrics(single_run), read_metrics(ddp_run)
    assert {k: distributed[k] for k in CAPTION_METRICS} == {k: single[k] for k in CAPTION_METRICS}
    # The losses agree to float precision (gradients are summed in another order across processes).
    assert distributed["test/loss"] == pytest.approx(single["test/loss"], rel=1e-3)


class FakeTrainer:
    def __init__(self, world_size: int, accumulate_grad_batches: int):
        self.world_size, self.accumulate_grad_batches = world_size, accumulate_grad_batches


def test_the_global_batch_is_split_over_devices_and_accumulation():
    assert per_device_batch_size(256, None) == 256
    assert per_device_batch_size(256, FakeTrainer(8, 1)) == 32
    assert per_device_batch_size(256, FakeTrainer(4, 2)) == 32
    with pytest.raises(UserError, match=r"data.batch_size=100 is the global batch .* 8 x 1"):
        per_device_batch_size(100, FakeTrainer(8, 1))
