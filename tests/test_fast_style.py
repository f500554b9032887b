"""Johnson et al. fast style: the network, training on generated images, checkpoints, TorchScript export, run.py."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.style import ContentFolderDataModule, SameSizeBatches
from framework.config import model_settings
from framework.errors import UserError
from lightning_modules.style.fast_style import FastStyle
from lightning_modules.style.nets import TransformerNet
from tests.conftest import read_metrics, run_cli
from tests.test_style_transfer import write_image

TINY = {
    "net": {"width": 8, "residual_blocks": 2},
    "vgg": {"arch": "vgg16", "pretrained": False},
    "content_layers": ["relu2_2"],
    "style_layers": {"relu1_2": 1.0, "relu2_2": 1.0},
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01},
}
TINY_CLI = [
    "model.net.width=8",
    "model.net.residual_blocks=2",
    "model.content_layers=[relu2_2]",
    "model.style_layers={relu1_2: 1.0, relu2_2: 1.0}",
    "data.image_size=32",
    "data.batch_size=2",
    "data.num_workers=0",
]


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


def test_fast_style_learns_on_generated_images(folders, tmp_path):
    torch.manual_seed(0)
    data = ContentFolderDataModule(
        str(folders / "content"), str(folders / "style.png"), image_size=32, batch_size=2, num_workers=0
    )
    model = FastStyle(**model_settings("fast_style", **TINY), style=data.model_inputs()["style"])
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert len(losses) == 24
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith("net.") for key in state)  # no VGG in checkpoints
    restored = FastStyle.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)  # needs no style, no VGG
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


def test_same_size_batches_and_predict_errors(folders):
    assert list(SameSizeBatches([(4, 3), (5, 5), (4, 3), (4, 3)], 2)) == [[0, 2], [3], [1]]
    data = ContentFolderDataModule("unused", "unused")
    with pytest.raises(UserError, match="mode=predict needs data.images"):
        data.setup("predict")
    with pytest.raises(UserError, match="data.style: image .*nothing.png does not exist"):
        ContentFolderDataModule("unused", str(folders / "nothing.png")).model_inputs()
    (folders / "empty").mkdir(exist_ok=True)
    with pytest.raises(UserError, match=r"no images .* in .*empty \(data.folder\)"):
        ContentFolderDataModule(str(folders / "empty"), "unused").setup("fit")
    with pytest.raises(UserError, match="data.batch_size=0 must be positive"):
        ContentFolderDataModule("unused", "unused", batch_size=0)


def test_run_py_trains_exports_and_stylises_a_folder(folders, tmp_path, data_dir):
    train_dir, predict_dir = tmp_path / "train", tmp_path / "predict"
    run_cli(
        [
            "task=fast_style",
            *TINY_CLI,
            f"data.folder={folders / 'content'}",
            f"data.style={folders / 'style.png'}",
            "trainer.max_epochs=1",
        ],
        train_dir,
        data_dir,
    )
    assert "train/loss" in read_metrics(train_dir) and (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert (train_dir / "export" / "fast_style.pt").is_file()
    run_cli(
        [
            "task=fast_style",
            "mode=predict",
            f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
            f"data.images={folders / 'photos'}",
            "data.max_size=36",
            "data.predict_batch_size=2",
            "data.num_workers=0",
        ],
        predict_dir,
        data_dir,
    )
    rows = json.loads((predict_dir / "predictions.json").read_text())
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    sizes = [Image.open(r["stylized"]).size for r in rows]
    assert sizes == [(36, 29), (36, 28), (36, 29), (36, 29)]  # longer side scaled down to data.max_size
    assert read_metrics(predict_dir) == {"predict/images": 4.0}
