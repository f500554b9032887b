"""SDXL DreamBooth LoRA, the module and its training, on a tiny SDXL pipeline saved with save_pretrained and trained
through model.pretrained=DIR: a run of `python run.py task=sdxl_dreambooth` and what starts from it (resume, predict,
eval, export); training details (cached latents, prior preservation, v-prediction, min-SNR); precision and output
guards (the VAE's dtype under 16-bit precision, NaN or black images stopping the run with the step, memory freed
after training); LoRA exports that load everywhere (the Kohya file through diffusers' loader, every weight matched;
LoRAs that cannot be exported faithfully refused before anything is written); the options of diffusers'
train_dreambooth_lora_sdxl.py (README's parity table, Prodigy, warmup + cosine restarts, kept step checkpoints); exact
resume after SIGTERM. The data side (instance folders, buckets, crops, resizing): tests/test_dreambooth_data.py."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from omegaconf import OmegaConf
from peft.utils import get_peft_model_state_dict
from PIL import Image

from framework.errors import UserError
from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA
from lightning_modules.generation.parts import multires_noise
from lightning_modules.generation.sdxl import KOHYA_FILE
from tests.helpers.config import ROOT, compose_config, read_metrics, run_here
from tests.helpers.dreambooth import RESOLUTION, build, generate, lora_keys, save_images, sdxl_lora, tiny_args
from tests.helpers.trainer import quiet_trainer

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
STEPS = 6  # the resume test: 2 instance images x 2 repeats, batch 1: epochs of 4 steps


# --------------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tiny_sdxl, dog, fidelity_models, make_workspace) -> Path:
    """python run.py task=sdxl_dreambooth: text-encoder LoRA, Kohya export, validation with fidelity every 2 steps,
    min-SNR, noise offset and multires noise."""
    clip, dino = fidelity_models
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=tensorboard",
        f"model.fidelity.clip={clip}",
        f"model.fidelity.dino={dino}",
        "model.train_text_encoder=true",
        "model.text_encoder.lr=1e-3",
        "model.optimizer.lr=1e-2",
        "model.kohya=true",
        "model.snr_gamma=5.0",
        "model.noise_offset=0.05",
        "model.multires_noise.iterations=3",
        "data.random_flip=true",
    )
    return make_workspace().run(args).run_dir


def test_multires_noise_adds_smooth_fields_at_unit_spread():
    torch.manual_seed(0)
    white = torch.randn(8, 4, 32, 32)
    noise = multires_noise(white, iterations=6, discount=0.3, draw=torch.randn)
    assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)  # each image at unit spread

    def neighbour_correlation(x):  # of horizontally adjacent values (mean 0, spread 1): about 0 for white noise
        return float((x[..., 1:] * x[..., :-1]).mean())

    correlation = neighbour_correlation(noise)
    assert abs(neighbour_correlation(white)) < 0.01 and correlation > 0.03, correlation
    assert not torch.equal(noise, white / white.std(dim=(1, 2, 3), keepdim=True))
    assert torch.equal(multires_noise(white, 0, 0.3, torch.randn), white / white.std(dim=(1, 2, 3), keepdim=True))


@pytest.mark.slow
def test_export_loads_in_diffusers_and_changes_the_images(trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    export = trained / "export"
    keys = lora_keys(export / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # the diffusers layout: <component>.<module path>.lora[_linear_layer].down/up.weight, nothing else
    assert all(
        k.endswith(
            (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
        )
        for k in keys
    ), keys[:5]
    kohya = lora_keys(export / "pytorch_lora_weights_kohya.safetensors")
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"} and any(k.endswith(".alpha") for k in kohya)
    card = (export / "README.md").read_text()
    assert "base_model:" in card and "`sks`" in card and "| training steps | 4 |" in card
    assert "| multires noise (iterations, discount) | [3, 0.3] |" in card

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    base = generate(pipeline)
    pipeline.load_lora_weights(export)
    adapted = generate(pipeline)
    assert np.abs(adapted - base).max() > 1e-3


@pytest.mark.slow
def test_validation_logs_a_grid_per_prompt_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    assert "val/samples/a photo of sks dog in a bucket" in board.Tags()["images"]
    steps = [event.step for event in board.Images("val/samples/a photo of sks dog in a bucket")]
    assert steps == [2, 4]
    assert {"train/loss", "val/CLIP-T", "val/CLIP-I", "val/DINO"} <= set(board.Tags()["scalars"])
    metrics = read_metrics(trained)  # the test after training scores data.test_prompts (= validation prompts)
    assert {"val/CLIP-T", "val/CLIP-I", "val/DINO", "test/CLIP-T", "test/CLIP-I", "test/DINO"} <= set(metrics)
    assert all(-1 <= metrics[k] <= 1 for k in ("test/CLIP-I", "test/DINO")) and 0 <= metrics["test/CLIP-T"] <= 1


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained, tiny_sdxl, dog, tmp_path, data_dir):
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all("lora" in k for k in checkpoint["state_dict"])  # adapters only
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        "model.train_text_encoder=true",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "export_after_train=false",
        "data.test_prompts=[]",
    )
    run_here(tmp_path, data_dir, args)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    changed = [k for k, v in resumed["state_dict"].items() if not torch.equal(v, checkpoint["state_dict"][k])]
    assert changed

    export_args = tiny_args(
        tiny_sdxl,
        dog,
        "mode=export",
        "model.train_text_encoder=true",
        f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
    )
    run_here(tmp_path / "exported", data_dir, export_args)
    assert "| training steps | 6 |" in (tmp_path / "exported" / "export" / "README.md").read_text()


def test_dora_adapters_load_in_diffusers_exactly(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = sdxl_lora(tiny_sdxl, lora={"use_dora": True})
    with torch.no_grad():  # stand-in for training: move every adapter weight, magnitudes included
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.export(tmp_path / "dora")
    keys = lora_keys(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(tmp_path / "dora")
    np.testing.assert_allclose(generate(pipeline), generate(model.pipeline()), atol=1e-5)


@pytest.mark.slow
def test_predict_with_checkpoint_or_exported_lora_gives_the_same_images(trained, tiny_sdxl, dog, tmp_path, data_dir):
    common = tiny_args(
        tiny_sdxl,
        dog,
        "mode=predict",
        "data.prompts=[a photo of sks dog,sks dog on a beach]",
        "model.train_text_encoder=true",
    )
    run_here(tmp_path / "ckpt", data_dir, [*common, f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"])
    run_here(tmp_path / "lora", data_dir, [*common, f"model.lora_weights={trained / 'export'}", "model.fuse_lora=true"])
    for name in ("ckpt", "lora"):
        rows = json.loads((tmp_path / name / "predictions.json").read_text())
        assert [r["prompt"] for r in rows] == ["a photo of sks dog", "sks dog on a beach"]
        assert read_metrics(tmp_path / name)["predict/images"] == 2
    for row in rows:
        a, b = (
            np.asarray(Image.open(tmp_path / run / "images" / row["image"]), np.float32) for run in ("ckpt", "lora")
        )
        assert np.abs(a - b).mean() < 1.0  # the fused exported LoRA draws what the checkpoint's adapters draw


@pytest.mark.slow
def test_eval_scores_fidelity_of_the_base_model_or_a_checkpoint(
    trained, tiny_sdxl, dog, fidelity_models, tmp_path, data_dir
):
    clip, dino = fidelity_models
    common = tiny_args(
        tiny_sdxl,
        dog,
        "mode=eval",
        "model.train_text_encoder=true",
        f"model.fidelity.clip={clip}",
        f"model.fidelity.dino={dino}",
        "data.test_prompts=[a photo of sks dog,sks dog in the snow]",
    )
    base = run_here(tmp_path / "base", data_dir, common)  # builds_from_config: the base model, no LoRA
    tuned = run_here(tmp_path / "tuned", data_dir, [*common, f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"])
    assert set(base) == set(tuned) == {"test/CLIP-T", "test/CLIP-I", "test/DINO"}
    assert base != tuned


def test_the_best_fidelity_checkpoint_is_tested_and_exported(tiny_sdxl, dog, fidelity_models, tmp_path, data_dir):
    clip, dino = fidelity_models
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=3",
        "trainer.val_check_interval=1",
        f"model.fidelity.clip={clip}",
        f"model.fidelity.dino={dino}",
        "model.fidelity.select={CLIP-I: 1, DINO: 3}",
        "model.optimizer.lr=3e-2",
        "data.test_prompts=[]",
    )
    metrics = run_here(tmp_path, data_dir, args)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/fidelity")]
    assert len(rows) == 3  # every validation
    assert all(0 < float(row["val/class_drift"]) <= 1 for row in rows)  # data.class_prompt's, at every validation
    for row in rows:
        expected = (float(row["val/CLIP-I"]) + 3 * float(row["val/DINO"])) / 4
        assert float(row["val/fidelity"]) == pytest.approx(expected, rel=1e-6)
    best_row = max(rows, key=lambda row: float(row["val/fidelity"]))
    best_step = int(best_row["step"]) + 1  # the csv logger's step: the last finished step's index
    assert [p.name for p in (tmp_path / "checkpoints").glob("best_*")] == [f"best_fidelity_step{best_step:06d}.ckpt"]
    provenance = json.loads((tmp_path / "metrics_provenance.json").read_text())
    assert provenance["test"]["checkpoint"].endswith(f"best_fidelity_step{best_step:06d}.ckpt"), provenance
    assert metrics["val/fidelity"] == pytest.approx(float(rows[-1]["val/fidelity"]))

    checkpoint = torch.load(tmp_path / "checkpoints" / f"best_fidelity_step{best_step:06d}.ckpt", weights_only=True)
    unet = loaded(tiny_sdxl, tmp_path / "export").unet
    exported = get_peft_model_state_dict(unet, adapter_name=next(iter(unet.peft_config)))
    trained = {
        name.removeprefix("unet.").replace(".default.", "."): value
        for name, value in checkpoint["state_dict"].items()
        if name.startswith("unet.")
    }
    assert exported.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    assert f"| training steps | {best_step} |" in (tmp_path / "export" / "README.md").read_text()


def test_class_drift_is_one_before_training_and_falls_as_the_adapters_learn(
    tiny_sdxl, dog, fidelity_models, tmp_path, data_dir
):
    clip, dino = fidelity_models
    model, data = build(
        tmp_path,
        data_dir,
        tiny_args(
            tiny_sdxl,
            dog,
            f"model.fidelity.clip={clip}",
            f"model.fidelity.dino={dino}",
            "model.fidelity.class_drift_images=2",
            "model.optimizer.lr=5e-2",
        ),
    )
    assert model.hparams.class_prompt == "a photo of a dog"  # data.class_prompt, a data input
    (before,) = quiet_trainer().validate(model, datamodule=data, verbose=False)
    assert before["val/class_drift"] == pytest.approx(1.0, abs=1e-6)  # new adapters change nothing
    quiet_trainer(max_steps=6, limit_val_batches=0).fit(model, datamodule=data)
    (after,) = quiet_trainer().validate(model, datamodule=data, verbose=False)
    assert 0 < after["val/class_drift"] < 1 - 1e-4


@pytest.mark.slow  # two training runs in a run.py process: ~40 s
def test_the_fidelity_sweep_runs_its_trials_and_ranks_them_by_the_best_checkpoints_score(
    tiny_sdxl, dog, fidelity_models, workspace
):
    clip, dino = fidelity_models
    command = [
        "-m",
        *tiny_args(tiny_sdxl, dog, f"model.fidelity.clip={clip}", f"model.fidelity.dino={dino}"),
        "hparams_search=sdxl_fidelity",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=choice(2,3)",
        "trainer.val_check_interval=1",
    ]
    sweep_dir = workspace.run(command).run_dir
    with open(sweep_dir / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and {row["status"] for row in rows} == {"ok"}
    assert all("model.lora.rank=" in row["overrides"] and "model.optimizer.lr=" in row["overrides"] for row in rows)
    scores = [float(row["test/fidelity"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and all(0 < float(row["val/class_drift"]) <= 1 for row in rows)
    for row in rows:  # each trial's score is its best checkpoint's
        job = sweep_dir / row["job"]
        provenance = json.loads((job / "metrics_provenance.json").read_text())
        assert "best_fidelity_step" in provenance["test"]["checkpoint"]


def test_a_selection_of_a_metric_without_its_model_is_refused(tiny_sdxl):
    with pytest.raises(UserError, match=r"select weighs DINO, which needs model.fidelity.dino \(null here\)"):
        sdxl_lora(tiny_sdxl, fidelity={"clip": None, "dino": None, "select": {"DINO": 1.0}})


# --------------------------------------------------------------------------------------------------- training details
def fixed_loss(model, batch: dict, draws: int = 1) -> float:
    """The loss of a batch with the same latent samples, noise and timesteps every time; with `draws`, the
    batch repeated that many times (a low-variance estimate of the expected loss over noise and timesteps)."""
    repeated = {k: torch.cat([v] * draws) if torch.is_tensor(v) else v * draws for k, v in batch.items()}
    assert draws == 1 or batch["num_instance"] == len(batch["prompts"])  # no class half to keep apart
    torch.manual_seed(0)
    with torch.no_grad():
        return float(model.loss(repeated))


def test_cached_latents_and_prompts_give_the_uncached_first_step_loss(tiny_sdxl, dog, tmp_path, data_dir):
    common = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=1",
        "data.random_flip=true",
        "data.batch_size=2",
        "data.test_prompts=[]",
        "export_after_train=false",
    )
    uncached = run_here(tmp_path / "uncached", data_dir, [*common, "model.cache_prompt_embeddings=false"])
    cached = run_here(tmp_path / "cached", data_dir, [*common, "data.cache_latents=true"])
    assert cached["train/loss"] == pytest.approx(uncached["train/loss"], rel=1e-5)


def test_prior_preservation_generates_class_images_once_and_adds_their_loss(tiny_sdxl, dog, tmp_path, data_dir):
    classes = tmp_path / "class_images"
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=2",
        "data.prior_preservation=true",
        "data.class_prompt=a photo of a dog",
        f"data.class_images={classes}",
        "data.num_class_images=3",
        "data.class_batch_size=2",
        "data.test_prompts=[]",
    )
    run_here(tmp_path / "first", data_dir, args)
    keys = lora_keys(tmp_path / "first" / "export" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"unet"}  # no text-encoder LoRA: UNet adapters only
    made = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    assert sorted(made) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert Image.open(classes / "class_00000.png").size == (RESOLUTION, RESOLUTION)
    model, data = build(tmp_path, data_dir, args)
    assert data.missing_class_images() == []  # nothing to generate again
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == made  # reused, not regenerated

    batch = next(iter(data.train_dataloader()))
    assert batch["num_instance"] == 1 and batch["prompts"] == ["a photo of sks dog", "a photo of a dog"]
    losses = []
    for weight in (0.0, 1.0, 2.0):
        model.hparams.prior_loss_weight = weight
        losses.append(fixed_loss(model, batch))
    assert losses[1] - losses[0] == pytest.approx(losses[2] - losses[1], rel=1e-4) and losses[1] > losses[0]


@pytest.mark.slow
def test_loss_falls_when_overfitting_two_images(tiny_sdxl, dog, tmp_path, data_dir):

    model, data = build(
        tmp_path,
        data_dir,
        tiny_args(
            tiny_sdxl,
            dog,
            "model.optimizer.lr=1e-2",
            "model.lora.rank=8",
            "data.cache_latents=true",
            "data.batch_size=2",
        ),
    )
    data.set_latent_cache([(v, model.encode_latent_parameters(pixels)) for v, pixels in data.views_to_encode()])
    batch = next(iter(data.train_dataloader()))
    before = fixed_loss(model, batch, draws=16)
    trainer = quiet_trainer(max_steps=80, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    after = fixed_loss(model, batch, draws=16)
    assert after < before - 0.03, (before, after)  # measured: 1.083 -> 1.010 after 100 steps


@pytest.mark.slow  # inductor compiles the tiny UNet's forward and backward: about 2 minutes on 2 cores
def test_a_compiled_unet_trains_as_the_plain_one(tiny_sdxl, dog, tmp_path, data_dir, caplog):
    args = tiny_args(
        tiny_sdxl,
        dog,
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",  # last.ckpt after the step
        "data.validation_prompts=[]",
        "data.test_prompts=[]",
        "export_after_train=false",
    )
    plain = run_here(tmp_path / "plain", data_dir, args)
    with caplog.at_level("INFO", logger="lightning_modules.generation.dreambooth_lora"):
        compiled = run_here(tmp_path / "compiled", data_dir, [*args, "model.compile=true"])
    # (later losses part: Adam's first update is about lr * the sign of each gradient, which rounding may flip)
    assert compiled["train/loss"] == pytest.approx(plain["train/loss"], abs=1e-4)
    assert "model.compile: the first training step took" in caplog.text
    assert adapters(tmp_path / "compiled")[1].keys() == adapters(tmp_path / "plain")[1].keys()  # the plain names


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_quantised_frozen_unet_trains_full_precision_adapters_in_less_memory(
    kind, tiny_sdxl, dog, tmp_path, data_dir, caplog
):
    from optimum.quanto import QModuleMixin

    from lightning_modules.generation.parts import quantize_frozen

    args = tiny_args(tiny_sdxl, dog, "model.optimizer.lr=1e-2", "data.batch_size=2")
    plain, data = build(tmp_path, data_dir, args)
    batch = next(iter(data.train_dataloader()))
    unquantised = fixed_loss(plain, batch)
    quantize_frozen(plain.unet, kind)
    assert fixed_loss(plain, batch) == pytest.approx(unquantised, rel=0.02)  # near the unquantised loss

    model, _ = build(tmp_path, data_dir, [*args, f"model.quantize_base={kind}"])
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    before_training = {k: v.clone() for k, v in get_peft_model_state_dict(model.unet).items()}
    with caplog.at_level("INFO", logger="lightning_modules.generation.dreambooth_lora"):
        quiet_trainer(max_steps=2, limit_val_batches=0, precision="bf16-mixed").fit(model, datamodule=data)
    after, before = map(float, re.search(r"holds ([\d.]+) MB \(([\d.]+) MB unquantised\)", caplog.text).groups())
    assert after < 0.75 * before  # 1-byte weights (with their scales) for the 2-byte bf16 ones of the layers
    quantised = [name for name, module in model.unet.named_modules() if isinstance(module, QModuleMixin)]
    assert any(name.endswith("to_q.base_layer") for name in quantised) and any("conv" in name for name in quantised)
    assert not any("lora_" in name for name in quantised)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained  # the adapters alone
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    moved = get_peft_model_state_dict(model.unet)
    assert any(not torch.equal(moved[k], v) for k, v in before_training.items())
    model.export(tmp_path / "export")
    assert lora_keys(tmp_path / "export" / "pytorch_lora_weights.safetensors")


def test_a_quantised_unet_cannot_be_fused_or_quantised_without_quanto(tiny_sdxl, monkeypatch):
    from lightning_modules.generation.parts import quantize_frozen

    with pytest.raises(UserError, match=r"model.fuse_lora=true cannot fuse adapters into a quantised UNet"):
        sdxl_lora(tiny_sdxl, quantize_base="int8", fuse_lora=True)
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # not installed
    with pytest.raises(UserError, match=r"model.quantize_base=int8 needs optimum-quanto: pip install"):
        quantize_frozen(sdxl_lora(tiny_sdxl).unet, "int8")


def test_v_prediction_and_min_snr_weights(tiny_sdxl, dog, tmp_path, data_dir):
    model, data = build(
        tmp_path, data_dir, tiny_args(tiny_sdxl, dog, "model.prediction_type=v_prediction", "model.snr_gamma=5.0")
    )
    timesteps = torch.tensor([10, 500, 990])
    snr = (model.noise_scheduler.alphas_cumprod / (1 - model.noise_scheduler.alphas_cumprod))[timesteps]
    assert torch.allclose(model.snr_weights(timesteps), snr.clamp(max=5.0) / (snr + 1))
    assert np.isfinite(fixed_loss(model, next(iter(data.train_dataloader()))))


def test_captioned_images_train_with_their_own_prompts(tiny_sdxl, tmp_path, data_dir):
    folder = save_images(tmp_path / "icons", 2)
    lines = [
        {"file_name": "img_0.png", "prompt": "a TOK icon of a cat, in the style of TOK"},
        {"file_name": "img_1.png", "prompt": "a TOK icon of a house, in the style of TOK"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = [
        *tiny_args(tiny_sdxl, folder, "trainer.max_steps=2", "data.test_prompts=[]"),
        "task=sdxl_lora_3d_icons",
        "model.lora.rank=4",
        "data.batch_size=2",
        f"data.source.folder={folder}",
    ]
    model, data = build(tmp_path, data_dir, args)
    assert sorted(data.train_prompts()) == [line["prompt"] for line in lines]
    metrics = run_here(tmp_path / "run", data_dir, args)
    assert np.isfinite(metrics["train/loss"])
    keys = lora_keys(tmp_path / "run" / "export" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}  # the recipe trains both


def half_masks(images: Path, folder: Path, white: str) -> Path:
    """A mask per image of `images`: white on the left part that centre crops keep as the crop's left half
    (`white` = "left"), or all black ("none")."""
    folder.mkdir()
    for image in images.iterdir():
        width, height = Image.open(image).size
        mask = np.zeros((height, width), np.uint8)
        if white == "left":
            mask[:, : width // 2] = 255  # the centre crop of 64 x 72: columns 4-67, its left half ends at column 36
        Image.fromarray(mask).save(folder / image.name)
    return folder


def test_masked_loss_is_the_mean_over_the_white_half_and_all_black_masks_train_nothing(
    tiny_sdxl, dog, tmp_path, data_dir
):
    model, data = build(
        tmp_path, data_dir, tiny_args(tiny_sdxl, dog, f"data.masks={half_masks(dog, tmp_path / 'left', 'left')}")
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"][0, 0, :, :32].min() == 1 and batch["mask"][0, 0, :, 32:].max() == 0
    torch.manual_seed(0)
    with torch.no_grad():
        error, _ = model.prediction_error(batch)  # [1, 4, 8, 8]: the latents of a 64 px image
    assert fixed_loss(model, batch) == pytest.approx(float(error[..., :4].mean()), rel=1e-6)
    assert fixed_loss(model, batch) != pytest.approx(float(error.mean()), rel=1e-3)

    model, data = build(
        tmp_path, data_dir, tiny_args(tiny_sdxl, dog, f"data.masks={half_masks(dog, tmp_path / 'black', 'none')}")
    )
    model.loss(next(iter(data.train_dataloader()))).backward()
    gradients = [p.grad for p in model.parameters() if p.requires_grad]
    assert gradients and all(g is None or not g.any() for g in gradients)


def test_dropped_captions_are_conditioned_on_the_empty_prompt(tiny_sdxl):
    from lightning_modules.generation.sdxl import encode_prompts

    model = sdxl_lora(tiny_sdxl)
    hidden, pooled = model.prompt_embeddings(["", "a photo of sks dog", ""])
    with torch.no_grad():
        expected_hidden, expected_pooled = encode_prompts(model.tokenizers, model.text_encoders, [""])
    for row in (0, 2):
        torch.testing.assert_close(hidden[row], expected_hidden[0])
        torch.testing.assert_close(pooled[row], expected_pooled[0])
    assert "" in model._prompt_cache and not torch.allclose(hidden[1], hidden[0])


class RecordAdapters(L.Callback):
    """The UNet's adapter weights after every optimizer step (peft's names)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.steps.append({k: v.clone() for k, v in get_peft_model_state_dict(module.unet).items()})


def test_ema_is_the_hand_computed_average_and_what_validation_and_the_export_hold(tiny_sdxl, dog, tmp_path, data_dir):
    decay = 0.2  # update 2 keeps 2/11 of the average, update 3 the decay (3/12 is more)
    model, data = build(
        tmp_path, data_dir, tiny_args(tiny_sdxl, dog, f"model.ema.decay={decay}", "model.optimizer.lr=1e-2")
    )
    recorded = RecordAdapters()
    seen_by_validation = []

    class AtValidation(L.Callback):
        def on_validation_batch_start(self, trainer, module, *args) -> None:
            seen_by_validation.append({k: v.clone() for k, v in get_peft_model_state_dict(module.unet).items()})

        def on_validation_end(self, trainer, module) -> None:  # training goes on from its own weights
            seen_by_validation.append({k: v.clone() for k, v in get_peft_model_state_dict(module.unet).items()})

    trainer = quiet_trainer(
        max_steps=3,
        callbacks=[recorded, AtValidation()],
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    # diffusers' EMAModel: update 1 copies the weights, update k keeps min(decay, k / (9 + k)) of the average
    average = recorded.steps[0]
    for k, weights in enumerate(recorded.steps[1:], start=2):
        kept = min(decay, k / (9 + k))
        average = {name: kept * average[name] + (1 - kept) * weights[name] for name in weights}
    assert kept == decay and len(recorded.steps) == 3
    assert any(not torch.allclose(average[n], recorded.steps[-1][n]) for n in average)  # the average differs
    for name, value in average.items():
        torch.testing.assert_close(seen_by_validation[0][name], value, msg=name)
        torch.testing.assert_close(seen_by_validation[1][name], recorded.steps[-1][name], msg=name)

    model.export(tmp_path / "export")
    unet = loaded(tiny_sdxl, tmp_path / "export").unet
    exported = get_peft_model_state_dict(unet, adapter_name=next(iter(unet.peft_config)))
    assert exported.keys() == average.keys()
    for name, value in average.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    assert "| EMA (decay, update every) | [0.2, 1] |" in (tmp_path / "export" / "README.md").read_text()


def test_caption_images_writes_metadata_that_the_lora_task_trains_from(tiny_sdxl, tmp_path, data_dir):
    from lightning_modules.captioning.inference import Captioner
    from tests.helpers.tiny_models import save_tiny_blip

    captioner = save_tiny_blip(tmp_path / "blip")  # an export folder, as BLIP's mode=export writes one
    images = save_images(tmp_path / "icons", 3)
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "img_0.png", "prompt": "TOK, my own"}) + "\n")
    caption = ["task=caption_images", f"model.captioner={captioner}", f"data.images={images}"]
    metrics = run_here(tmp_path / "captions", data_dir, [*caption, "model.trigger_token=TOK", "data.batch_size=2"])
    assert metrics == {"predict/captioned": 2.0, "predict/kept": 1.0}
    lines = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    prompts = {line["file_name"]: line["prompt"] for line in lines}
    assert len(lines) == 3 and prompts["img_0.png"] == "TOK, my own"  # kept: model.overwrite=false
    expected = Captioner.from_pretrained(captioner).generate_captions([images / f"img_{i}.png" for i in range(3)])
    assert [prompts["img_1.png"], prompts["img_2.png"]] == [f"TOK, {c}" for c in expected[1:]]  # the trigger first

    run_here(tmp_path / "again", data_dir, [*caption, "model.overwrite=true"])
    again = {json.loads(line)["file_name"]: json.loads(line)["prompt"] for line in (images / "metadata.jsonl").open()}
    assert again == {f"img_{i}.png": caption for i, caption in enumerate(expected)}  # all anew, no trigger token

    args = [*tiny_args(tiny_sdxl, images, "trainer.max_steps=2", "data.test_prompts=[]"), "task=sdxl_lora_3d_icons"]
    model, data = build(tmp_path, data_dir, [*args, f"data.source.folder={images}"])
    assert data.train_prompts() == set(again.values())
    assert np.isfinite(run_here(tmp_path / "lora", data_dir, [*args, f"data.source.folder={images}"])["train/loss"])


# ---------------------------------------------------------------------------------------- precision and output guards
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

    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[StateSize()])
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


# ------------------------------------------------------------------------------------------------------------ exports
def trained_stand_in(pipeline, **settings) -> DreamBoothLoRA:
    """A model whose adapter weights all moved, as training moves them."""
    model = sdxl_lora(pipeline, **settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def loaded(pipeline, folder, weight_name: str | None = None) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, **({"weight_name": weight_name} if weight_name else {}))
    return pipe


def test_kohya_export_loads_in_diffusers_with_every_weight_and_draws_the_same_images(tiny_sdxl, tmp_path):
    # alpha 8 with rank 4: a LoRA scale of 2 that the Kohya file must carry in its .alpha entries; two blocks of other
    # ranks (the tiny UNet's attention is in down_blocks.1, mid_block and up_blocks.0), scaled by alpha / their rank
    block_ranks = {"down_blocks.1": 8, "mid_block": 2}
    model = trained_stand_in(
        tiny_sdxl, lora={"alpha": 8, "block_ranks": block_ranks}, train_text_encoder=True, kohya=True
    )
    model.export(tmp_path / "export")
    from safetensors.torch import load_file

    kohya_file = load_file(str(tmp_path / "export" / KOHYA_FILE))
    for key, down in kohya_file.items():
        if key.startswith("lora_unet") and key.endswith(".lora_down.weight"):
            block = next((b for b in block_ranks if key.startswith(f"lora_unet_{b.replace('.', '_')}_")), None)
            assert down.shape[0] == block_ranks.get(block, 4), key
            assert float(kohya_file[key.replace(".lora_down.weight", ".alpha")]) == 8, key
    keys = sorted(kohya_file)
    # the names AUTOMATIC1111 and ComfyUI map for SDXL: diffusers' module paths for the UNet, CLIP's (text_model_...)
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys), keys[:5]
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert len(keys) == 3 / 2 * len(lora_keys(tmp_path / "export" / "pytorch_lora_weights.safetensors"))

    kohya = loaded(tiny_sdxl, tmp_path / "export", KOHYA_FILE)
    for name in COMPONENTS:  # every adapter weight arrived where it was trained, none left over
        ours = get_peft_model_state_dict(getattr(model, name))
        module = getattr(kohya, name)
        theirs = get_peft_model_state_dict(module, adapter_name=next(iter(module.peft_config)))
        assert theirs.keys() == ours.keys(), name
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, msg=key)

    diffusers_format = generate(loaded(tiny_sdxl, tmp_path / "export"))
    assert np.abs(generate(kohya) - diffusers_format).mean() < 1e-3
    np.testing.assert_allclose(diffusers_format, generate(model.pipeline()), atol=1e-5)  # both: the trained model
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    assert np.abs(generate(base) - diffusers_format).mean() > 1e-3  # and the LoRA matters


def lycoris_delta(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's weight change from its LyCORIS factors as ComfyUI's loader computes it: LoHa (w1_a w1_b) * (w2_a w2_b)
    scaled by alpha / rank; LoKr kron(w1, w2), each a whole matrix or a product, scaled by alpha / the rank of the
    last product (1 when both are whole)."""
    alpha = float(factors["alpha"])
    if "hada_w1_a" in factors:
        w1 = factors["hada_w1_a"] @ factors["hada_w1_b"]
        return w1 * (factors["hada_w2_a"] @ factors["hada_w2_b"]) * alpha / factors["hada_w1_b"].shape[0]
    rank, halves = None, []
    for half in ("lokr_w1", "lokr_w2"):
        if half in factors:
            halves.append(factors[half])
        else:
            halves.append(factors[f"{half}_a"] @ factors[f"{half}_b"])
            rank = factors[f"{half}_b"].shape[0]
    return torch.kron(*halves) * (alpha / rank if rank else 1.0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_train_and_export_the_layers_weight_changes_in_the_lycoris_layout(
    kind, tiny_sdxl, dog, tmp_path, data_dir
):
    from peft.tuners.lycoris_utils import LycorisLayer
    from safetensors.torch import load_file

    model, data = build(
        tmp_path,
        data_dir,
        tiny_args(
            tiny_sdxl,
            dog,
            f"model.lora.type={kind}",
            "model.lora.alpha=8",
            "model.train_text_encoder=true",
            "model.optimizer.lr=1e-2",
            "model.lora.block_ranks={mid_block: 2}",
        ),
    )
    before = fixed_loss(model, next(iter(data.train_dataloader())))
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(model, train_dataloaders=data.train_dataloader())
    after = fixed_loss(model, next(iter(data.train_dataloader())))
    assert np.isfinite(after) and after != before  # the adapters moved

    model.export(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", KOHYA_FILE]
    assert "diffusers' SDXL pipeline does not load LoHa or LoKr" in (tmp_path / "export" / "README.md").read_text()
    saved = load_file(str(tmp_path / "export" / KOHYA_FILE))
    layers = {}
    for key, value in saved.items():
        layer, factor = key.rsplit(".", 1)
        layers.setdefault(layer, {})[factor] = value
    expected = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for path, layer in getattr(model, component).named_modules():
            if isinstance(layer, LycorisLayer):
                if component != "unet" and not path.startswith("text_model."):  # transformers 5's CLIPTextModel
                    path = f"text_model.{path}"
                expected[prefix + path.replace(".", "_")] = layer.get_delta_weight("default")
    assert layers.keys() == expected.keys()
    assert any(d.abs().max() > 0 for d in expected.values())
    for name, delta in expected.items():
        torch.testing.assert_close(lycoris_delta(layers[name]), delta, rtol=1e-5, atol=1e-7, msg=name)
    mid = next(name for name in layers if name.startswith("lora_unet_mid_block"))
    assert {v.shape[0] for k, v in layers[mid].items() if k in ("hada_w1_b", "lokr_w2_b")} == {2}  # block_ranks


def test_block_ranks_that_name_no_adapted_block_are_refused(tiny_sdxl):
    with pytest.raises(
        UserError, match=r"block_ranks: 'down_block.1' names no UNet .*adapted blocks: down_blocks.1, mid_block, up_bl"
    ):
        sdxl_lora(tiny_sdxl, lora={"block_ranks": {"down_block.1": 8}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora": {"use_dora": True}, "kohya": True}, r"drops DoRA magnitudes.*Set model.kohya=false"),
        ({"lora": {"use_dora": True}, "train_text_encoder": True}, r"not exported: .*Nothing was written"),
    ],
    ids=["kohya-dora", "text-encoder-dora"],
)
def test_loras_that_cannot_be_exported_faithfully_are_refused(tiny_sdxl, tmp_path, settings, message):
    model = sdxl_lora(tiny_sdxl, **settings)
    with pytest.raises(UserError, match=message):
        model.export(tmp_path / "export")
    assert not any(tmp_path.iterdir())  # no file, no partial folder


# ------------------------------------------------------------------------------------------------- diffusers' options
# The command-line options of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (its argparse).
DIFFUSERS_OPTIONS = """
pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name dataset_config_name
instance_data_dir cache_dir image_column caption_column repeats class_data_dir instance_prompt class_prompt
validation_prompt num_validation_images validation_epochs do_edm_style_training with_prior_preservation
prior_loss_weight num_class_images output_dir output_kohya_format seed resolution center_crop random_flip
train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate
text_encoder_lr scale_lr lr_scheduler snr_gamma lr_warmup_steps lr_num_cycles lr_power dataloader_num_workers
optimizer use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3 prodigy_decouple adam_weight_decay
adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction prodigy_safeguard_warmup max_grad_norm
push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to mixed_precision prior_generation_precision
local_rank enable_xformers_memory_efficient_attention rank use_dora lora_unet_blocks image_interpolation_mode
""".split()


def readme_table(heading: str) -> list[list[str]]:
    """The cells of each row of the README table that follows the paragraph starting with `heading`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.split("\n\n")[1].splitlines()[2:]]


def overrides(cell: str) -> list[list[str]]:
    """The overrides of a table cell: each `code span` a list of arguments."""
    return [shlex.split(span) for span in re.findall(r"`([^`]+)`", cell)]


def assert_composes(args: list[str], tmp_path: Path) -> None:
    """`args` compose with task=sdxl_dreambooth and every key they set is there."""
    cfg = compose_config(["task=sdxl_dreambooth", *args], tmp_path, tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    for key in (arg.split("=", 1)[0] for arg in args):
        if "." in key and not key.startswith("hydra."):  # a value, not a config group: it is there
            assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.slow  # composes the config ~70 times: ~10 s
def test_parity_table_names_every_option_and_each_override_composes(tmp_path):
    rows = readme_table("**Parity with diffusers'")
    named = [option for options, _, _ in rows for option in re.findall(r"`--([a-z0-9_]+)`", options)]
    assert sorted(named) == sorted(DIFFUSERS_OPTIONS)  # each once, none missing
    for options, ours, note in rows:
        assert overrides(ours) or note, f"{options}: neither an override nor why it is left out"
        for args in overrides(ours):
            assert_composes(args, tmp_path)


def test_the_trainers_parity_table_gives_each_feature_an_override_that_composes_or_a_reason(tmp_path):
    rows = readme_table("**Parity with kohya sd-scripts, SimpleTuner, OneTrainer and ai-toolkit.**")
    features = [feature for feature, *_ in rows]
    for wanted in ("masked loss", "caption dropout", "EMA", "LoHa", "multires noise", "torch.compile", "quantised"):
        assert any(wanted in feature for feature in features), wanted
    for feature, _, ours, note in rows:
        assert overrides(ours) or note, f"{feature}: neither an override nor why it is left out"
        for args in overrides(ours):
            assert_composes(args, tmp_path)


def test_prodigy_warmup_cosine_restarts_and_kept_step_checkpoints(tiny_sdxl, dog, tmp_path, data_dir):
    args = tiny_args(
        tiny_sdxl,
        dog,
        "experiment=sdxl_prodigy",
        "trainer.max_steps=7",
        "model.scheduler.name=cosine_with_restarts",
        "model.scheduler.num_warmup_steps=2",
        "model.scheduler.num_cycles=2",
        "model.scheduler.num_training_steps=10",
        "callbacks.step_checkpoints.every_n_train_steps=2",
        "callbacks.step_checkpoints.save_top_k=2",
        "data.validation_prompts=[]",
        "data.test_prompts=[]",
        "export_after_train=false",
    )
    run_here(tmp_path, data_dir, args)

    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        lrs = [float(row["lr-Prodigy"]) for row in csv.DictReader(file) if row.get("lr-Prodigy")]
    # linear warmup over 2 steps, then 2 cosine cycles over the remaining 8: a hard restart at step 6
    expected = [0.0, 0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * ((2 * (s - 2) / 8) % 1))) for s in range(3, 7)]
    assert lrs == pytest.approx(expected, abs=1e-6)
    assert expected[-1] == 1.0 and expected[4] == pytest.approx(0.5)

    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert kept == ["step_000004.ckpt", "step_000006.ckpt"]  # step 2 was removed, as the newest 2 are kept
    state = torch.load(tmp_path / "checkpoints" / kept[-1], weights_only=True)["optimizer_states"][0]
    group = state["param_groups"][0]
    assert list(group["betas"]) == [0.9, 0.99] and group["use_bias_correction"] and group["safeguard_warmup"]
    assert {"d", "d0", "d_coef", "growth_rate"} <= group.keys()  # Prodigy's step-size estimate: its optimizer


def test_8bit_adam_refuses_another_optimizer(tiny_sdxl, dog, tmp_path, data_dir):
    args = tiny_args(tiny_sdxl, dog, "experiment=sdxl_prodigy", "model.use_8bit_adam=true")
    model, _ = build(tmp_path, data_dir, args)
    with pytest.raises(UserError, match=r"model.optimizer._target_=prodigyopt.Prodigy set it false"):
        model.optimizer_factory()


def test_8bit_adam_needs_bitsandbytes_and_cuda(tiny_sdxl, dog, tmp_path, data_dir):
    from framework.errors import UserError

    with pytest.raises(UserError, match="use_8bit_adam"):
        run_here(tmp_path, data_dir, tiny_args(tiny_sdxl, dog, "trainer.max_steps=1", "model.use_8bit_adam=true"))


# ---------------------------------------------------------------------------------------------------------- bad input
def test_pipeline_errors_name_the_missing_component_or_say_how_to_download(tiny_sdxl, tmp_path):
    import shutil

    from framework.errors import UserError
    from lightning_modules.generation.sdxl import load_sdxl

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UserError, match="has no 'text_encoder_2' component"):
        load_sdxl(str(broken))
    with pytest.raises(UserError, match="scripts/download_models.py stabilityai/stable-diffusion-xl-base-1.0"):
        load_sdxl("stabilityai/stable-diffusion-xl-base-1.0")


def test_the_model_generates_at_the_resolution_of_its_data(tiny_sdxl, dog, tmp_path, data_dir):
    from framework.preparation import model_inputs
    from tests.helpers.dreambooth import dreambooth_data

    assert model_inputs(DreamBoothLoRA, dreambooth_data(None, resolution=72)) == {
        "resolution": 72,
        "class_prompt": "a photo of a dog",
    }
    model, data = build(tmp_path, data_dir, tiny_args(tiny_sdxl, dog, "data.resolution=72"))  # 9 x 9 latents
    assert model.hparams.resolution == data.resolution == 72
    assert model.generate(["a photo of sks dog"], [0])[0].size == (72, 72)  # any multiple of 8 that SDXL takes


def test_predicted_images_are_named_by_index_prompt_and_seed():
    from lightning_modules.generation.sampling import prediction_rows

    rows = [{"index": 3, "prompt": "A photo of sks dog, on the MOON!", "seed": 7, "image": None}]
    assert prediction_rows(rows)[0]["image"] == "0003_a_photo_of_sks_dog_on_the_moon_seed7.png"
    assert prediction_rows([{**rows[0], "prompt": "???"}])[0]["image"] == "0003_prompt_seed7.png"


# ------------------------------------------------------------------------------------------------------- exact resume
def adapters(run_dir) -> tuple[int, dict[str, torch.Tensor]]:
    """The global step of last.ckpt and its adapter weights, with the EMA's average as "ema.<i>" where it has one."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    averages = checkpoint.get("ema", {}).get("shadow_params", [])
    return checkpoint["global_step"], {**checkpoint["state_dict"], **{f"ema.{i}": t for i, t in enumerate(averages)}}


@pytest.mark.slow
def test_sigterm_and_resume_auto_end_with_the_weights_of_an_uninterrupted_run(
    tiny_sdxl, dog, tmp_path, data_dir, workspace
):
    """SIGTERM mid-epoch, then resume=auto, ends with the adapter weights (and their EMA) of an uninterrupted run (same
    seed), with prior preservation, cached latents (random crops), random flips, text-encoder LoRA, EMA, caption
    dropout, loss masks and a validation pass on the way."""
    masks = half_masks(dog, tmp_path / "masks", "left")

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
            "model.ema.decay=0.9",
            "data.caption_dropout=0.5",
            f"data.masks={masks}",
            "export_after_train=false",
            *extra,
        )

    fault = [
        "+callbacks.fault._target_=tests.helpers.callbacks.SignalAtStep",
        "+callbacks.fault.step=3",  # epoch 0, 3 of its 4 batches done
    ]
    killed = workspace.run(args("classes_killed", *fault), check=False)
    assert killed.returncode == 0, killed.stderr[-3000:]
    stopped = killed.run_dir
    assert adapters(stopped)[0] == 3 and not (stopped / "metrics.json").exists()

    # The same command with resume=auto: the runner finds the stopped run and finishes it there.
    assert workspace.run(args("classes_killed", *fault, "resume=auto")).run_dir == stopped
    run_here(tmp_path / "uninterrupted", data_dir, args("classes_uninterrupted"))
    (step, resumed), (expected_step, expected) = adapters(stopped), adapters(tmp_path / "uninterrupted")
    assert step == expected_step == STEPS and resumed.keys() == expected.keys()
    assert any("text_encoder" in name for name in resumed) and "ema.0" in resumed
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
