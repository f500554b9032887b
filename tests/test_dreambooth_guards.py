"""SDXL DreamBooth precision and output guards on the tiny pipeline: the VAE's dtype under 16-bit precision, NaN or
black generated images stopping the run with the step, memory freed after training."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from framework.errors import UserError
from tests.test_dreambooth import (  # noqa: F401 (fixtures)
    RESOLUTION,
    build,
    dog,
    run_here,
    sdxl_lora,
    tiny_args,
    tiny_sdxl,
)


def test_vae_precision_guard(tiny_sdxl):
    model = sdxl_lora(tiny_sdxl, vae_fp32=False, inference={"num_inference_steps": 2})
    assert model.vae.config.force_upcast  # SDXL's own VAE (and the tiny one) is marked unsafe in fp16
    with pytest.raises(UserError, match=r"16-mixed with model.vae_fp32=false.*Set model.vae_fp32=true"):
        model.vae_dtype("16-mixed")
    assert model.vae_dtype("bf16-mixed") == torch.bfloat16 and model.vae_dtype("32-true") == torch.float32
    model.vae.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix's config says
    assert model.vae_dtype("16-mixed") == torch.float16
    model.hparams.vae_fp32 = True
    assert model.vae_dtype("16-mixed") == torch.float32

    # a 16-bit VAE encodes to fp32 latent parameters and decodes to images
    model.vae.to(torch.bfloat16)
    assert model.encode_latent_parameters(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).dtype == torch.float32
    assert model.generate(["a photo of sks dog"], [0])[0].size == (RESOLUTION, RESOLUTION)


def broken_decode(monkeypatch, value: float) -> None:
    """The VAE decodes to `value` everywhere (-1: black; NaN: what an fp16 overflow in SDXL's VAE gives)."""
    decode = AutoencoderKL.decode

    def broken(self, latents, *args, **kwargs):
        output = decode(self, latents, *args, **kwargs)
        output.sample = torch.full_like(output.sample, value)
        return output

    monkeypatch.setattr(AutoencoderKL, "decode", broken)


def test_black_validation_images_stop_the_run_with_the_step(tiny_sdxl, dog, tmp_path, data_dir, monkeypatch):
    broken_decode(monkeypatch, -1.0)
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.test_prompts=[]",
        "export_after_train=false",
    )
    with pytest.raises(
        UserError, match=r"the val images at global step 2 are all black for prompt\(s\) a photo of sks"
    ):
        run_here(tmp_path, data_dir, args)


def test_memory_is_freed_after_training_and_nan_images_stop_validation(tiny_sdxl, dog, tmp_path, data_dir, monkeypatch):
    import lightning as L

    from lightning_modules.generation import dreambooth_lora

    collected = []
    monkeypatch.setattr(dreambooth_lora.gc, "collect", lambda: collected.append(True))
    model, data = build(tmp_path, data_dir, tiny_args(tiny_sdxl, dog))
    sizes = []

    class StateSize(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            sizes.append(len(trainer.optimizers[0].state))

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[StateSize()],
    )
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sizes == [trainable, trainable]  # AdamW state for every adapter weight while training
    assert trainer.optimizers[0].defaults["fused"]  # one fused kernel, not a loop over the adapters' tensors
    assert len(trainer.optimizers[0].state) == 0  # gone after training, before the test pass
    assert not collected  # a full garbage collection only on CUDA, before empty_cache: 0.3 s a fit on a CPU

    broken_decode(monkeypatch, float("nan"))
    trainer.limit_val_batches = 1.0
    with pytest.raises(UserError, match=r"images generated at global step 2 hold NaN or inf \(prompts: a photo of sks"):
        trainer.validate(model, data.val_dataloader())


def test_adam_is_fused_unless_mixed_precision_or_the_config_chooses_an_implementation():
    from functools import partial

    import torch

    from framework.optim import fused_adam_by_default

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert fused_adam_by_default(partial(torch.optim.AdamW, lr=1e-4), cpu, False).keywords == {
        "lr": 1e-4,
        "fused": True,
    }
    for kept in (partial(torch.optim.AdamW, foreach=True), partial(torch.optim.Adam, fused=False)):
        assert fused_adam_by_default(kept, cpu, False) is kept  # model.optimizer.foreach / fused as set
    # bf16-mixed: Lightning refuses gradient clipping with a fused optimizer (it unscales gradients itself)
    assert fused_adam_by_default(partial(torch.optim.AdamW), cpu, True).keywords == {"foreach": True}
    assert fused_adam_by_default(partial(torch.optim.SGD, lr=1.0), cpu, False).keywords == {
        "lr": 1.0
    }  # other optimizers
    assert (
        "fused" not in fused_adam_by_default(partial(torch.optim.AdamW), meta, False).keywords
    )  # no fused kernel there
