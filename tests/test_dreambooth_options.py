"""The options of diffusers' train_dreambooth_lora_sdxl.py: README's parity table names every one, each of its
overrides composes, and the options added for it take effect (Prodigy, warmup + cosine restarts, kept step checkpoints,
the resize interpolation)."""

from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from framework.errors import UserError
from tests.conftest import ROOT, compose_config
from tests.test_dreambooth import build, dog, run_here, tiny_args, tiny_sdxl  # noqa: F401 (fixtures)

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


def parity_table() -> list[tuple[list[str], list[list[str]], str]]:
    """README's parity rows: (diffusers options, our overrides (each a list of arguments), note)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Parity with diffusers'") :]
    rows = []
    for line in section.split("\n\n")[1].splitlines()[2:]:  # the table, without its header
        options, ours, note = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append(
            (
                re.findall(r"`--([a-z0-9_]+)`", options),
                [shlex.split(span) for span in re.findall(r"`([^`]+)`", ours)],
                note,
            )
        )
    return rows


def test_parity_table_names_every_option_and_each_override_composes(tmp_path):
    rows = parity_table()
    named = [option for options, _, _ in rows for option in options]
    assert sorted(named) == sorted(DIFFUSERS_OPTIONS)  # each once, none missing
    for options, overrides, note in rows:
        assert overrides or note, f"{options}: neither an override nor why it is left out"
        for args in overrides:
            cfg = compose_config(["task=sdxl_dreambooth", *args], tmp_path, tmp_path)
            OmegaConf.to_container(cfg, resolve=True)
            for key in (arg.split("=", 1)[0] for arg in args):
                if "." in key and not key.startswith("hydra."):  # a value, not a config group: it is there
                    assert OmegaConf.select(cfg, key) is not None, key


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


def test_interpolation_is_the_resize_filter(dog, tmp_path, data_dir):
    import numpy as np
    from torchvision.transforms import functional as TF

    from framework.runner import instantiate

    def resized(name: str) -> np.ndarray:
        args = ["task=sdxl_dreambooth", f"data.source.folder={dog}", "data.resolution=32", f"data.interpolation={name}"]
        data = instantiate(compose_config(args, tmp_path, data_dir).data)
        dataset = data.training_images()
        return np.asarray(dataset.resized(dataset.instances[0], (32, 32))[0])

    original = np.asarray(Image.open(dog / "img_0.png"))  # two colours, 64 x 72 pixels
    colours = {tuple(c) for c in original.reshape(-1, 3)}
    nearest, lanczos = resized("nearest"), resized("lanczos")
    assert nearest.shape == lanczos.shape == (32, 36, 3)
    assert {tuple(c) for c in nearest.reshape(-1, 3)} <= colours  # nearest neighbour makes no new colours
    expected = TF.resize(Image.open(dog / "img_0.png"), [32, 36], interpolation=TF.InterpolationMode.LANCZOS)
    np.testing.assert_array_equal(lanczos, np.asarray(expected))
    assert not np.array_equal(lanczos, resized("bilinear"))
    with pytest.raises(UserError, match=r"data.interpolation=cubic is not one of nearest, nearest_exact, bilinear"):
        resized("cubic")


def test_images_are_decoded_and_resized_once_and_cropped_every_step(dog, monkeypatch):
    from functools import partial

    from datamodules import dreambooth_items
    from datamodules.dreambooth import DreamBoothDataModule, read_instance_folder
    from datamodules.dreambooth_sources import FileImage

    loads = []
    load = FileImage.load
    monkeypatch.setattr(FileImage, "load", lambda self: (loads.append(Path(self.name).name), load(self))[1])
    data = DreamBoothDataModule(source=partial(read_instance_folder, dog, "a photo of sks dog"), resolution=32)
    dataset = data.training_images()
    loads.clear()  # reading the folder checks every image once
    crops = {tuple(dataset[(0, seed)]["instance"]["crop_top_left"].tolist()) for seed in range(8)}
    assert loads == ["img_0.png"] and len(crops) > 1  # one decode; a crop drawn per item (64 x 72 px -> 32 x 36)
    monkeypatch.setattr(dreambooth_items, "RESIZED_KEPT", 1)
    for index in (1, 0, 0):
        dataset[(index, 0)]
    assert loads == ["img_0.png", "img_1.png", "img_0.png"]  # one kept: the least recently used goes


def test_imagefolder_metadata_csv_with_another_caption_column(dog, tmp_path, data_dir):
    import shutil

    from framework.runner import instantiate

    folder = tmp_path / "icons"
    folder.mkdir()
    shutil.copy(dog / "img_0.png", folder / "a.png")
    (folder / "metadata.csv").write_text('file_name,text\na.png,"a TOK dog, sitting"\n')
    args = ["task=sdxl_lora_3d_icons", f"data.source.folder={folder}", "data.source.prompt_column=text"]
    data = instantiate(compose_config(args, tmp_path, data_dir).data)
    assert [(e.image.name, e.prompt) for e in data.instances] == [(str(folder / "a.png"), "a TOK dog, sitting")]
    with pytest.raises(UserError, match=r"metadata.csv, line 2: expected a row with 'file_name' and 'prompt'"):
        instantiate(compose_config(args[:2], tmp_path, data_dir).data).train_prompts()
