"""Gatys et al. style transfer: losses by hand, VGG layers and weights, optimisation, bad input, run.py."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.style import StyleImagesDataModule
from framework.config import model_settings
from framework.errors import UserError
from lightning_modules.style.gatys import GatysStyleTransfer
from lightning_modules.style.images import rgb_to_yiq
from lightning_modules.style.losses import PerceptualLoss, content_loss, gram_matrix, style_loss, total_variation
from lightning_modules.style.vgg import VGGFeatures, layer_names
from tests.conftest import read_metrics, run_cli

SMALL_LAYERS = {"content_layers": ["relu2_1"], "style_layers": {"relu1_1": 1.0, "relu2_1": 0.5}}
RANDOM_VGG = {"arch": "vgg19", "pretrained": False, "pool": "max"}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01}
LBFGS = {"_target_": "torch.optim.LBFGS", "_partial_": True, "lr": 1.0, "max_iter": 1, "history_size": 50}


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth random colour pattern (width, height), as PNG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


def gatys(content=None, styles=None, optimizer=ADAM, **overrides) -> GatysStyleTransfer:
    torch.manual_seed(0)
    content = torch.rand(3, 24, 32) if content is None else content
    styles = [torch.rand(3, 32, 32)] if styles is None else styles
    values = {**SMALL_LAYERS, "vgg": RANDOM_VGG, "optimizer": optimizer, "output": "stylized.png", **overrides}
    return GatysStyleTransfer(content, styles, [1.0] * len(styles), **model_settings("gatys", **values))


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model: GatysStyleTransfer, steps: int, tmp_path: Path) -> list[float]:
    history = LossHistory()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history],
        default_root_dir=tmp_path,
    )
    data = StyleImagesDataModule("unused", "unused", iterations=steps)
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    return history.losses


def test_gram_matrix_by_hand():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])  # [1, C=2, 2, 2]
    # rows: channel 0 = (1, 2, 3, 4), channel 1 = (0, 1, 0, -1); divided by C*H*W = 8
    expected = torch.tensor([[[30.0, -2.0], [-2.0, 2.0]]]) / 8
    assert torch.allclose(gram_matrix(features), expected)


def test_content_style_and_tv_losses_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
    b = torch.zeros_like(a)
    assert content_loss({"x": a}, {"x": b}).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # gram(a) = 30 / 4 = 7.5; target 0.5: squared error 49, weighted 2
    assert style_loss({"x": a}, {"x": torch.tensor([[[0.5]]])}, {"x": 2.0}).item() == pytest.approx(98.0)
    # vertical differences (2, 2) -> mean 4; horizontal (1, 1) -> mean 1
    assert total_variation(a).item() == pytest.approx(5.0)


def test_style_loss_serves_a_batch_from_one_target():
    features = {"x": torch.rand(3, 4, 5, 5)}
    target = gram_matrix(features["x"][:1])
    per_image = [style_loss({"x": f[None]}, {"x": target}, {"x": 1.0}) for f in features["x"]]
    assert style_loss(features, {"x": target}, {"x": 1.0}).item() == pytest.approx(float(sum(per_image) / 3))


def test_perceptual_loss_and_its_gradient_equal_a_plain_computation():
    """Ours (in-place ReLUs where no conv output is asked for, channels_last, Grams of [H*W, C] views) against
    the loss written plainly: NCHW, every ReLU out of place, Grams of [C, H*W]."""
    content_layers, style_layers = ["conv2_2"], {"conv1_1": 1.0, "relu1_2": 0.5, "conv2_1": 2.0}
    features = VGGFeatures([*content_layers, *style_layers], pretrained=False)
    loss = PerceptualLoss(features, content_layers, style_layers, 2.0, 1e3, 0.5)
    torch.manual_seed(0)
    content, style = torch.rand(1, 3, 24, 32), torch.rand(1, 3, 32, 32)
    image = torch.rand(1, 3, 24, 32, requires_grad=True)
    loss.set_style([style], [1.0])
    ours = loss(image, loss.content_targets(content))["loss"]
    (ours_grad,) = torch.autograd.grad(ours, image)

    def plain(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x, out = (x - features.mean) / features.std, {}
        for name, layer in zip(features.names, features.body):
            x = torch.relu(x) if name.startswith("relu") else layer(x)
            out[name] = x
        return out

    def gram(f: torch.Tensor) -> torch.Tensor:
        flat = f.flatten(2)
        return flat @ flat.transpose(1, 2) / f[0].numel()

    mine, target, styled = plain(image), plain(content), plain(style)
    expected = (
        2.0 * F.mse_loss(mine["conv2_2"], target["conv2_2"])
        + 1e3 * sum(w * F.mse_loss(gram(mine[k]), gram(styled[k])) for k, w in style_layers.items())
        + 0.5 * total_variation(image)
    )
    (expected_grad,) = torch.autograd.grad(expected, image)
    assert torch.allclose(ours, expected, rtol=1e-4)
    assert torch.allclose(ours_grad, expected_grad, rtol=1e-3, atol=1e-6 * expected_grad.abs().max().item())


def test_bfloat16_vgg_keeps_the_loss_and_its_gradient():
    """model.vgg.dtype=bfloat16: the convolutions in bf16 autocast, the features handed over (and the Grams and
    losses summed) in float32; loss and gradient stay close to float32's. "auto" picks it per device."""
    layers = ["conv1_1", "relu2_1"]
    exact = VGGFeatures(layers, pretrained=False)
    bf16 = VGGFeatures(layers, pretrained=False, dtype="bfloat16")
    losses = [
        PerceptualLoss(vgg, ["relu2_1"], {"conv1_1": 1.0, "relu2_1": 1.0}, 1.0, 1e3, 0.0) for vgg in (exact, bf16)
    ]
    torch.manual_seed(0)
    content, style, image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    results = []
    for loss in losses:
        loss.set_style([style], [1.0])
        assert all(g.dtype == torch.float32 for g in loss.style_grams.values())
        x = image.clone().requires_grad_(True)
        value = loss(x, loss.content_targets(content))["loss"]
        results.append((value.detach(), torch.autograd.grad(value, x)[0]))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99
    assert not torch.equal(grad16, grad32)  # bf16 did run
    assert VGGFeatures(layers, pretrained=False, dtype="auto").bf16(torch.device("cpu")) == (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    with pytest.raises(UserError, match="model.vgg.dtype=half is not one of auto, bfloat16, float32"):
        VGGFeatures(layers, pretrained=False, dtype="half")


def test_vgg_names_cut_and_pre_activation_outputs():
    assert layer_names("vgg19")[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert len(layer_names("vgg19")) == 37 and len(layer_names("vgg16")) == 31  # torchvision's `features`
    vgg = VGGFeatures(["conv2_1", "relu1_1"], pretrained=False)
    assert vgg.names[-1] == "conv2_1" and len(vgg.body) == 6  # nothing after the last layer asked for
    features = vgg(torch.rand(1, 3, 16, 16))
    assert set(features) == {"conv2_1", "relu1_1"} and (features["conv2_1"] < 0).any()  # before its ReLU
    assert (features["relu1_1"] >= 0).all()
    again = VGGFeatures(["conv2_1"], pretrained=False)  # random features are the same on every run
    assert torch.equal(again.body[5].weight, vgg.body[5].weight)


def test_vgg_weights_from_a_file_missing_weights_and_random_features(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    reference = VGGFeatures(["relu2_1"], pretrained=False)
    state = {f"features.{k}": v + 1.0 for k, v in reference.body.state_dict().items()}
    state |= {"features.28.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(1)}  # cut: not loaded
    torch.save(state, tmp_path / "vgg19.pth")
    loaded = VGGFeatures(["relu2_1"], pretrained=str(tmp_path / "vgg19.pth"))
    assert loaded.weights.startswith("imagenet") and torch.equal(loaded.body[0].weight, reference.body[0].weight + 1)

    with pytest.raises(UserError, match="local torch cache.*allow_random_features=true"):
        VGGFeatures(["relu2_1"], pretrained=True)
    with pytest.raises(UserError, match="does not exist.*model.vgg.pretrained"):
        VGGFeatures(["relu2_1"], pretrained=str(tmp_path / "missing.pth"))
    with caplog.at_level(logging.WARNING):
        fallback = VGGFeatures(["relu2_1"], pretrained=True, allow_random_features=True)
    assert fallback.weights == "random" and "RANDOM vgg19 features" in caplog.text


@pytest.mark.parametrize(
    ("optimizer", "dtype"),
    [(LBFGS, "float32"), (ADAM, "float32"), (LBFGS, "bfloat16")],
    ids=["lbfgs", "adam", "lbfgs-bf16"],
)
def test_total_loss_falls(optimizer, dtype, tmp_path):
    vgg = {**RANDOM_VGG, "dtype": dtype}
    model = gatys(optimizer=optimizer, vgg=vgg, init="noise", output=str(tmp_path / "out.png"))
    losses = fit(model, 25, tmp_path)
    assert len(losses) == 25 and losses[-1] < 0.5 * losses[0], losses


def test_luminance_transfer_keeps_content_colours_and_coarse_to_fine_ends_full_size(tmp_path):
    content = torch.rand(1, 3, 1, 1).expand(1, 3, 24, 32).clone()[0] * 0.5 + 0.25  # one colour, inside the gamut
    model = gatys(content=content, preserve_color=True, scales=[0.5, 1.0], output=str(tmp_path / "out.png"))
    assert model.image.shape == (1, 1, 12, 16)  # luminance only, at the coarse scale
    losses = fit(model, 12, tmp_path)
    assert model.image.shape == (1, 1, 24, 32) and all(np.isfinite(losses))
    result = model.result()
    assert result.shape == (3, 24, 32)
    inside = (result > 0.01).all(0) & (result < 0.99).all(0)  # where no channel was clamped
    chroma = rgb_to_yiq(result[None])[0, 1:, inside]
    expected = rgb_to_yiq(content[None])[0, 1:, inside]
    assert inside.any() and torch.allclose(chroma, expected, atol=1e-4)


def test_style_targets_are_computed_once_per_scale(tmp_path, monkeypatch):
    model = gatys(scales=[0.5, 1.0], output=str(tmp_path / "out.png"))
    calls = []
    original = model.loss.set_style
    monkeypatch.setattr(model.loss, "set_style", lambda *a: calls.append(1) or original(*a))
    fit(model, 6, tmp_path)
    assert len(calls) == 2


def test_output_is_in_range_and_written_atomically(tmp_path, monkeypatch):
    model = gatys(output=str(tmp_path / "out" / "stylized.png"))
    fit(model, 3, tmp_path)
    written = np.asarray(Image.open(tmp_path / "out" / "stylized.png"))
    assert written.shape == (24, 32, 3) and written.dtype == np.uint8
    model.image.data += 5.0  # far out of range: the result is still an image
    assert model.result().min() >= 0 and model.result().max() <= 1

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        model.on_fit_end()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stylized.png"]  # old file kept, no leftovers
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "stylized.png")), written)


def test_bad_input_is_one_clear_error_each(tmp_path, caplog):
    content = write_image(tmp_path / "content.png", (40, 30), 0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"data.content: image .*missing.png does not exist"):
        StyleImagesDataModule(str(tmp_path / "missing.png"), str(content)).model_inputs()
    with pytest.raises(UserError, match=r"data.style\[0\]: cannot read image .*broken.jpg"):
        StyleImagesDataModule(str(content), str(broken)).model_inputs()
    with pytest.raises(UserError, match=r"data.style_weights\[1\]=0 must be positive"):
        StyleImagesDataModule(str(content), [str(content), str(content)], style_weights=[1, 0])
    with pytest.raises(UserError, match="unknown vgg19 layer.*relu9_9; valid names: conv1_1, relu1_1"):
        gatys(style_layers={"relu9_9": 1.0})
    with pytest.raises(UserError, match="model.content_layers: unknown"):
        gatys(content_layers=["conv4_5"])
    with pytest.raises(UserError, match=r"model.style_layers.relu1_1=0.*model.style_weight=-1"):
        gatys(style_layers={"relu1_1": 0.0}, style_weight=-1)
    with pytest.raises(UserError, match="model.init=zeros"):
        gatys(init="zeros")
    with pytest.raises(UserError, match=r"16x12 px at model.scales\[0\]=0.5: layer relu5_1 needs at least 16 px"):
        gatys(style_layers={"relu5_1": 1.0}, scales=[0.5, 1.0])

    big_style = write_image(tmp_path / "big_style.png", (200, 160), 1)  # 5x the content
    with caplog.at_level(logging.WARNING):
        inputs = StyleImagesDataModule(str(content), str(big_style), image_size=None).model_inputs()
    assert "big_style.png is 200x160, the content 40x30: resizing the style to a longer side of 40 px" in caplog.text
    assert inputs["content"].shape == (3, 30, 40) and inputs["styles"][0].shape == (3, 32, 40)


def test_run_py_style_transfer_offline_demo(tmp_path, data_dir):
    """The default task (scikit-image sample photographs, random VGG features here) on a tiny size, with Adam
    swapped in as the README says."""
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "task=style_transfer",
            "data.image_size=48",
            "data.iterations=4",
            "model.image_every_n_steps=2",
            "model.scales=[0.5,1.0]",
            "model.tv_weight=1.0",
            "~model.optimizer",
            "+model.optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 0.02}",
        ],
        run_dir,
        data_dir,
    )
    assert (
        "RANDOM vgg19 features" in result.stdout + result.stderr
        or "ImageNet weights from" in result.stdout + result.stderr
    )
    assert Image.open(run_dir / "stylized.png").size == (48, 32)  # chelsea is 451x300
    assert {"train/loss", "train/content", "train/style", "train/tv"} <= set(read_metrics(run_dir))
    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    assert {"train/image", "result"} <= set(board.Tags()["images"]) and "train/loss" in board.Tags()["scalars"]
    assert not list(run_dir.glob("checkpoints/*"))
