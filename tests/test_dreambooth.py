"""SDXL DreamBooth LoRA on a tiny SDXL pipeline saved with save_pretrained, trained through model.pretrained=DIR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framework.config import model_settings
from lightning_modules.generation.tiny import clip_text_config, clip_tokenizer, save_tiny_sdxl
from tests.conftest import compose_config, read_metrics, run_cli

RESOLUTION = 64
# conf/model/sdxl_lora.yaml's settings for modules built here: no training schedule, model card or fidelity models.
SDXL = model_settings("sdxl_lora", resolution=RESOLUTION, scheduler=None, card=None, fidelity=None)


def save_images(folder: Path, count: int, size: int = RESOLUTION, seed: int = 0) -> Path:
    """Blobs of colour on a plain background: something a tiny model can overfit."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = np.full((size, size + 8, 3), rng.integers(0, 255, 3), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        image[top : top + size // 2, left : left + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return folder


def save_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A tiny CLIPModel + CLIPProcessor (local tokenizer) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}_tokenizer")
    text = clip_text_config(tokenizer).to_dict()
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_vit(folder: Path, image_size: int = 32) -> Path:
    """A tiny ViTModel (the DINO embedder's class) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=image_size,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fidelity_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fidelity")
    return save_tiny_clip(root / "clip"), save_tiny_vit(root / "dino")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipeline", RESOLUTION)


@pytest.fixture(scope="session")
def dog(tmp_path_factory) -> Path:
    return save_images(tmp_path_factory.mktemp("instance") / "dog", 2)


def tiny_args(pipeline: Path, instance: Path, *extra: str) -> list[str]:
    """task=sdxl_dreambooth shrunk to the tiny pipeline: CPU, fp32, 64 px, two inference steps, no fidelity models."""
    return [
        "task=sdxl_dreambooth",
        f"model.pretrained={pipeline}",
        "model.vae=null",
        "model.fidelity.clip=null",
        "model.fidelity.dino=null",
        "model.inference.num_inference_steps=2",
        "trainer.precision=32-true",
        f"data.source.folder={instance}",
        f"data.resolution={RESOLUTION}",
        "data.center_crop=true",
        "data.seeds=[0]",
        "trainer.log_every_n_steps=1",
        "~callbacks.model_summary",
        "logger=csv",
        *extra,
    ]


def run_here(run_dir: Path, data_dir: Path, args: list[str]) -> dict[str, float]:
    """run.py in this process (the CLI costs seconds of imports per run); its metrics.json."""
    from framework.runner import run

    run(compose_config(args, run_dir, data_dir))
    return read_metrics(run_dir)


def sdxl_lora(pipeline: Path, lora: dict | None = None, inference: dict | None = None, **settings):
    """DreamBoothLoRA on `pipeline` with SDXL's settings; `lora` and `inference` update those blocks."""
    from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA

    blocks = {"lora": {**SDXL["lora"], **(lora or {})}, "inference": {**SDXL["inference"], **(inference or {})}}
    return DreamBoothLoRA(**{**SDXL, "pretrained": str(pipeline), **blocks, **settings})


def lora_keys(path: Path) -> list[str]:
    from safetensors.torch import load_file

    return sorted(load_file(str(path)))


def generate(pipeline, prompt: str = "a photo of sks dog", seed: int = 0) -> np.ndarray:
    return pipeline(
        prompt,
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tiny_sdxl, dog, fidelity_models, tmp_path_factory, data_dir) -> Path:
    """python run.py task=sdxl_dreambooth: text-encoder LoRA, Kohya export, validation with fidelity every 2 steps."""
    run_dir = tmp_path_factory.mktemp("dreambooth") / "train"
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
        "data.random_flip=true",
    )
    run_cli(args, run_dir, data_dir)
    return run_dir


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

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    base = generate(pipeline)
    pipeline.load_lora_weights(export)
    adapted = generate(pipeline)
    assert np.abs(adapted - base).max() > 1e-3


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


# ----------------------------------------------------------------------------------------- training details
def build(tmp_path: Path, data_dir: Path, args: list[str]):
    """The configured model and data module, in this process."""
    from framework.runner import instantiate

    cfg = compose_config(args, tmp_path, data_dir)
    return instantiate(cfg.model), instantiate(cfg.data)


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


def test_loss_falls_when_overfitting_two_images(tiny_sdxl, dog, tmp_path, data_dir):
    import lightning as L

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
    trainer = L.Trainer(
        max_steps=80,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    after = fixed_loss(model, batch, draws=16)
    assert after < before - 0.03, (before, after)  # measured: 1.083 -> 1.010 after 100 steps


def test_v_prediction_and_min_snr_weights(tiny_sdxl, dog, tmp_path, data_dir):
    model, data = build(
        tmp_path, data_dir, tiny_args(tiny_sdxl, dog, "model.prediction_type=v_prediction", "model.snr_gamma=5.0")
    )
    timesteps = torch.tensor([10, 500, 990])
    snr = (model.noise_scheduler.alphas_cumprod / (1 - model.noise_scheduler.alphas_cumprod))[timesteps]
    assert torch.allclose(model.snr_weights(timesteps), snr.clamp(max=5.0) / (snr + 1))
    assert np.isfinite(fixed_loss(model, next(iter(data.train_dataloader()))))


def test_micro_conditioning_follows_the_crop_and_the_flip():
    from datamodules.dreambooth import crop_and_flip
    from lightning_modules.generation.sdxl import time_ids

    image = Image.fromarray(np.arange(64 * 80 * 3, dtype=np.uint8).reshape(64, 80, 3))
    plain = crop_and_flip(image, (64, 64), (0, 4), flip=False)
    mirrored = crop_and_flip(image, (64, 64), (0, 4), flip=True)
    assert plain["crop_top_left"].tolist() == [0, 4] and mirrored["crop_top_left"].tolist() == [0, 80 - 4 - 64]
    assert torch.equal(mirrored["pixels"], plain["pixels"].flip(-1))
    ids = time_ids(torch.tensor([[300, 400]]), torch.tensor([[0, 12]]), torch.tensor([[64, 64]]))
    assert ids.tolist() == [[300, 400, 0, 12, 64, 64]]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_instance_folders(tmp_path, caplog):
    from datamodules.dreambooth import DreamBoothDataModule, read_captioned_images, read_instance_folder
    from framework.errors import UserError

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        read_instance_folder(empty, "a photo of sks dog")
    with pytest.raises(UserError, match="does not exist"):
        read_instance_folder(tmp_path / "missing", "a photo of sks dog")

    folder = save_images(tmp_path / "small", 2, size=32)
    (folder / "notes.txt").write_text("x")
    (folder / "labels.csv").write_text("x")
    save_images(folder / "more", 1, size=32)  # the one listing rule (datamodules.images): subfolders are read,
    save_images(folder / ".cache", 1, size=32)  # hidden files and folders are not
    (folder / "._img_0.png").write_bytes(b"macOS metadata")
    caplog.clear()
    data = DreamBoothDataModule(
        source=lambda: read_instance_folder(folder, "a photo of a dog"), trigger_token="sks", resolution=64
    )
    assert [example.image.path.relative_to(folder).as_posix() for example in data.instances] == [
        "img_0.png",
        "img_1.png",
        "more/img_0.png",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("non-image" in w and "labels.csv, notes.txt" in w for w in warnings) == 1
    assert any("smaller than data.resolution=64" in w for w in warnings)
    assert any("lack the trigger token 'sks'" in w for w in warnings)

    (tmp_path / "captioned").mkdir()
    (tmp_path / "captioned" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="line 1.*'prompt'"):
        read_captioned_images(tmp_path / "captioned")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install datasets"):
            read_captioned_images(tmp_path / "hf")


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


def test_pipeline_errors_name_the_missing_component_or_say_how_to_download(tiny_sdxl, tmp_path):
    import shutil

    from framework.errors import UserError
    from lightning_modules.generation.sdxl import load_sdxl

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UserError, match="has no 'text_encoder_2' component"):
        load_sdxl(str(broken))
    with pytest.raises(UserError, match="scripts/download_models.py sdxl-base"):
        load_sdxl("stabilityai/stable-diffusion-xl-base-1.0")


def test_8bit_adam_needs_bitsandbytes_and_cuda(tiny_sdxl, dog, tmp_path, data_dir):
    from framework.errors import UserError

    with pytest.raises(UserError, match="use_8bit_adam"):
        run_here(tmp_path, data_dir, tiny_args(tiny_sdxl, dog, "trainer.max_steps=1", "model.use_8bit_adam=true"))
