"""FSDP2 on two CPU processes (trainer=fsdp_sim): the sharded path of trainer=fsdp trains the model one process trains,
and its sharded checkpoints resume, export and load on any number of processes; a SIGTERM to one rank saves a sharded
checkpoint on all of them, from which resume=auto ends with the uninterrupted run's weights.

Each tiny captioner trains once on one process and once sharded over two, with the same global batch (data.batch_size)
and no dropout in the tiny models; one module-scoped run per model serves every assertion here.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration, VisionEncoderDecoderModel

from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning.inference import Captioner
from tests.helpers.config import compose_config, read_metrics
from tests.helpers.dreambooth import save_images, tiny_args
from tests.helpers.tiny_models import save_tiny_vit_gpt2, tiny_blip_dir
from tests.helpers.tiny_vlms import save_tiny_qwen2_vl

pytestmark = pytest.mark.slow  # every test reads runs of run.py on two processes

STEPS_ARGS = [
    "data.num_train=12",
    "data.num_val=2",
    "data.num_test=4",
    "data.captions_per_image=1",
    "data.image_size=32",
    "data.batch_size=4",  # the global batch: 2 images per rank under fsdp_sim
    "data.eval_batch_size=4",  # per device: one test batch, whose loss is the token mean of the 4 images
    "data.num_workers=0",
    "trainer.max_epochs=1",  # 3 optimizer steps
    "trainer.log_every_n_steps=1",
    "model.optimizer.lr=0.006",
    "callbacks.model_checkpoint=null",  # test and export the last weights, as last.ckpt holds them
    "logger=csv",
]
CAPTION_METRICS = ["test/BLEU-1", "test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr"]
MODELS = {
    "blip_shapes": (lambda root, data: tiny_blip_dir(data), BlipForConditionalGeneration),
    "vit_gpt2_shapes": (lambda root, data: save_tiny_vit_gpt2(root / "model"), VisionEncoderDecoderModel),
}


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request, tmp_path_factory, data_dir, make_workspace) -> tuple[str, Path]:
    """(task, root): root/single trained on one process, root/fsdp on two (sharded: `python run.py ...
    trainer=fsdp_sim`, root/fsdp a link to its run dir), root/export = mode=export from root/fsdp's sharded last.ckpt
    on one process."""
    task = request.param
    root = tmp_path_factory.mktemp(task)
    args = [f"task={task}", f"model.pretrained={MODELS[task][0](root, data_dir)}", *STEPS_ARGS]
    run(compose_config(args, root / "single", data_dir))
    (root / "fsdp").symlink_to(make_workspace().run([*args, "trainer=fsdp_sim"]).run_dir)
    export_args = [f"task={task}", "mode=export", f"ckpt_path={root / 'fsdp' / 'checkpoints' / 'last.ckpt'}"]
    run(compose_config(export_args, root / "export", data_dir))
    return task, root


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def load_export(model_class, directory: Path):
    """transformers' model from an export, every weight found (transformers 5 renames some on loading)."""
    model, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def test_sharded_training_gives_the_single_process_losses_and_metrics(runs):
    _, root = runs
    single, sharded = train_losses(root / "single"), train_losses(root / "fsdp")
    assert len(single) == 3 and sharded == pytest.approx(single, rel=1e-5)
    single_metrics, sharded_metrics = read_metrics(root / "single"), read_metrics(root / "fsdp")
    assert {k: sharded_metrics[k] for k in CAPTION_METRICS} == {k: single_metrics[k] for k in CAPTION_METRICS}
    assert sharded_metrics["test/loss"] == pytest.approx(single_metrics["test/loss"], rel=1e-5)


def test_the_export_after_sharded_training_has_the_single_process_weights(runs):
    task, root = runs
    single, sharded = weights(root / "single"), weights(root / "fsdp")
    assert set(sharded) == set(single)  # tied weights saved once, as save_pretrained of an unsharded model does
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    assert sorted(p.name for p in (root / "fsdp" / "export").iterdir()) == sorted(
        p.name for p in (root / "single" / "export").iterdir()
    )
    load_export(MODELS[task][1], root / "fsdp" / "export")


def test_the_sharded_checkpoint_exports_and_loads_on_one_process(runs):
    task, root = runs
    last = root / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    exported = weights(root / "export")
    assert exported.keys() == weights(root / "fsdp").keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in weights(root / "fsdp").items())
    model = load_export(MODELS[task][1], root / "export" / "export").state_dict()
    captioner = Captioner.from_pretrained(last).module.model.state_dict()  # the Captioner API reads them too
    assert captioner.keys() == model.keys() and all(torch.equal(captioner[k], model[k]) for k in model)


# Resuming and preemption are the framework's path, not the model's: BLIP's runs are enough.
@pytest.mark.parametrize("runs", ["blip_shapes"], indirect=True)
def test_a_sharded_checkpoint_resumes_on_one_process_and_refuses_an_unsharded_trainer(runs, data_dir):
    task, root = runs
    args = [f"task={task}", f"model.pretrained={tiny_blip_dir(data_dir)}", *STEPS_ARGS, "trainer.max_epochs=2"]
    last = root / "fsdp" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"is sharded \(written by trainer=fsdp\): resume it with trainer=fsdp"):
        run(compose_config([*args, f"ckpt_path={last}"], root / "unsharded", data_dir))
    # resume=auto finds the run dir's last.ckpt folder; two ranks' shards go into one process (torch.distributed.
    # checkpoint reshards them), which trains one more epoch of 3 steps.
    shutil.copytree(last, root / "one" / "checkpoints" / "last.ckpt")
    run(compose_config([*args, "resume=auto", "trainer=fsdp_sim", "trainer.devices=1"], root / "one", data_dir))
    assert len(train_losses(root / "one")) == 3
    assert torch.load(root / "one" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("runs", ["blip_shapes"], indirect=True)
def test_sigterm_to_one_rank_saves_on_all_and_resume_auto_ends_with_the_uninterrupted_weights(
    runs, data_dir, workspace
):
    task, root = runs
    args = [f"task={task}", f"model.pretrained={tiny_blip_dir(data_dir)}", *STEPS_ARGS, "trainer=fsdp_sim"]
    # Rank 1 alone is signalled after step 1: the ranks agree at the next batch, train it and save step 2 of 3.
    sigterm = ["+callbacks.fault._target_=tests.helpers.callbacks.SignalAtStep", "+callbacks.fault.step=1"]
    killed = workspace.run([*args, *sigterm, "+callbacks.fault.rank=1"], timeout=120)
    assert "[rank: 1] Received SIGTERM" in killed.stdout + killed.stderr
    stopped = killed.run_dir
    last = stopped / "checkpoints" / "last.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2
    assert not (stopped / "metrics.json").exists()  # the run stopped there

    # The same command with resume=auto: the runner finds the stopped run (its overrides, resume= aside).
    resumed_run = workspace.run([*args, *sigterm, "+callbacks.fault.rank=1", "resume=auto"], timeout=120)
    assert resumed_run.run_dir == stopped
    resumed, uninterrupted = weights(stopped), weights(root / "fsdp")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ SDXL DreamBooth LoRA
# One image per rank per step; validation (a generated image per rank) and last.ckpt at the last step.
DREAMBOOTH_STEPS = ["data.batch_size=2", "trainer.max_steps=3", "trainer.max_epochs=-1", "trainer.val_check_interval=3"]


@pytest.fixture(scope="module")
def dreambooth(
    tiny_sdxl, fidelity_models, tmp_path_factory, data_dir, make_workspace
) -> tuple[list[str], Path, list[float]]:
    """(args, root, the sharded run's losses before the signal): root/single trained on one process; root/fsdp sharded
    over two, SIGTERM to rank 1 after step 1 (a sharded last.ckpt at step 2 of 3, mid-epoch), then resume=auto to the
    end, exporting (`python run.py ... trainer=fsdp_sim` in a workspace, root/fsdp a link to its run dir);
    root/export = mode=export from root/fsdp's sharded last.ckpt (step 3) on one process. Validation and the test
    after training generate an image per rank through the sharded UNet (the pipeline calls its forward),
    scored once (tiny CLIP and DINO).
    With prior preservation: each of root/single and root/fsdp generates its class images at fit start (the sharded
    run through the sharded UNet, on both ranks) into a folder of its own, root/<run>_classes.
    Center crops and no flips: a random crop is drawn in the data loading, whose random numbers are each process's."""
    root = tmp_path_factory.mktemp("dreambooth_fsdp")
    images = save_images(root / "dog", 6)  # 3 steps per epoch
    clip, dino = fidelity_models
    args = tiny_args(tiny_sdxl, images, *DREAMBOOTH_STEPS, f"model.fidelity.clip={clip}", f"model.fidelity.dino={dino}")
    args += ["data.prior_preservation=true", "data.class_prompt=a photo of a dog", "data.num_class_images=3"]
    args += ["data.class_batch_size=2", f"data.class_images={root / 'single_classes'}"]
    run(compose_config(args, root / "single", data_dir))
    sigterm = ["+callbacks.fault._target_=tests.helpers.callbacks.SignalAtStep", "+callbacks.fault.step=1"]
    sharded = [*args, "trainer=fsdp_sim", f"data.class_images={root / 'fsdp_classes'}"]
    workspace = make_workspace()
    killed = workspace.run([*sharded, *sigterm, "+callbacks.fault.rank=1"], timeout=180)
    assert "[rank: 1] Received SIGTERM" in killed.stdout + killed.stderr
    (root / "fsdp").symlink_to(killed.run_dir)
    assert torch.load(root / "fsdp" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2
    assert not (root / "fsdp" / "metrics.json").exists()  # the run stopped there
    losses = train_losses(root / "fsdp")
    resumed = workspace.run([*sharded, *sigterm, "+callbacks.fault.rank=1", "resume=auto"], timeout=180)
    assert resumed.run_dir == killed.run_dir
    last = root / "fsdp" / "checkpoints" / "last.ckpt"
    run(compose_config([*args, "mode=export", f"ckpt_path={last}"], root / "export", data_dir))
    return args, root, losses


def lora_weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "pytorch_lora_weights.safetensors")


def test_sharded_dreambooth_gives_the_single_process_losses(dreambooth):
    _, root, sharded = dreambooth
    single = train_losses(root / "single")
    assert len(single) == 3 and len(sharded) == 2  # the signal stopped the sharded run after step 2
    assert sharded == pytest.approx(single[:2], rel=1e-5)


def test_sharded_dreambooth_generates_the_single_process_class_images(dreambooth):
    _, root, _ = dreambooth
    single = sorted((root / "single_classes").iterdir())
    sharded = sorted((root / "fsdp_classes").iterdir())
    assert [p.name for p in single] == [p.name for p in sharded] == [f"class_0000{i}.png" for i in range(3)]
    for one, two in zip(single, sharded):  # 8-bit PNGs of the same float images: at most a rounding step apart
        difference = np.abs(np.asarray(Image.open(one), np.int16) - np.asarray(Image.open(two), np.int16))
        assert difference.max() <= 1, one.name


def test_sharded_dreambooth_generates_the_single_process_images(dreambooth):
    _, root, _ = dreambooth
    single, sharded = read_metrics(root / "single"), read_metrics(root / "fsdp")
    scores = [f"{stage}/{name}" for stage in ("val", "test") for name in ("CLIP-T", "CLIP-I", "DINO")]
    assert {k: sharded[k] for k in scores} == pytest.approx({k: single[k] for k in scores}, rel=1e-4)


def test_sharded_dreambooth_resumed_after_sigterm_exports_the_single_process_lora(dreambooth):
    _, root, _ = dreambooth
    single, sharded = lora_weights(root / "single" / "export"), lora_weights(root / "fsdp" / "export")
    assert sharded.keys() == single.keys() and any("lora" in name for name in single)
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    names = sorted(p.name for p in (root / "single" / "export").iterdir())
    assert names == sorted(p.name for p in (root / "fsdp" / "export").iterdir())


def test_the_sharded_dreambooth_checkpoint_exports_on_one_process_and_loads_in_diffusers(dreambooth, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    _, root, _ = dreambooth
    last = root / "fsdp" / "checkpoints" / "last.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 3
    exported, trained = lora_weights(root / "export" / "export"), lora_weights(root / "fsdp" / "export")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_lora_weights(root / "export" / "export")
    assert pipeline.get_list_adapters() == {"unet": ["default_0"]}


def test_sharded_dreambooth_refuses_text_encoder_lora(dreambooth, data_dir, tmp_path):
    args, _, _ = dreambooth
    cfg = compose_config(
        [*args, "trainer=fsdp_sim", "trainer.devices=1", "model.train_text_encoder=true"], tmp_path, data_dir
    )
    with pytest.raises(UserError, match=r"trainer=fsdp shards the UNet only.*model.train_text_encoder=false"):
        run(cfg)


def test_a_sharded_dreambooth_checkpoint_of_other_lora_settings_is_refused(dreambooth, data_dir, tmp_path):
    args, root, _ = dreambooth
    last = root / "fsdp" / "checkpoints" / "last.ckpt"
    other = [*args, "trainer=fsdp_sim", "trainer.devices=1", f"ckpt_path={last}", "model.lora.target_modules=[to_q]"]
    with pytest.raises(UserError, match=r"does not fit this model \(0 trained weights missing, \d+ unknown; it has un"):
        run(compose_config(other, tmp_path, data_dir))


def test_a_sharded_dreambooth_checkpoint_resumes_on_one_process(dreambooth, data_dir):
    args, root, _ = dreambooth
    # Two ranks' adapter shards into one process (FSDP2Strategy's partial load: the frozen SDXL is not in them).
    shutil.copytree(root / "fsdp" / "checkpoints" / "last.ckpt", root / "one" / "checkpoints" / "last.ckpt")
    one = [*args, "resume=auto", "trainer=fsdp_sim", "trainer.devices=1", "trainer.max_steps=6"]  # one more epoch
    run(compose_config(one, root / "one", data_dir))
    assert len(train_losses(root / "one")) == 3
    assert torch.load(root / "one" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 6


def test_the_chat_vlm_sharded_gives_the_single_process_losses(tmp_path, data_dir, workspace):
    """Qwen2-VL (tiny, its chat template and image tokens) under trainer=fsdp_sim: the losses of one process."""
    model = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    args = ["task=hf_captioner_shapes", f"model.pretrained={model}", "model.image_size=32", *STEPS_ARGS]
    run(compose_config(args, tmp_path / "single", data_dir))
    sharded = workspace.run([*args, "trainer=fsdp_sim"]).run_dir
    single, fsdp = train_losses(tmp_path / "single"), train_losses(sharded)
    assert len(single) == 3 and np.allclose(fsdp, single, rtol=1e-4), (fsdp, single)
