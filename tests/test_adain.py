"""AdaIN arbitrary style transfer: the decoder learns, the controls (strength, blends, colours, masks) do what they say,
checkpoints and the TorchScript export stylise as the module does, bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framework.config import model_settings
from framework.errors import UserError
from lightning_modules.style.adain import ENCODER_LAYER, AdaINStyle, adain, channel_stats
from lightning_modules.style.images import matched_colors
from tests.helpers.images import write_image
from tests.helpers.style import RANDOM_VGG, task_data
from tests.helpers.trainer import quiet_trainer

# A narrow decoder on the random-weight VGG19 (seed 0), learning fast.
TINY = {
    "decoder": {"width": 8},
    "vgg": RANDOM_VGG,
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-3},
}


def model(**values) -> AdaINStyle:
    """An untrained AdaIN module; its decoder's output centred at 0.5 (an untrained one's sits near 0, where the
    clamp to [0, 1] would hide the differences the tests look at)."""
    torch.manual_seed(0)
    module = AdaINStyle(**model_settings("adain", **{**TINY, **values}))
    module.decoder[-1].bias.data.fill_(0.5)
    return module


def adain_data(folders, **values):
    """task=adain_style's data module (conf/data/adain_images.yaml) on the folders, loading in this process."""
    settings = {
        "folder": str(folders / "content"),
        "style_folder": str(folders / "styles"),
        "image_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        **values,
    }
    return task_data("adain_style", **settings)


def ycbcr_chroma(images: torch.Tensor) -> torch.Tensor:
    """Cb and Cr (ITU-R BT.601) of RGB [B, 3, H, W] in [0, 1]."""
    r, g, b = images.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([0.564 * (b - y), 0.713 * (r - y)], 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adain")
    for kind, count, offset in (("content", 9, 0), ("styles", 6, 100), ("photos", 2, 200)):
        (root / kind).mkdir()
        for i in range(count):
            write_image(root / kind / f"{kind[0]}{i}.png", (48, 40), seed=offset + i)
    return root


def test_adain_gives_the_content_the_styles_statistics():
    torch.manual_seed(0)
    content, style = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 4, 4) * 3 + 1
    out = adain(content, channel_stats(style))
    mean, std = channel_stats(out)
    assert torch.allclose(mean, style.mean((2, 3), keepdim=True), atol=1e-5)
    assert torch.allclose(std, style.std((2, 3), unbiased=False, keepdim=True), atol=1e-3)
    region = torch.zeros(1, 1, 6, 7)
    region[..., 4:] = 1  # the statistics of the region only
    inside = adain(content, channel_stats(style), region)[..., 4:]
    assert torch.allclose(inside.mean((2, 3), keepdim=True), style.mean((2, 3), keepdim=True), atol=1e-5)


@pytest.mark.slow  # trains 24 steps
def test_the_decoder_learns_styles_it_never_saw(folders):
    """Validation pairs held-out contents with held-out styles (never trained on): their style loss falls."""
    data = adain_data(folders, num_val=1, num_val_styles=2)
    module = model()
    trainer = quiet_trainer(max_epochs=12, limit_val_batches=1)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert trainer.global_step == 24  # 8 contents in 2 batches of 4, 12 epochs
    assert after["val/style"] < 0.5 * before["val/style"], (before, after)
    assert after["val/loss"] < 0.5 * before["val/loss"], (before, after)
    assert {"val/content_loss", "val/style_loss", "val/ssim"} <= set(after)
    assert len(data.val_set) == 2 and data.val_set.styles == [str(folders / "styles" / f"s{i}.png") for i in (4, 5)]


def test_alpha_blends_and_weights():
    """alpha=0: the decoder's reconstruction of the content; alpha=0.5: halfway between the AdaIN target and the
    content's features; weights [1, 0]: the first style alone; [0.7, 0.3]: the targets mixed so."""
    torch.manual_seed(0)
    contents, first, second = torch.rand(2, 3, 32, 40), torch.rand(3, 40, 40), torch.rand(3, 24, 32) * 0.2
    one = model()
    features = one.encode(contents)[ENCODER_LAYER]
    targets = [adain(features, channel_stats(one.encode(s[None])[ENCODER_LAYER])) for s in (first, second)]
    with torch.no_grad():
        reconstruction = one.decode(features, contents.shape[-2:]).clamp(0, 1)
    assert torch.equal(model(alpha=0.0).stylise(contents, [first]), reconstruction)
    assert torch.allclose(model(alpha=0.5).styled_features(contents, [first]), (targets[0] + features) / 2, atol=1e-5)
    assert torch.allclose(one.styled_features(contents, [first]), targets[0], atol=1e-5)
    assert torch.allclose(
        model(style_weights=[1.0, 0.0]).styled_features(contents, [first, second]), targets[0], atol=1e-5
    )
    assert torch.allclose(
        model(style_weights=[1.0, 0.0]).stylise(contents, [first, second]), one.stylise(contents, [first]), atol=1e-6
    )
    blend = model(style_weights=[0.7, 0.3]).styled_features(contents, [first, second])
    assert torch.allclose(blend, 0.7 * targets[0] + 0.3 * targets[1], atol=1e-5)
    assert not torch.allclose(targets[0], targets[1], atol=0.1)
    with pytest.raises(UserError, match=r"model.style_weights=\[0.0, 0.0\]: give one weight .* 2 styles"):
        model(style_weights=[0.0, 0.0]).stylise(contents, [first, second])


def test_preserve_color_keeps_the_contents_chroma_or_colour_statistics():
    torch.manual_seed(0)
    contents = torch.rand(2, 3, 32, 40) * 0.5 + 0.25
    style = torch.rand(3, 32, 32) * torch.tensor([1.0, 0.2, 0.1]).view(3, 1, 1)  # reddish
    out = model(preserve_color="luminance").stylise(contents, [style])
    plain = model().stylise(contents, [style])
    difference = (ycbcr_chroma(out) - ycbcr_chroma(contents)).abs().mean()
    assert difference < 0.01 < (ycbcr_chroma(plain) - ycbcr_chroma(contents)).abs().mean(), difference
    # histogram: the style's colours are the content's first (mean and covariance)
    matched = matched_colors(style[None].expand(2, -1, -1, -1), contents)
    for image, content in zip(matched, contents):
        assert torch.allclose(image.mean((1, 2)), content.mean((1, 2)), atol=2e-2)
        assert torch.allclose(torch.cov(image.flatten(1)), torch.cov(content.flatten(1)), atol=5e-3)
    assert model(preserve_color="histogram").stylise(contents, [style]).shape == contents.shape


def test_a_half_mask_keeps_the_other_half_the_contents_reconstruction():
    """One style: where the mask is black the features stay the content's, so away from the edge (the decoder sees
    30 px around a pixel) the result is the decoder's reconstruction; the white half takes the style's statistics
    with its own (per-region AdaIN); two styles: each its half."""
    torch.manual_seed(0)
    contents, style, other = torch.rand(1, 3, 32, 96), torch.rand(3, 32, 32), torch.rand(3, 32, 32) * 0.3
    masks = torch.zeros(1, 1, 32, 96)
    masks[..., 48:] = 1
    one = model()
    reconstruction = model(alpha=0.0).stylise(contents, [style])
    assert torch.allclose(one.stylise(contents, [style], masks)[..., :16], reconstruction[..., :16], atol=1e-6)
    features = one.encode(contents)[ENCODER_LAYER]  # [1, 512, 4, 12]: the white half is columns 6..11
    white = torch.zeros(1, 1, 4, 12)
    white[..., 6:] = 1
    stats = [channel_stats(one.encode(s[None])[ENCODER_LAYER]) for s in (style, other)]
    placed = one.styled_features(contents, [style], masks)
    assert torch.equal(placed[..., :6], features[..., :6])
    assert torch.allclose(placed[..., 6:], adain(features, stats[0], white)[..., 6:], atol=1e-5)
    assert not torch.allclose(placed[..., 6:], adain(features, stats[0])[..., 6:], atol=1e-2)  # its own statistics
    two = one.styled_features(contents, [style, other], masks)
    assert torch.allclose(two[..., :6], adain(features, stats[1], 1 - white)[..., :6], atol=1e-5)
    assert torch.allclose(two[..., 6:], placed[..., 6:])
    with pytest.raises(UserError, match="model.style_weights: with data.masks each style fills its own region"):
        model(style_weights=[1.0, 1.0]).stylise(contents, [style, other], masks)


def test_checkpoint_holds_the_decoder_and_the_export_stylises_as_the_module(folders, tmp_path):
    trained = model()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(trained, datamodule=adain_data(folders))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith("decoder.") for key in state)
    restored = AdaINStyle.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True, alpha=0.6)
    contents, style = torch.rand(1, 3, 36, 44), torch.rand(3, 40, 40)
    trained.hparams.alpha = 0.6
    assert torch.allclose(restored.stylise(contents, [style]), trained.stylise(contents, [style]), atol=1e-6)

    restored.export(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["adain.pt", "model.json"]  # no onnx here
    scripted = torch.jit.load(str(tmp_path / "export" / "adain.pt"))
    for shape in [(1, 3, 36, 44), (2, 3, 29, 50)]:  # any size, not only multiples of 8
        contents = torch.rand(shape)
        assert torch.allclose(
            scripted(contents, style[None].expand(shape[0], -1, -1, -1), 0.6),
            restored.stylise(contents, [style]),
            atol=1e-5,
        )
    assert json.loads((tmp_path / "export" / "model.json").read_text())["decoder"] == TINY["decoder"]
    broken = torch.load(tmp_path / "last.ckpt", weights_only=True)
    broken["state_dict"] = {}
    torch.save(broken, tmp_path / "empty.ckpt")
    with pytest.raises(UserError, match="the checkpoint lacks the AdaIN decoder's weights"):
        AdaINStyle.load_from_checkpoint(tmp_path / "empty.ckpt", weights_only=True)


def test_predict_batches_carry_the_styles_and_the_masks(folders, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        Image.fromarray(np.tile(np.uint8([0, 255]).repeat(24), (40, 1))).save(masks / f"p{i}.png")
    data = adain_data(
        folders,
        images=str(folders / "photos"),
        styles=[str(folders / "styles" / "s0.png"), "skimage:coffee"],
        masks=str(masks),
        style_size=32,
    )
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["images"].shape == (2, 3, 40, 48) and batch["masks"].shape == (2, 1, 40, 48)
    assert batch["masks"][..., :24].max() == 0 and batch["masks"][..., 24:].min() == 1
    assert [tuple(s.shape) for s in batch["style_images"]] == [(3, 27, 32), (3, 21, 32)]  # 48x40 and 600x400 (coffee)
    rows = [row for rows in quiet_trainer(default_root_dir=tmp_path).predict(model(), datamodule=data) for row in rows]
    assert [Path(row["stylized"]).relative_to(tmp_path) for row in rows] == [
        Path("stylized/p0.png"),
        Path("stylized/p1.png"),
    ]
    assert all(Image.open(row["stylized"]).size == (48, 40) for row in rows)


def test_bad_input_is_one_clear_error_each(folders, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (48, 40), 255).save(masks / "p0.png")
    Image.new("L", (40, 40), 255).save(masks / "p1.png")  # not its image's size
    style = str(folders / "styles" / "s0.png")
    with pytest.raises(UserError, match=rf"data.masks: mask {masks / 'p1.png'} is 40x40 px, its image p1.png 48x40 px"):
        adain_data(folders, images=str(folders / "photos"), styles=style, masks=str(masks)).setup("predict")
    (masks / "p1.png").unlink()
    with pytest.raises(
        UserError,
        match=r"data.masks: no mask for image p1.png in .*: give one grayscale image named like it \(p1.png\)",
    ):
        adain_data(folders, images=str(folders / "photos"), styles=style, masks=str(masks)).setup("predict")
    with pytest.raises(UserError, match=r"data.masks: a mask places one style .* data.styles has 3"):
        adain_data(folders, images=str(folders / "photos"), styles=[style] * 3, masks=str(masks)).setup("predict")
    gray, tiny = tmp_path / "gray.png", tmp_path / "tiny.png"
    Image.open(style).convert("L").save(gray)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    with pytest.raises(UserError, match=rf"data.styles\[1\]: style image {gray} is grayscale \(mode L\)"):
        adain_data(folders, images=str(folders / "photos"), styles=[style, str(gray)]).setup("predict")
    with pytest.raises(UserError, match=rf"data.styles\[0\]: style image {tiny} is 1x1 px"):
        adain_data(folders, images=str(folders / "photos"), styles=str(tiny)).setup("predict")
    with pytest.raises(UserError, match="mode=predict needs data.styles"):
        adain_data(folders, images=str(folders / "photos")).setup("predict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=rf"no images .* in {tmp_path / 'empty'} \(data.style_folder\)"):
        adain_data(folders, style_folder=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(UserError, match=r"data.style_folder has 6 images and data.num_val_styles=6 .* none is left"):
        adain_data(folders, num_val_styles=6).setup("fit")
