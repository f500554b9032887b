"""Bad input as a user meets it: each mistake is one UserError naming the file or the config key and what to do.

Explaining photos with the shapes classifier, unreadable images in every data module (and data.skip_bad_images),
the readers' counts, config values checked before anything runs, checkpoints that are no checkpoint, truncated, or
of another task; and, typed through `python run.py`: booleans, values a run would meet late, paths, sweeps,
ignored settings, divergence (images as photos are: tests/test_images.py and each data module's tests; full
disks and run records: tests/test_run_records.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.captions import CaptionBatch
from datamodules.explain import ImageFolderDataModule
from datamodules.images import ImageFolderDataset, collate
from datamodules.shapes import SHAPES
from framework.checkpoints import check_checkpoint, read_checkpoint
from framework.checks import check_config
from framework.errors import UserError
from framework.images import SkippedImages, image_transform
from framework.runner import instantiate, load_model, run
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.explain.classifier import ShapesClassifier
from tests.helpers.captioning import caption_data, read
from tests.helpers.cli import one_error_line
from tests.helpers.config import TINY_DATA, TINY_MODEL, TINY_SHAPES, compose_config
from tests.helpers.datasets import coco_tree, flickr8k_tree
from tests.helpers.dreambooth import dreambooth_data
from tests.helpers.explain import explain_module
from tests.helpers.style import task_data
from tests.helpers.tasks import shapes_classifier_checkpoint

SKIP_HINT = "data.skip_bad_images=true"


def output(result) -> str:
    return result.stdout + result.stderr


# ------------------------------------------------------------------------------------- explaining photos
def test_the_shapes_classifier_refuses_a_folder_of_photos_before_it_is_loaded_or_trained(tmp_path):
    # model.classifier.checkpoint=null: loading it would fail (outside the runner, nothing trains it); it is not tried
    for task, settings in (("saliency", ["model.methods=[vanilla]"]), ("adversarial", [])):
        for source_size, found in ((None, "of several sizes"), ([300, 200], "300x200 px")):
            with pytest.raises(
                UserError,
                match=rf"the images of data.images are {found}, not the square synthetic "
                r"shapes images that model.classifier.name=shapes .* "
                r"model.classifier.name=resnet50 data.image_size=224",
            ):
                explain_module(task, tmp_path, *settings, classes=None, image_size=224, source_size=source_size)


def test_the_shapes_classifier_explains_only_shapes_of_its_own_size(tmp_path):
    checkpoint = f"model.classifier.checkpoint={shapes_classifier_checkpoint(tmp_path / 'shapes.ckpt')}"

    def saliency(classes=None, image_size=None, source_size=None):
        settings = (checkpoint, "model.methods=[vanilla]", "model.randomisation=false")
        return explain_module(
            "saliency", tmp_path, *settings, classes=classes, image_size=image_size, source_size=source_size
        )

    with pytest.raises(UserError, match=r"the images of data.images are 512x512 px, not the 64x64 px synthetic"):
        saliency(image_size=64, source_size=[512, 512])
    with pytest.raises(
        UserError,
        match=r"data.image_size=128, but the classifier .* trained on 64 px images: "
        r"set data.image_size=64",
    ):
        saliency(classes=list(SHAPES), image_size=128)
    with pytest.raises(UserError, match=r"model.image_size=224, but the classifier"):
        explain_module("class_visualisation", tmp_path, checkpoint, "model.image_size=224")
    assert saliency(classes=list(SHAPES), image_size=64)  # data=shape_classes
    assert saliency(image_size=64, source_size=[64, 64])  # a folder of shapes images
    legacy = f"model.classifier.checkpoint={shapes_classifier_checkpoint(tmp_path / 'old.ckpt', None)}"
    # written before the size was kept: not checked
    assert explain_module("class_visualisation", tmp_path, legacy, "model.image_size=224")


@pytest.mark.slow
def test_cli_saliency_of_photos_with_the_shapes_classifier(tmp_path, workspace, shapes_checkpoint):
    # shapes_checkpoint: the classifier it would otherwise train first (its required run), trained once a session
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 200), (90, 140, 60)).save(photos / "bird.jpg")
    args = ["task=saliency", "data=explain_images", f"data.images={photos}"]
    result = workspace.run(args, check=False, full_error=False)
    error = one_error_line(result)
    assert (
        "the images of data.images are 300x200 px, not the square synthetic shapes images that "
        "model.classifier.name=shapes (the shapes classifier) was trained on"
    ) in error
    assert "model.classifier.name=resnet50" in error


# ---------------------------------------------------------------------------------------- unreadable images
def write_png(path: Path, seed: int = 0, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_bad(path: Path, kind: str) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        path.write_bytes(path.read_bytes()[:600])
    else:
        path.write_text("not an image\n")
    return path


BAD_NAMES = {"empty": "empty.jpg", "truncated": "truncated.jpg", "text": "notes.png"}


def served(loader: DataLoader, counter: SkippedImages) -> int:
    """Images the loader serves, counting the skipped ones as the LightningModules do (captioning: CaptionBatch)."""
    counts = [(b.skipped, b.size) if isinstance(b, CaptionBatch) else (b["skipped"], b["size"]) for b in loader]
    served = sum(size for skipped, size in counts if counter.count("predict", skipped, size))
    counter.report("predict")
    return served


def explain_folder(folder: Path, skip: bool) -> int:
    data = ImageFolderDataModule(str(folder), image_size=16, batch_size=8, num_workers=0, skip_bad_images=skip)
    return served(data.predict_dataloader(), SkippedImages())


def caption_predict_folder(folder: Path, skip: bool) -> int:
    data = caption_data(images=str(folder), image_size=16, batch_size=8, num_workers=0, skip_bad_images=skip)
    return served(data.predict_dataloader(), SkippedImages())


def caption_training_folder(folder: Path, skip: bool) -> int:
    lines = [
        {"file_name": p.name, "text": "a picture", "split": "train"}
        for p in sorted(folder.iterdir())
        if p.suffix != ".jsonl"
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    shrink = ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", f"data.skip_bad_images={skip}"]
    cfg = compose_config(["data=caption_folder", f"data.source.folder={folder}", *shrink], folder, folder)
    return served(instantiate(cfg.data).train_dataloader(), SkippedImages())


def dreambooth_instances(folder: Path, skip: bool) -> int:
    # resolution 16: the small test images are not warned about as smaller than the training size
    return len(dreambooth_data(folder, "a photo of sks dog", resolution=16, skip_bad_images=skip).instances)


def dreambooth_class_images(folder: Path, skip: bool) -> int:
    data = dreambooth_data(
        None,
        prior_preservation=True,
        class_prompt="a photo of a dog",
        class_images=str(folder),
        num_class_images=10,
        skip_bad_images=skip,
    )
    return len(data.class_examples())


def content_folder(folder: Path, skip: bool) -> int:
    data = task_data("fast_style", folder=str(folder), image_size=16, batch_size=1, num_workers=0, skip_bad_images=skip)
    data.setup("fit")  # the last image (by path) held out for validation: both sets served
    return served(data.train_dataloader(), SkippedImages()) + served(data.val_dataloader(), SkippedImages())


def adain_folders(folder: Path, skip: bool) -> int:
    """task=adain_style's content and style folders, one folder for both: each pair a content and a style."""
    values = {"image_size": 16, "batch_size": 1, "num_workers": 0, "skip_bad_images": skip, "num_val_styles": 1}
    data = task_data("adain_style", folder=str(folder), style_folder=str(folder), **values)
    data.setup("fit")
    return served(data.train_dataloader(), SkippedImages()) + served(data.val_dataloader(), SkippedImages())


def images_to_stylise(folder: Path, skip: bool) -> int:
    data = task_data("fast_style", images=str(folder), num_workers=0, skip_bad_images=skip)
    data.setup("predict")
    return served(data.predict_dataloader(), SkippedImages())


def style_images(folder: Path, skip: bool) -> int:
    styles = [str(path) for path in sorted(folder.iterdir())]
    data = task_data("style_transfer", style=styles, image_size=32, skip_bad_images=skip)
    inputs = data.model_inputs(("styles", "style_weights"))
    assert len(inputs["style_weights"]) == len(inputs["styles"])
    return len(inputs["styles"])


@pytest.mark.parametrize("kind", BAD_NAMES)
@pytest.mark.parametrize(
    "read",
    [
        explain_folder,
        caption_predict_folder,
        caption_training_folder,
        dreambooth_instances,
        dreambooth_class_images,
        content_folder,
        adain_folders,
        images_to_stylise,
        style_images,
    ],
)
def test_an_unreadable_image_names_the_file_or_is_skipped_with_one_warning(read, kind, tmp_path, caplog):
    folder = tmp_path / "images"
    write_png(folder / "a.png", 1)
    write_png(folder / "b.png", 2)
    bad = write_bad(folder / BAD_NAMES[kind], kind)
    with pytest.raises(UserError, match=rf"cannot read image {bad}: .*{SKIP_HINT}") as error:
        read(folder, skip=False)
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING):
        assert read(folder, skip=True) == 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and f"skipped 1 unreadable images ({SKIP_HINT})" in warnings[0]


def test_images_a_run_cannot_do_without_are_not_skipped(tmp_path):
    bad = write_bad(tmp_path / "photo.jpg", "empty")
    with pytest.raises(UserError, match=rf"data.content: cannot read image {bad}: .*cannot be skipped"):
        task_data("style_transfer", content=str(bad), skip_bad_images=True).model_inputs(("content",))
    with pytest.raises(UserError, match=rf"data.style: cannot read image {bad}: .*cannot be skipped"):
        task_data("fast_style", style=str(bad), skip_bad_images=True).model_inputs(("style",))
    with pytest.raises(UserError, match=r"data.style: none of the 1 images can be read"):
        task_data("style_transfer", style=[str(bad)], skip_bad_images=True).model_inputs(("styles",))


def test_an_unreadable_image_in_a_loader_worker_is_still_one_message(tmp_path):
    write_png(tmp_path / "a.png")
    bad = write_bad(tmp_path / "b.jpg", "empty")
    loader = DataLoader(
        ImageFolderDataset(tmp_path, image_transform(16)), batch_size=2, num_workers=1, collate_fn=collate
    )
    with pytest.raises(UserError) as error:
        next(iter(loader))
    assert str(error.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_unreadable_training_image(tmp_path, workspace):
    folder = tmp_path / "captions"
    for split in ("train", "validation"):
        names = [write_png(folder / split / f"{i}.png", i).name for i in range(3)]
        if split == "train":
            names.append(write_bad(folder / split / "empty.jpg", "empty").name)
        (folder / split / "metadata.jsonl").write_text(
            "\n".join(json.dumps({"file_name": name, "text": "a red circle"}) for name in names)
        )
    args = [
        "data=caption_folder",
        f"data.source.folder={folder}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=1",
        "trainer.fast_dev_run=true",
        *TINY_MODEL,
    ]
    result = workspace.run(args, check=False, full_error=False)
    error = one_error_line(result)
    assert f"cannot read image {folder / 'train' / 'empty.jpg'}: " in error
    assert SKIP_HINT in error and "Caught UserError in DataLoader worker" not in output(result)


# ------------------------------------------------------------------------------------------------ readers
def test_flickr8k_counts_per_split_names_the_list_of_a_missing_image_and_counts_few_captions(tmp_path, caplog):
    paths = flickr8k_tree(tmp_path)
    token_file = Path(paths["token_file"])
    lines = token_file.read_text().splitlines()
    short = lines[0].split("#")[0]
    token_file.write_text("\n".join(line for line in lines if not line.startswith(f"{short}#4")) + "\n")
    with caplog.at_level(logging.INFO):
        read("flickr8k", **paths)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert f"train split: 20 images, 99 captions ({paths['train_list']})" in infos
    assert f"val split: 5 images, 25 captions ({paths['val_list']})" in infos
    assert f"test split: 5 images, 25 captions ({paths['test_list']})" in infos
    assert f"{token_file}: 1 images have fewer than the usual 5 captions (1 train; e.g. {short} has 4)" in caplog.text

    missing = Path(paths["val_list"]).read_text().split()[0]
    (Path(paths["image_dir"]) / missing).unlink()
    with pytest.raises(UserError, match=rf"1 images listed in {paths['val_list']} are missing \(e.g. .*{missing}\)"):
        read("flickr8k", **paths)


def test_coco_counts_per_split_and_only_fewer_captions_than_usual(tmp_path, caplog):
    paths = coco_tree(tmp_path)  # 2 captions an image
    annotations = json.loads(Path(paths["val"]).read_text())
    annotations["annotations"] += [{"id": 999, "image_id": 40, "caption": "a third caption"}]  # more: usual in COCO
    annotations["annotations"] = [a for a in annotations["annotations"] if a["id"] != 101]  # image 10: one caption
    Path(paths["val"]).write_text(json.dumps(annotations))
    with caplog.at_level(logging.INFO):
        read("coco", **paths)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert f"train split: 3 images, 6 captions ({paths['train']})" in infos
    assert f"val split: 2 images, 3 captions ({paths['val']})" in infos  # images 10 (1 caption) and 20
    assert f"test split: 3 images, 7 captions ({paths['val']})" in infos  # 30, 40 (3 captions), 50
    few = [r.getMessage() for r in caplog.records if "fewer than the usual" in r.getMessage()]
    assert len(few) == 1 and "1 images have fewer than the usual 2 captions (1 val; " in few[0]


# ----------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.beam_size=0", "model.beam_size=0: takes a whole number >= 1"),
        ("model.max_len=0", "model.max_len=0: takes a whole number >= 1"),
        ("model.beam_size=1.5", "model.beam_size=1.5: takes a whole number >= 1"),
    ],
)
def test_cnn_rnn_decoding_settings(override, message, tmp_path, data_dir):
    with pytest.raises(UserError, match=rf"^{re.escape(message)}$"):
        check_config(compose_config([*TINY_MODEL, override], tmp_path, data_dir))


@pytest.mark.parametrize(
    "task, override, message",
    [
        ("blip_shapes", "model.generation.num_beams=0", "model.generation.num_beams=0: takes a whole number >= 1"),
        (
            "vit_gpt2_shapes",
            "model.generation.max_length=0",
            "model.generation.max_length=0: takes a whole number >= 1",
        ),
        ("blip_shapes", "model.max_caption_tokens=0", "model.max_caption_tokens=0: takes a whole number >= 1"),
    ],
)
def test_hugging_face_captioner_decoding_settings_are_checked_before_loading(
    task, override, message, tmp_path, data_dir
):
    """The config check, before any weights are looked for (model.pretrained names none here)."""
    cfg = compose_config([f"task={task}", "model.pretrained=/nonexistent", override], tmp_path, data_dir)
    with pytest.raises(UserError, match=rf"^{re.escape(message)}"):
        check_config(cfg)


@pytest.mark.parametrize(
    "data, key",
    [
        (data, "batch_size")
        for data in (
            "shapes",
            "coco",
            "flickr8k",
            "karpathy",
            "caption_folder",
            "shape_classes",
            "explain_images",
            "class_targets",
            "dreambooth_folder",
            "captioned_images",
            "content_folder",
        )
    ]
    + [
        ("shapes", "eval_batch_size"),
        ("coco_karpathy", "eval_batch_size"),
        ("shape_classes", "eval_batch_size"),
        ("dreambooth_folder", "class_batch_size"),
        ("content_folder", "predict_batch_size"),
    ],
)
def test_batch_sizes(data, key, tmp_path, data_dir):
    cfg = compose_config([f"data={data}", f"data.{key}=0"], tmp_path, data_dir)
    # the config's check (framework/schema.py) where the data module's signature declares the range, else its own
    with pytest.raises(UserError, match=rf"data.{key}=0(: takes a whole number >= 1| must be positive)"):
        check_config(cfg)
        instantiate(cfg.data)


@pytest.mark.slow
def test_cli_data_dir_that_cannot_be_written(workspace):
    # The shapes data's folder (data.root, by default paths.data_dir: the repository's data/) set to one that cannot be
    # written, as a user types it: refused before anything runs.
    result = workspace.run(["trainer.fast_dev_run=true", "data.root=/proc/x"], check=False, full_error=False)
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert result.returncode == 1 and not result.created and "Traceback" not in result.output
    assert errors == ["config error: data.root=/proc/x: takes a folder that can be written (/proc is not one)"]


# -------------------------------------------------------------------------------------------- checkpoints
def test_files_that_are_no_checkpoint(tmp_path):
    run_dir = tmp_path / "run" / "checkpoints"
    run_dir.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, run_dir / "last.ckpt")
    text = run_dir / "notes.txt"
    text.write_text("epoch 3: val/CIDEr 0.6\n")
    with pytest.raises(
        UserError,
        match=rf"{text} \(ckpt_path\) is not a checkpoint \(torch.save did not write it: "
        r"a text file\? \d+ bytes\); other checkpoints in .*: last.ckpt",
    ):
        read_checkpoint(text)
    truncated = run_dir / "epoch_003.ckpt"
    truncated.write_bytes((run_dir / "last.ckpt").read_bytes()[:700])
    with pytest.raises(
        UserError,
        match=rf"checkpoint {truncated} \(ckpt_path\) is corrupt or truncated .*"
        r"other checkpoints in .*: last.ckpt",
    ):
        read_checkpoint(truncated)
    weights = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    with pytest.raises(
        UserError,
        match=rf"{weights} \(ckpt_path\) is not a Lightning checkpoint: it has no state_dict "
        r"\(it holds conv1.weight.*\); give a run's checkpoints/last.ckpt",
    ):
        read_checkpoint(weights)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "where": Path("x")}, pickled)
    with pytest.raises(UserError, match=r"holds Python objects besides tensors"):
        read_checkpoint(pickled)
    with pytest.raises(UserError, match=r"checkpoint .*missing.ckpt \(ckpt_path\) does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    folder = run_dir / "epoch_004.ckpt"  # a sharded checkpoint (trainer=fsdp) whose save was interrupted
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(
        UserError,
        match=rf"{folder} \(ckpt_path\) is a directory, not a checkpoint file nor a sharded checkpoint of "
        r"trainer=fsdp \(a folder with meta.pt and .metadata; it has meta.pt alone, an interrupted save\?\); "
        r"other checkpoints in .*: last.ckpt",
    ):
        read_checkpoint(folder)
    with pytest.raises(  # a run dir: the checkpoints in its checkpoints/ folder
        UserError,
        match=rf"{run_dir.parent} \(ckpt_path\) is a directory, not a checkpoint file .*it has neither\); "
        rf"checkpoints in {run_dir}: last.ckpt, epoch_003.ckpt, epoch_004.ckpt$",
    ):
        read_checkpoint(run_dir.parent)


def test_checkpoints_of_another_module_class(tmp_path):
    classifier = shapes_classifier_checkpoint(tmp_path / "classifier.ckpt")
    with pytest.raises(
        UserError,
        match=r"belongs to task shapes_classifier \(its module class ShapesClassifier\), "
        r"not to task=shapes_captioning \(CNNRNNCaptioner\): run with "
        r"task=shapes_classifier",
    ):
        check_checkpoint(classifier, CNNRNNCaptioner, "shapes_captioning")
    check_checkpoint(classifier, ShapesClassifier, "shapes_classifier")
    # Written before checkpoints recorded their task (with every argument, as save_hyperparameters keeps them): the
    # module's required arguments are looked for.
    legacy = tmp_path / "legacy.ckpt"
    hparams = {"classes": list(SHAPES), "optimizer": {}, "scheduler": None, "width": 16, "label_smoothing": 0.0}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, legacy)
    with pytest.raises(
        UserError,
        match=r"legacy.ckpt \(ckpt_path\) is not a checkpoint of task=shapes_captioning: "
        r"its module class CNNRNNCaptioner needs vocab, encoder, decoder, .*which the "
        r"checkpoint does not hold \(its hyperparameters: classes, optimizer, scheduler, width, label_smoothing\)",
    ):
        check_checkpoint(legacy, CNNRNNCaptioner, "shapes_captioning")
    check_checkpoint(legacy, ShapesClassifier, "shapes_classifier")
    captioner = tmp_path / "captioner.ckpt"
    torch.save({"state_dict": {}, "captioner": "HFCaptioner"}, captioner)
    with pytest.raises(UserError, match=r"belongs to module class HFCaptioner, not to task=shapes_captioning"):
        check_checkpoint(captioner, CNNRNNCaptioner, "shapes_captioning")
    with pytest.raises(
        UserError,
        match=r"captioner.ckpt \(model.classifier.checkpoint\) belongs to module class "
        r"HFCaptioner, not to task=shapes_classifier",
    ):
        explain_module(
            "saliency",
            tmp_path,
            f"model.classifier.checkpoint={captioner}",
            "model.methods=[vanilla]",
            classes=list(SHAPES),
            image_size=64,
            source_size=None,
        )


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, data_dir) -> Path:
    """A tiny task=shapes_classifier run (one epoch of a few batches) with its checkpoints."""
    run_dir = tmp_path_factory.mktemp("classifier_run")
    run(
        compose_config(
            [
                "task=shapes_classifier",
                "data.num_train=32",
                "data.num_val=16",
                "data.num_test=16",
                "data.image_size=32",
                "data.batch_size=8",
                "model.width=4",
                "trainer.max_epochs=1",
                "logger=csv",
                "export_after_train=false",
            ],
            run_dir,
            data_dir,
        )
    )
    return run_dir


def test_checkpoints_record_their_task_and_the_classifier_its_image_size(classifier_run, data_dir):
    checkpoint = torch.load(classifier_run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert checkpoint["task"] == {
        "name": "shapes_classifier",
        "module": "lightning_modules.explain.classifier.ShapesClassifier",
    }
    assert checkpoint["hyper_parameters"]["image_size"] == 32
    overrides = [
        "task=shapes_classifier",
        "mode=eval",
        "data.num_train=32",
        "data.num_val=16",
        "data.num_test=16",
        "data.image_size=32",
        "logger=csv",
        f"ckpt_path={classifier_run / 'checkpoints' / 'last.ckpt'}",
    ]
    run(compose_config(overrides, classifier_run / "eval", data_dir))  # the checkpoint's own task loads it


def test_resuming_from_a_truncated_checkpoint(classifier_run, tmp_path, data_dir):
    truncated = tmp_path / "checkpoints" / "copied.ckpt"
    truncated.parent.mkdir()
    truncated.write_bytes((classifier_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    cfg = compose_config([*TINY_SHAPES, "trainer.fast_dev_run=true", f"ckpt_path={truncated}"], tmp_path, data_dir)
    with pytest.raises(UserError, match=rf"checkpoint {truncated} \(ckpt_path\) is corrupt or truncated"):
        run(cfg)


@pytest.mark.slow
def test_cli_eval_with_a_checkpoint_of_another_task_or_a_text_file(classifier_run, tmp_path, workspace):
    checkpoint = classifier_run / "checkpoints" / "last.ckpt"
    result = workspace.run(
        ["task=shapes_captioning", "mode=eval", f"ckpt_path={checkpoint}", *TINY_DATA],
        check=False,
        full_error=False,
    )
    assert (
        f"checkpoint {checkpoint} (ckpt_path) belongs to task shapes_classifier (its module class "
        "ShapesClassifier), not to task=shapes_captioning (CNNRNNCaptioner): run with task=shapes_classifier, "
        "or give a checkpoint of a task=shapes_captioning run"
    ) in one_error_line(result)
    notes = tmp_path / "notes.txt"
    notes.write_text("best epoch: 3\n")
    result = workspace.run(  # HYDRA_FULL_ERROR=1: the traceback too
        ["mode=predict", f"ckpt_path={notes}", f"data.images={tmp_path}"],
        check=False,
    )
    assert result.returncode == 1
    assert f"{notes} (ckpt_path) is not a checkpoint (torch.save did not write it" in output(result)
    assert "Traceback (most recent call last)" in output(result)


# --------------------------------------------------------------------------------------------- as typed
# Bad or unusual input typed as a user types it (`python run.py ...` in a copy of the repository): each is one line
# naming the key or file and a non-zero exit, before any work where the config says it all, or a documented accepted
# behaviour.
SHAPE_DATA = ["data.num_train=48", "data.num_val=16", "data.num_test=16"]
ONE_EPOCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]

# Typed together: one error line for each, all at once, in one command.
BAD_SETTINGS = {
    "data.skip_bad_images=no": "config error: data.skip_bad_images=no: takes true or false",
    "export_after_train=maybe": "config error: export_after_train=maybe: takes true or false",
    "+trainer.val_check_interval=0": "config error: trainer.val_check_interval=0: takes a number > 0",
    "model.optimizer.lr=abc": "config error: model.optimizer.lr=abc: takes a number > 0",
    "data.num_train=-5": "config error: data.num_train=-5: takes a whole number >= 0",
    "seed=-1": "config error: seed=-1: takes a whole number >= 0 and <= 4294967295",
    "+trainer.max_epoch=2": (
        "config error: trainer.max_epoch is not a setting of lightning.pytorch.trainer.trainer.Trainer (did you mean "
        "trainer.max_epochs?)"
    ),
    "paths.log_dir=/proc/vlx": "config error: paths.log_dir=/proc/vlx: takes a folder that can be written",
}

# Each alone: (what is typed, extra environment, what the one error line says)
CASES = {
    "resolution": (
        ["task=sdxl_dreambooth", "data.resolution=100"],
        {},
        "config error: data.resolution=100: takes a whole number >= 64, a multiple of 8",
    ),
    "no trials": (
        ["-m", "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=0"],
        {},
        "config error: hydra.sweeper.n_trials=0: takes a whole number >= 1",
    ),
    "unwritable run dir": (
        ["hydra.run.dir=/proc/vlx/run"],
        {},
        "config error: hydra.run.dir=/proc/vlx/run: takes a folder that can be written",
    ),
    "project root": ([], {"PROJECT_ROOT": "/nonexistent/where"}, "config error: paths.root_dir=/nonexistent/where"),
    "home path": (
        ["mode=eval", "ckpt_path=~/no/such.ckpt"],
        {"HOME": "/tmp"},
        "config error: ckpt_path=/tmp/no/such.ckpt: takes",
    ),
}


@pytest.mark.slow
def test_bad_settings_are_one_line_each_all_at_once_before_anything_runs(workspace):
    result = workspace.run(list(BAD_SETTINGS), check=False, full_error=False)
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and len(errors) == len(BAD_SETTINGS), result.describe()
    for expected in BAD_SETTINGS.values():
        assert [line for line in errors if line.startswith(expected)], f"no line {expected!r} in {errors}"
    assert "Traceback" not in result.output and not result.created  # nothing was made


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_setting_is_one_line_before_anything_runs(case, workspace):
    args, env, expected = CASES[case]
    result = workspace.run(args, check=False, full_error=False, env=env)
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and errors == [errors[0]] and errors[0].startswith(expected), result.describe()
    assert "Traceback" not in result.output and not result.created  # nothing was made


@pytest.mark.slow
def test_settings_a_checkpoint_ignores_are_refused_not_recorded(workspace, tmp_path):
    checkpoint = shapes_classifier_checkpoint(tmp_path / "classifier.ckpt")
    typed = ["task=shapes_classifier", "mode=predict", f"ckpt_path={checkpoint}", "model.width=8", *SHAPE_DATA]
    result = workspace.run(typed, check=False, full_error=False)
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.output
    assert "model.width: not used in mode=predict with ckpt_path" in errors[0]
    assert not (result.run_dir / "config.yaml").exists()  # never recorded as used


@pytest.mark.slow
def test_a_diverging_run_fails_naming_the_step_and_the_learning_rate(workspace):
    typed = ["model.optimizer.lr=1e6", "trainer.max_epochs=2", *SHAPE_DATA]
    result = workspace.run(typed, check=False, full_error=False)
    errors = [line for line in result.output.splitlines() if "error" in line.lower() and "[INFO]" not in line]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.output, result.describe()
    assert "diverged" in errors[0] and "at global step" in errors[0] and "model.optimizer.lr" in errors[0]
    assert json.loads((result.run_dir / "status.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_fp16_on_a_cpu_runs_and_is_recorded_as_the_bf16_it_runs(workspace):
    """Accepted: CPUs have no fp16 autocast; Lightning would run bf16 while the log said 16-mixed. The run says so
    once and config.yaml records bf16-mixed."""
    result = workspace.run(["trainer.precision=16-mixed", *ONE_EPOCH, "trainer.limit_test_batches=1", *SHAPE_DATA])
    assert "CPUs have no fp16 mixed precision; running bf16-mixed" in result.output
    assert OmegaConf.load(result.run_dir / "config.yaml").trainer.precision == "bf16-mixed"


def test_ckpt_path_for_a_task_that_is_never_trained_names_the_setting_its_weights_come_from(tmp_path, data_dir):
    checkpoint = shapes_classifier_checkpoint(tmp_path / "classifier.ckpt")
    cfg = compose_config(["task=saliency", "mode=predict", f"ckpt_path={checkpoint}"], tmp_path / "run", data_dir)
    with pytest.raises(
        UserError,
        match=r"task=saliency has no checkpoints of its own \(SaliencyModule is not trained\): leave ckpt_path unset "
        r"and give the model it uses as model.classifier.checkpoint=PATH",
    ):
        load_model(cfg)
