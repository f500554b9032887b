"""Gatys et al. style transfer: losses by hand, VGG layers and weights, optimisation, bad input (the config's checks,
the images' sizes), run.py."""

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

from framework.config import model_settings
from framework.errors import UserError
from lightning_modules.style.gatys import GatysStyleTransfer
from lightning_modules.style.images import rgb_to_yiq
from lightning_modules.style.losses import (
    PerceptualLoss,
    content_loss,
    gram_matrix,
    masked_gram,
    style_loss,
    total_variation,
)
from lightning_modules.style.vgg import layer_names
from tests.helpers.config import read_metrics
from tests.helpers.images import write_image
from tests.helpers.style import RANDOM_VGG, config_problems, task_data, vgg_features
from tests.helpers.trainer import quiet_trainer

SMALL_LAYERS = {"content_layers": ["relu2_1"], "style_layers": {"relu1_1": 1.0, "relu2_1": 0.5}}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01}
LBFGS = {"_target_": "torch.optim.LBFGS", "_partial_": True, "lr": 1.0, "max_iter": 1, "history_size": 50}


def gatys(content=None, styles=None, optimizer=ADAM, regions=None, **overrides) -> GatysStyleTransfer:
    torch.manual_seed(0)
    content = torch.rand(3, 24, 32) if content is None else content
    styles = [torch.rand(3, 32, 32)] if styles is None else styles
    values = {**SMALL_LAYERS, "vgg": RANDOM_VGG, "optimizer": optimizer, "output": "stylized.png", **overrides}
    names = [f"data.style[{i}] (style{i}.png)" for i in range(len(styles))]
    settings = model_settings("gatys", **values)
    return GatysStyleTransfer(content, styles, [1.0] * len(styles), names, regions, **settings)


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model: GatysStyleTransfer, steps: int, tmp_path: Path) -> list[float]:
    history = LossHistory()
    trainer = quiet_trainer(max_epochs=1, callbacks=[history], default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=task_data("style_transfer", iterations=steps).train_dataloader())
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
    features = vgg_features([*content_layers, *style_layers])
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
    exact = vgg_features(layers)
    bf16 = vgg_features(layers, dtype="bfloat16")
    losses = [
        PerceptualLoss(vgg, ["relu2_1"], {"conv1_1": 1.0, "relu2_1": 1.0}, 1.0, 1e3, 0.0) for vgg in (exact, bf16)
    ]
    torch.manual_seed(0)
    content, style, image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    results = []
    for loss in losses:
        loss.set_style([style], [1.0])
        assert all(g.dtype == torch.float32 for _, grams in loss.targets for g in grams.values())
        x = image.clone().requires_grad_(True)
        value = loss(x, loss.content_targets(content))["loss"]
        results.append((value.detach(), torch.autograd.grad(value, x)[0]))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99
    assert not torch.equal(grad16, grad32)  # bf16 did run
    assert vgg_features(layers, dtype="auto").bf16(torch.device("cpu")) == (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    assert "model.vgg.dtype=half: takes one of auto, bfloat16, float32" in config_problems(
        "style_transfer", "model.vgg.dtype=half"
    )


def test_vgg_names_cut_and_pre_activation_outputs():
    assert layer_names("vgg19")[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert len(layer_names("vgg19")) == 37 and len(layer_names("vgg16")) == 31  # torchvision's `features`
    vgg = vgg_features(["conv2_1", "relu1_1"])
    assert vgg.names[-1] == "conv2_1" and len(vgg.body) == 6  # nothing after the last layer asked for
    features = vgg(torch.rand(1, 3, 16, 16))
    assert set(features) == {"conv2_1", "relu1_1"} and (features["conv2_1"] < 0).any()  # before its ReLU
    assert (features["relu1_1"] >= 0).all()
    again = vgg_features(["conv2_1"])  # random features are the same on every run
    assert torch.equal(again.body[5].weight, vgg.body[5].weight)


def test_vgg_weights_from_a_file_missing_weights_and_random_features(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    reference = vgg_features(["relu2_1"])
    state = {f"features.{k}": v + 1.0 for k, v in reference.body.state_dict().items()}
    state |= {"features.28.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(1)}  # cut: not loaded
    torch.save(state, tmp_path / "vgg19.pth")
    loaded = vgg_features(["relu2_1"], pretrained=str(tmp_path / "vgg19.pth"))
    assert loaded.weights.startswith("imagenet") and torch.equal(loaded.body[0].weight, reference.body[0].weight + 1)

    with pytest.raises(UserError, match="local torch cache.*allow_random_features=true"):
        vgg_features(["relu2_1"], pretrained=True)
    with pytest.raises(UserError, match="does not exist.*model.vgg.pretrained"):
        vgg_features(["relu2_1"], pretrained=str(tmp_path / "missing.pth"))
    with caplog.at_level(logging.WARNING):
        fallback = vgg_features(["relu2_1"], pretrained=True, allow_random_features=True)
    assert fallback.weights == "random" and "RANDOM vgg19 features" in caplog.text


@pytest.mark.slow  # 25 optimisation steps, three times
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
    model = gatys(content=content, preserve_color="luminance", scales=[0.5, 1.0], output=str(tmp_path / "out.png"))
    assert model.image.shape == (1, 1, 12, 16)  # luminance only, at the coarse scale
    losses = fit(model, 12, tmp_path)
    assert model.image.shape == (1, 1, 24, 32) and all(np.isfinite(losses))
    result = model.result()
    assert result.shape == (3, 24, 32)
    inside = (result > 0.01).all(0) & (result < 0.99).all(0)  # where no channel was clamped
    chroma = rgb_to_yiq(result[None])[0, 1:, inside]
    expected = rgb_to_yiq(content[None])[0, 1:, inside]
    assert inside.any() and torch.allclose(chroma, expected, atol=1e-4)

    # one scale, a photo-like content: the style loss falls, the chroma (YCbCr's Cb and Cr too) stays the content's
    torch.manual_seed(1)
    content = torch.rand(3, 24, 32) * 0.5 + 0.25
    model = gatys(content=content, preserve_color="luminance", init="noise", output=str(tmp_path / "out.png"))
    losses = fit(model, 15, tmp_path)
    assert losses[-1] < 0.5 * losses[0], losses
    to_cbcr = torch.tensor([[-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
    difference = torch.einsum("ij,jhw->ihw", to_cbcr, model.result() - content).abs().mean()
    assert difference < 0.01, difference


def test_style_targets_are_computed_once_per_scale(tmp_path, monkeypatch):
    model = gatys(scales=[0.5, 1.0], output=str(tmp_path / "out.png"))
    calls = []
    original = model.loss.set_style
    monkeypatch.setattr(model.loss, "set_style", lambda *a: calls.append(1) or original(*a))
    fit(model, 6, tmp_path)
    assert len(calls) == 2


class ImageSizes(L.Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sizes.append(tuple(pl_module.image.shape[-2:]))


def test_scale_shares_split_the_steps_and_the_pyramid_ends_at_full_size(tmp_path):
    model = gatys(scales=[0.5, 1.0], scale_shares=[1, 3], optimizer=LBFGS, output=str(tmp_path / "out.png"))
    sizes = ImageSizes()
    quiet_trainer(max_epochs=1, callbacks=[sizes], default_root_dir=tmp_path).fit(
        model, train_dataloaders=task_data("style_transfer", iterations=8).train_dataloader()
    )
    assert sizes.sizes == [(12, 16)] * 2 + [(24, 32)] * 6
    assert tuple(model.result().shape) == (3, 24, 32)
    with pytest.raises(UserError, match=r"model.scale_shares=\[1.0\] needs one share per scale of model.scales"):
        gatys(scales=[0.5, 1.0], scale_shares=[1.0])


def test_gradients_that_push_past_the_box_are_zeroed():
    model = gatys()
    model.image.data = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5]).view(1, 1, 2, 3)
    model.image.grad = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0]).view(1, 1, 2, 3)
    model.on_after_backward()  # descent moves against the gradient: at 0 a positive one, at 1 a negative one push out
    assert model.image.grad.flatten().tolist() == [0.0, -1.0, 0.0, 1.0, 1.0, -1.0]


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
    with pytest.raises(UserError, match=r"cannot write .*stylized.png: disk full"):  # the OSError, naming the file
        model.on_fit_end()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stylized.png"]  # old file kept, no leftovers
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "stylized.png")), written)


def style_inputs(content, style, **values) -> dict:
    """What task=style_transfer's data module gives the model (conf/data/style_images.yaml, `values` replacing some)."""
    data = task_data("style_transfer", content=str(content), style=style, **values)
    return data.model_inputs(GatysStyleTransfer.data_inputs)


def test_bad_input_is_one_clear_error_each(tmp_path, caplog):
    content = write_image(tmp_path / "content.png", (40, 30), 0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"data.content: image .*missing.png does not exist"):
        style_inputs(tmp_path / "missing.png", str(content))
    with pytest.raises(UserError, match=r"data.style\[0\]: cannot read image .*broken.jpg"):
        style_inputs(content, str(broken))
    with pytest.raises(UserError, match=r"data.style_weights has 1 weights for 2 style images"):
        task_data("style_transfer", style=[str(content), str(content)], style_weights=[1.0])
    with pytest.raises(UserError, match="unknown vgg19 layer.*relu9_9; valid names: conv1_1, relu1_1"):
        gatys(style_layers={"relu9_9": 1.0})
    with pytest.raises(UserError, match="model.content_layers: unknown"):
        gatys(content_layers=["conv4_5"])
    with pytest.raises(UserError, match=r"model.scales=\[1.0, 0.5\] must be ascending"):
        gatys(scales=[1.0, 0.5])
    with pytest.raises(UserError, match=r"16x12 px at model.scales\[0\]=0.5: layer relu5_1 needs at least 16 px"):
        gatys(style_layers={"relu5_1": 1.0}, scales=[0.5, 1.0])

    big_style = write_image(tmp_path / "big_style.png", (200, 160), 1)  # 5x the content
    with caplog.at_level(logging.WARNING):
        inputs = style_inputs(content, str(big_style), image_size=None)
    assert "big_style.png is 200x160, the content 40x30: resizing the style to a longer side of 40 px" in caplog.text
    assert inputs["content"].shape == (3, 30, 40) and inputs["styles"][0].shape == (3, 32, 40)
    assert inputs["style_names"] == [f"data.style[0] ({big_style})"]


def test_the_config_check_names_each_bad_setting():
    """The checks the constructors made before are the config's (framework/schema.py), one line per key, before
    anything is built (`python run.py ... --cfg job` prints them too)."""
    problems = config_problems(
        "style_transfer",
        "data.style_weights=[1,0]",
        "model.style_layers={relu1_1: 0}",
        "model.style_weight=-1",
        "model.content_weight=-1",
        "model.init=zeros",
        "model.scales=[0.5,2.0]",
        "model.vgg.arch=vgg11",
        "model.vgg.pool=mean",
        "data.iterations=0",
        "data.style_scale=0",
        "data.style=[]",
        "model.preserve_color=true",
    )
    assert sorted(problems) == sorted(
        [
            "data.iterations=0: takes a whole number >= 1",
            "data.style=[]: takes text or a list of text values, at least one",
            "data.style_weights[1]=0: takes a number > 0",
            "data.style_scale=0: takes a number > 0",
            "model.content_weight=-1: takes a number >= 0",
            "model.init=zeros: takes one of content, noise",
            "model.preserve_color=true: takes one of luminance, histogram (or null)",
            "model.scales[1]=2.0: takes a number > 0 and <= 1",
            "model.style_layers.relu1_1=0: takes a number > 0",
            "model.style_weight=-1: takes a number > 0",
            "model.vgg.arch=vgg11: takes one of vgg16, vgg19",
            "model.vgg.pool=mean: takes one of max, avg",
        ]
    ), problems
    assert config_problems("style_transfer") == []


def test_style_images_grayscale_too_small_or_too_thin(tmp_path, caplog):
    """A grayscale style file (8 or 16 bit) and a style smaller than 16 px a side (a 1x1 PNG) are one error each,
    naming its key and file before training (left out of a blend with data.skip_bad_images=true); the same grey
    pixels saved as RGB are a style; a style too thin for the deepest layer at the first scale is the model's error,
    naming it too."""
    content = write_image(tmp_path / "content.png", (40, 30), 0)
    gray, gray_rgb = tmp_path / "gray.png", tmp_path / "gray_rgb.png"
    Image.open(write_image(tmp_path / "rgb.png", (40, 40), 1)).convert("L").save(gray)
    Image.open(gray).convert("RGB").save(gray_rgb)
    deep = tmp_path / "deep.png"  # 16-bit grayscale
    Image.fromarray((np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28).astype(np.uint16)).save(deep)
    for index, grey in enumerate([gray, deep]):
        styles = [str(gray_rgb), str(grey)][: index + 1] if index else [str(grey)]
        with pytest.raises(UserError, match=rf"data.style\[{index}\]: style image {grey} is grayscale \(mode"):
            style_inputs(content, styles)
    inputs = style_inputs(content, [str(gray_rgb)], image_size=32)
    assert [tuple(s.shape) for s in inputs["styles"]] == [(3, 32, 32)]
    model = gatys(inputs["content"], inputs["styles"], output=str(tmp_path / "out.png"))
    assert len(fit(model, 2, tmp_path)) == 2

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    with pytest.raises(UserError, match=rf"data.style\[1\]: style image {tiny} is 1x1 px: .* at least 16 px a side"):
        style_inputs(content, [str(gray_rgb), str(tiny)])
    with caplog.at_level(logging.WARNING):
        kept = style_inputs(
            content, [str(gray_rgb), str(tiny), str(deep)], style_weights=[1.0, 2.0, 3.0], skip_bad_images=True
        )
    assert kept["style_weights"] == [1.0] and kept["style_names"] == [f"data.style[0] ({gray_rgb})"]
    assert f"skipped 2 unreadable images (data.skip_bad_images=true): {tiny}, {deep}" in caplog.text

    thin = write_image(tmp_path / "thin.png", (200, 20), 2)  # 64x6 px at the content's size
    inputs = style_inputs(content, [str(gray_rgb), str(thin)], image_size=64)
    with pytest.raises(
        UserError,
        match=rf"data.style\[1\] \({thin}\): the style image is 64x6 px as resized .*layer relu5_1 needs at least 16",
    ):
        GatysStyleTransfer(**inputs, **model_settings("gatys", vgg=RANDOM_VGG, output=str(tmp_path / "out.png")))


def test_an_exif_rotated_content_photo_is_stylised_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x24 (landscape), shown turned 90 degrees: 24x40 (portrait)
    photo = tmp_path / "photo.jpg"
    Image.open(write_image(tmp_path / "stored.png", (40, 24), 3)).save(photo, exif=exif.tobytes())
    inputs = style_inputs(photo, str(write_image(tmp_path / "style.png", (40, 40), 4)), image_size=None)
    assert inputs["content"].shape == (3, 40, 24)
    model = gatys(inputs["content"], inputs["styles"], output=str(tmp_path / "out.png"))
    fit(model, 2, tmp_path)
    assert Image.open(tmp_path / "out.png").size == (24, 40)


@pytest.mark.slow
def test_run_py_checks_the_config_before_printing_it(workspace):
    result = workspace.run(
        ["task=style_transfer", "model.init=foo", "data.iterations=0", "--cfg", "job"], check=False, full_error=False
    )
    errors = [line for line in result.output.splitlines() if line.startswith("config error:")]
    assert result.returncode == 1 and sorted(errors) == [
        "config error: data.iterations=0: takes a whole number >= 1",
        "config error: model.init=foo: takes one of content, noise",
    ], result.output[-3000:]
    assert "_target_" not in result.stdout  # nothing printed


@pytest.mark.slow
def test_run_py_style_transfer_offline_demo(workspace):
    """The default task (scikit-image sample photographs, random VGG features here) on a tiny size, with Adam
    swapped in as the README says."""
    result = workspace.run(
        [
            "task=style_transfer",
            "data.image_size=48",
            "data.iterations=4",
            "model.image_every_n_steps=2",
            "model.scales=[0.5,1.0]",
            "model.tv_weight=1.0",
            "~model.optimizer",
            "+model.optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 0.02}",
        ]
    )
    run_dir = result.run_dir
    assert (
        "RANDOM vgg19 features" in result.stdout + result.stderr
        or "ImageNet weights from" in result.stdout + result.stderr
    )
    assert Image.open(run_dir / "stylized.png").size == (48, 32)  # chelsea is 451x300
    scores = {"val/content_loss", "val/style_loss", "val/ssim"}  # of the result, in metrics.json and TensorBoard
    assert {"train/loss", "train/content", "train/style", "train/tv", *scores} <= set(read_metrics(run_dir))
    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    assert {"train/image", "result"} <= set(board.Tags()["images"]) and {"train/loss", *scores} <= set(
        board.Tags()["scalars"]
    )
    assert not list(run_dir.glob("checkpoints/*"))


def test_masked_gram_by_hand():
    """A region of ones is the plain Gram matrix; a half region the Gram matrix of that half's features (at any
    resolution of the region: it is averaged down to the features')."""
    torch.manual_seed(0)
    features = torch.rand(1, 3, 4, 4)
    assert torch.allclose(masked_gram(features, torch.ones(1, 1, 4, 4)), gram_matrix(features))
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1
    assert torch.allclose(masked_gram(features, left), gram_matrix(features[..., :2]), atol=1e-6)


def test_masks_place_each_style_in_its_region(tmp_path):
    """data.masks: the content's mask (same name, same size) resized with it; one style fills the white part, two
    styles white and black; the style loss sees only each style's region."""
    content = write_image(tmp_path / "content.png", (40, 30), 0)
    styles = [str(write_image(tmp_path / f"style{i}.png", (40, 40), 1 + i)) for i in range(3)]
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.tile(np.uint8([0, 255]).repeat(20), (30, 1))).save(masks / "content.png")
    one = style_inputs(content, styles[0], image_size=20, masks=str(masks))
    assert len(one["regions"]) == 1 and one["regions"][0].shape == (1, 15, 20)
    assert one["regions"][0][..., :8].max() < 0.05 and one["regions"][0][..., 12:].min() > 0.95
    two = style_inputs(content, styles[:2], image_size=20, masks=str(masks))
    assert torch.allclose(two["regions"][1], 1 - two["regions"][0])

    model = gatys(two["content"], two["styles"], regions=two["regions"], output=str(tmp_path / "out.png"))
    model.loss.set_style([s[None] for s in two["styles"]], [1.0, 1.0], [r[None] for r in two["regions"]])
    features = model.loss.features(two["content"][None], frozenset(model.loss.style_layers))
    expected = sum(style_loss(features, grams, model.loss.style_layers, region) for region, grams in model.loss.targets)
    assert [region.shape for region, _ in model.loss.targets] == [(1, 1, 15, 20)] * 2
    assert torch.allclose(model.loss.style_term(features), expected)
    losses = fit(model, 12, tmp_path)
    assert losses[-1] < 0.5 * losses[0], losses

    with pytest.raises(UserError, match="data.style_weights: with data.masks each style fills its own region"):
        task_data("style_transfer", style=styles[:2], style_weights=[1.0, 2.0], masks=str(masks))
    with pytest.raises(UserError, match=r"a mask places one style .* data.style has 3"):
        style_inputs(content, styles, masks=str(masks))
    Image.new("L", (30, 30)).save(masks / "content.png")
    with pytest.raises(UserError, match=r"data.masks: mask .*content.png is 30x30 px, its image content.png 40x30 px"):
        style_inputs(content, styles[0], masks=str(masks))
    (masks / "content.png").unlink()
    with pytest.raises(UserError, match=r"data.masks: no mask for image content.png"):
        style_inputs(content, styles[0], masks=str(masks))


def test_histogram_colours_and_the_scores_of_the_result(tmp_path):
    """preserve_color=histogram: each style's colours matched to the content's (mean and covariance) before the
    transfer; validation scores the result (content loss at relu4_2, style loss, SSIM to the content)."""
    torch.manual_seed(0)
    content = torch.rand(3, 24, 32) * 0.5 + 0.25
    style = torch.rand(3, 32, 32) * torch.tensor([1.0, 0.3, 0.1]).view(3, 1, 1)
    model = gatys(content, [style], preserve_color="histogram", output=str(tmp_path / "out.png"))
    (matched,) = model.style_inputs(1.0)
    assert torch.allclose(matched.mean((2, 3)), content[None].mean((2, 3)), atol=2e-2)
    history = LossHistory()
    trainer = quiet_trainer(max_epochs=1, callbacks=[history], default_root_dir=tmp_path)
    data = task_data("style_transfer", iterations=5)
    trainer.fit(model, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    scores = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    result = model.result()[None]
    features = model.loss.features(result, frozenset({"relu4_2", *model.loss.style_layers}))
    reference = model.loss.features(content[None], frozenset({"relu4_2"}))["relu4_2"]
    assert scores["val/content_loss"] == pytest.approx(float(F.mse_loss(features["relu4_2"], reference)), rel=1e-4)
    assert scores["val/style_loss"] == pytest.approx(float(model.loss.style_term(features)), rel=1e-4)
    assert 0 < scores["val/ssim"] < 1
