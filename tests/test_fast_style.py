"""Johnson et al. fast style: the network, training on generated images, checkpoints, TorchScript export, the images
checked before work (too small, unreadable, turned by EXIF), run.py."""

from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from datamodules.style import SMALLEST_SIDE, SameSizeBatches
from framework.config import model_settings
from framework.errors import UserError
from lightning_modules.style.fast_style import FastStyle
from lightning_modules.style.nets import TransformerNet
from tests.helpers.cli import one_error_line
from tests.helpers.config import read_metrics
from tests.helpers.images import write_image
from tests.helpers.style import config_problems, task_data
from tests.helpers.tasks import FAST_STYLE
from tests.helpers.trainer import quiet_trainer

TINY = {
    "net": {"width": 8, "residual_blocks": 2},
    "vgg": {"arch": "vgg16", "pretrained": False, "pool": "max", "dtype": "float32"},
    "content_layers": ["relu2_2"],
    "style_layers": {"relu1_2": 1.0, "relu2_2": 1.0},
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01},
}


def content_folder(folder, style, **values):
    """task=fast_style's data module (conf/data/content_folder.yaml), loading in this process."""
    return task_data("fast_style", folder=str(folder), style=str(style), num_workers=0, **values)


def stylise(images, tmp_path, **values) -> list[dict]:
    """mode=predict in this process: an untrained tiny network stylises the folder `images` into tmp_path/stylized."""
    data = task_data("fast_style", images=str(images), num_workers=0, **values)
    model = FastStyle(**model_settings("fast_style", **TINY))  # as loaded from a checkpoint: no style, no VGG
    trainer = quiet_trainer(default_root_dir=tmp_path)
    return [row for batch in trainer.predict(model, datamodule=data) for row in batch]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_style")
    (root / "content" / "sub").mkdir(parents=True)
    for i in range(6):
        write_image(root / "content" / ("sub" if i % 2 else "") / f"c{i}.png", (48, 40), seed=i)
    (root / "photos").mkdir()
    for i, size in enumerate([(40, 32), (36, 28), (40, 32), (40, 32)]):  # two sizes: batched by size
        write_image(root / "photos" / f"p{i}.jpg", size, seed=10 + i)
    write_image(root / "style.png", (64, 64), seed=99)
    return root


def test_transformer_net_keeps_any_size_and_range():
    net = TransformerNet(width=8, residual_blocks=1)
    for height, width in [(32, 32), (30, 42)]:
        out = net(torch.rand(2, 3, height, width))
        assert out.shape == (2, 3, height, width) and out.min() >= 0 and out.max() <= 1


@pytest.mark.slow  # trains 16 steps
def test_fast_style_learns_on_generated_images(folders, tmp_path):
    torch.manual_seed(0)
    data = content_folder(folders / "content", folders / "style.png", image_size=32, batch_size=2)
    model = FastStyle(**model_settings("fast_style", **TINY), **data.model_inputs(FastStyle.data_inputs))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = quiet_trainer(max_epochs=8, callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert len(losses) == 16  # 5 of the 6 images (the last held out), 2 batches of 2 an epoch
    assert {"val/content_loss", "val/style_loss", "val/ssim"} <= set(trainer.callback_metrics)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith("net.") for key in state)  # no VGG in checkpoints
    # needs no style, no crop size (framework.config.SIGNATURE_DEFAULTS), no VGG
    restored = FastStyle.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert restored.loss is None
    images = torch.rand(2, 3, 28, 36)
    assert torch.allclose(restored(images), model.eval()(images))

    restored.export(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["fast_style.pt", "model.json"]  # no onnx here
    scripted = torch.jit.load(str(tmp_path / "export" / "fast_style.pt"))
    for shape in [(2, 3, 28, 36), (1, 3, 45, 30)]:  # any size, not only the traced one
        images = torch.rand(shape)
        assert torch.allclose(scripted(images), restored(images), atol=1e-5)
    assert json.loads((tmp_path / "export" / "model.json").read_text())["net"] == TINY["net"]


def test_preserve_color_gives_the_stylised_images_the_contents_colours(folders, tmp_path):
    """mode=predict with model.preserve_color: luminance keeps each content's chrominance (YCbCr's Cb and Cr),
    histogram its colours' mean; without it the colours are the network's."""
    data = task_data("fast_style", images=str(folders / "photos"), num_workers=0)
    to_cbcr = torch.tensor([[-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
    chroma, means = {}, {}
    for mode in (None, "luminance", "histogram"):
        torch.manual_seed(0)  # one network for the three
        model = FastStyle(**model_settings("fast_style", **TINY, preserve_color=mode))
        trainer = quiet_trainer(default_root_dir=tmp_path / str(mode))
        rows = [row for batch in trainer.predict(model, datamodule=data) for row in batch]
        pairs = [(to_tensor(Image.open(r["stylized"])), to_tensor(Image.open(r["image"]).convert("RGB"))) for r in rows]
        chroma[mode] = max(torch.einsum("ij,jhw->ihw", to_cbcr, out - content).abs().mean() for out, content in pairs)
        means[mode] = max((out.mean((1, 2)) - content.mean((1, 2))).abs().max() for out, content in pairs)
    assert chroma["luminance"] < 0.01 < chroma[None], chroma
    assert means["histogram"] < 0.02 < means[None], means


def test_same_size_batches_and_predict_errors(folders):
    assert list(SameSizeBatches([(4, 3), (5, 5), (4, 3), (4, 3)], 2)) == [[0, 2], [3], [1]]
    data = task_data("fast_style")
    with pytest.raises(UserError, match="mode=predict needs data.images"):
        data.setup("predict")
    with pytest.raises(UserError, match="data.style: image .*nothing.png does not exist"):
        task_data("fast_style", style=str(folders / "nothing.png")).model_inputs(FastStyle.data_inputs)
    (folders / "empty").mkdir(exist_ok=True)
    with pytest.raises(UserError, match=r"no images .* in .*empty \(data.folder\)"):
        task_data("fast_style", folder=str(folders / "empty")).setup("fit")
    assert config_problems("fast_style", "data.batch_size=0", "data.max_size=4", "model.net.width=0") == [
        "data.batch_size=0: takes a whole number >= 1",
        f"data.max_size=4: takes a whole number >= {SMALLEST_SIDE} (or null)",
        "model.net.width=0: takes a whole number >= 1",
    ]


def test_the_smallest_image_the_network_takes():
    """5 px a side: the first 9x9 convolution pads 4 px by reflection. The data module checks the images to stylise
    against its own copy of the figure (a data module imports no model): the two agree."""
    net = TransformerNet(width=4, residual_blocks=1).eval()
    assert TransformerNet.min_size == SMALLEST_SIDE == 5
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 40)).shape == (1, 3, 5, 40)
        with pytest.raises(RuntimeError, match="[Pp]adding size"):
            net(torch.rand(1, 3, 4, 40))


def test_a_1x1_png_is_one_error_before_any_image_is_stylised(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        write_image(photos / f"p{i}.png", (40, 32), seed=i)
    tiny = photos / "p3_tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    with pytest.raises(UserError, match=rf"data.images: image {tiny} is 1x1 px: .*at least 5 px a side") as error:
        stylise(photos, tmp_path / "run")
    assert "\n" not in str(error.value) and "skip_bad_images=true" in str(error.value)
    assert not (tmp_path / "run" / "stylized").exists()  # checked before the first image was stylised

    with caplog.at_level(logging.WARNING):
        rows = stylise(photos, tmp_path / "skipped", skip_bad_images=True)
    assert [row["image"].rsplit("/", 1)[1] for row in rows] == [f"p{i}.png" for i in range(6)]
    assert f"data.images: skipped 1 images too small to stylise (data.skip_bad_images=true): {tiny}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "skipped" / "stylized").iterdir()) == [f"p{i}.png" for i in range(6)]

    thin = tmp_path / "thin"  # too small only once scaled down to data.max_size
    thin.mkdir()
    write_image(thin / "wide.png", (200, 20), seed=1)
    with pytest.raises(UserError, match=r"wide.png is 200x20 px, 40x4 px at data.max_size=40"):
        stylise(thin, tmp_path / "thin_run", max_size=40)
    assert stylise(thin, tmp_path / "thin_ok", max_size=50)  # 50x10

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    Image.new("RGB", (3, 3)).save(nothing / "a.png")
    (nothing / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 2 images in .*nothing can be stylised \(1 unreadable images, 1 "):
        stylise(nothing, tmp_path / "nothing_run", skip_bad_images=True)


def test_an_exif_rotated_photo_is_stylised_upright_and_batched_by_its_upright_size(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x24, shown turned 90 degrees: 24x40
    write_image(photos / "a_plain.png", (40, 24), seed=1)
    Image.open(write_image(tmp_path / "stored.png", (40, 24), seed=2)).save(
        photos / "b_turned.jpg", exif=exif.tobytes()
    )
    write_image(photos / "c_upright.png", (24, 40), seed=3)
    data = task_data("fast_style", images=str(photos), num_workers=0)
    data.setup("predict")
    assert data.predict_sizes == [(40, 24), (24, 40), (24, 40)]  # the header's size, upright
    assert list(data.predict_dataloader().batch_sampler) == [[0], [1, 2]]  # the turned photo with the upright one
    rows = stylise(photos, tmp_path)
    assert [Image.open(row["stylized"]).size for row in rows] == [(40, 24), (24, 40), (24, 40)]


def test_two_images_with_one_result_name_are_an_error(tmp_path):
    write_image(tmp_path / "a.jpg", (16, 16), seed=1)
    write_image(tmp_path / "a.png", (16, 16), seed=2)
    with pytest.raises(UserError, match=r"a.jpg and .*a.png would both be stylised to stylized/a.png"):
        stylise(tmp_path, tmp_path / "run")


def test_the_style_image_and_the_crops_are_checked_before_training(folders, tmp_path):
    gray = tmp_path / "gray.png"
    Image.open(folders / "style.png").convert("L").save(gray)
    with pytest.raises(UserError, match=rf"data.style: style image {gray} is grayscale \(mode L\).*cannot be skipped"):
        content_folder(folders / "content", gray, image_size=32).model_inputs(FastStyle.data_inputs)
    inputs = content_folder(folders / "content", folders / "style.png", image_size=32).model_inputs(
        FastStyle.data_inputs
    )
    assert inputs["style"].shape == (3, 32, 32) and inputs["crop_size"] == 32
    assert FastStyle(**model_settings("fast_style", **TINY), **inputs).loss is not None

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(
        UserError, match=rf"data.style: style image {tiny} is 1x1 px: .*16 px a side.*cannot be skipped"
    ):
        content_folder(folders / "content", tiny, skip_bad_images=True).model_inputs(FastStyle.data_inputs)
    thin = write_image(tmp_path / "thin.png", (400, 16), seed=5)  # 32x1 px as resized
    with pytest.raises(
        UserError, match=r"data.style: the style image is 32x1 px as resized .*relu2_2 needs at least 2"
    ):
        FastStyle(
            **model_settings("fast_style", **TINY),
            **content_folder(folders / "content", thin, image_size=32).model_inputs(FastStyle.data_inputs),
        )
    small = content_folder(folders / "content", folders / "style.png", image_size=4, style_size=32)
    with pytest.raises(UserError, match=r"data.image_size=4: the training crops must be at least 5 px"):
        FastStyle(**model_settings("fast_style", **TINY), **small.model_inputs(FastStyle.data_inputs))


@pytest.mark.slow
def test_run_py_trains_exports_and_stylises_a_folder(folders, workspace):
    train_dir = workspace.run(
        [
            "task=fast_style",
            *FAST_STYLE,
            f"data.folder={folders / 'content'}",
            f"data.style={folders / 'style.png'}",
            "trainer.max_epochs=1",
        ]
    ).run_dir
    assert "train/loss" in read_metrics(train_dir) and (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert (train_dir / "export" / "fast_style.pt").is_file()
    predict_dir = workspace.run(
        [
            "task=fast_style",
            "mode=predict",
            f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
            f"data.images={folders / 'photos'}",
            "data.max_size=36",
            "data.predict_batch_size=2",
            "data.num_workers=0",
        ]
    ).run_dir
    rows = json.loads((predict_dir / "predictions.json").read_text())
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    sizes = [Image.open(r["stylized"]).size for r in rows]
    assert sizes == [(36, 29), (36, 28), (36, 29), (36, 29)]  # longer side scaled down to data.max_size
    assert read_metrics(predict_dir) == {"predict/images": 4.0}

    Image.new("RGB", (1, 1)).save(folders / "photos" / "p2_tiny.png")  # the network cannot take it
    try:
        result = workspace.run(
            [
                "task=fast_style",
                "mode=predict",
                f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
                f"data.images={folders / 'photos'}",
                "data.num_workers=0",
            ],
            check=False,
            full_error=False,
        )
    finally:
        (folders / "photos" / "p2_tiny.png").unlink()
    assert f"data.images: image {folders / 'photos' / 'p2_tiny.png'} is 1x1 px" in one_error_line(result)
    assert not (result.run_dir / "stylized").exists() and not (result.run_dir / "predictions.json").exists()
