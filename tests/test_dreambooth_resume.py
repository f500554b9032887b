"""Exact resume for SDXL DreamBooth: SIGTERM mid-epoch, then resume=auto, ends with the adapter weights of an
uninterrupted run (same seed), with prior preservation, cached latents (random crops), random flips, text-encoder LoRA
and a validation pass on the way."""

from __future__ import annotations

import torch

from tests.conftest import run_cli
from tests.test_dreambooth import dog, run_here, tiny_args, tiny_sdxl  # noqa: F401 (fixtures)

STEPS = 6  # 2 instance images x 2 repeats, batch 1: epochs of 4 steps


def adapters(run_dir) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


def test_sigterm_and_resume_auto_end_with_the_weights_of_an_uninterrupted_run(tiny_sdxl, dog, tmp_path, data_dir):
    def args(classes: str, *extra: str) -> list[str]:
        return tiny_args(
            tiny_sdxl,
            dog,
            f"trainer.max_steps={STEPS}",
            "trainer.val_check_interval=2",
            "model.train_text_encoder=true",
            "model.optimizer.lr=1e-2",
            "data.prior_preservation=true",
            f"data.class_images={tmp_path / classes}",
            "data.num_class_images=2",
            "data.cache_latents=true",
            "data.center_crop=false",  # 64 x 72 images: random horizontal crops (cached once per image)
            "data.random_flip=true",
            "data.repeats=2",
            "data.test_prompts=[]",
            "export_after_train=false",
            *extra,
        )

    killed = run_cli(
        args(
            "classes_killed",
            "+callbacks.fault._target_=tests.fault_injection.SignalAtStep",
            "+callbacks.fault.step=3",  # epoch 0, 3 of its 4 batches done
        ),
        tmp_path / "run",
        data_dir,
        check=False,
    )
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert adapters(tmp_path / "run")[0] == 3 and not (tmp_path / "run" / "metrics.json").exists()

    run_here(tmp_path / "run", data_dir, args("classes_killed", "resume=auto"))
    run_here(tmp_path / "uninterrupted", data_dir, args("classes_uninterrupted"))
    (step, resumed), (expected_step, expected) = adapters(tmp_path / "run"), adapters(tmp_path / "uninterrupted")
    assert step == expected_step == STEPS and resumed.keys() == expected.keys()
    assert any("text_encoder" in name for name in resumed)
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
