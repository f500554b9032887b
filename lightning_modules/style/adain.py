"""Huang and Belongie (2017), "Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization": one
network for any style. A fixed VGG encoder to relu4_1; AdaIN gives the content's features the channel means and
standard deviations of the style's; a decoder, the only trained part, turns them back into an image. Trained on a
folder of content images and a folder of style images; it stylises with styles it never saw.

Controls at predict: `alpha` (strength: 0 is the decoder's reconstruction of the content), a blend of several styles
(`style_weights`, the AdaIN targets mixed), the content's colours kept (`preserve_color`: `histogram` matches each
style's colours to the content's first, the paper's section 7; `luminance` stylises the luminance and keeps the
content's chrominance), and masks (per-region statistics: the content's features inside the white region take the
first style's statistics, those in the black region the second style's, or with one style stay the content's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from framework.config import to_plain
from framework.contracts import Exports, InferenceOverrides
from framework.errors import UserError
from framework.images import SkippedImages
from framework.loggers import tensorboard
from framework.optim import ConfiguredOptimizers
from framework.schema import NonEmpty, NonNegativeFloat, PositiveFloat, PositiveInt, Range, SettingsOf, Target
from lightning_modules.style.feedforward import FeedForwardStyle, export_network
from lightning_modules.style.images import (
    ColorMode,
    matched_colors,
    matched_luminance,
    rgb_to_yiq,
    with_content_chroma,
)
from lightning_modules.style.losses import SCORE_CONTENT_LAYER, Layers, gram_matrix, style_loss, style_scores
from lightning_modules.style.vgg import VGGFeatures, VGGSettings, check_layers

log = logging.getLogger(__name__)

ENCODER_LAYER = "relu4_1"  # where AdaIN acts (the paper's); the decoder mirrors the encoder up to it
ENCODER_CHANNELS = 512  # relu4_1's channels in VGG16 and VGG19


def channel_stats(features: torch.Tensor, region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [B, C, 1, 1] of each channel over the positions, or over those of `region`
    ([B or 1, 1, H, W] of 0 and 1)."""
    if region is None:
        mean = features.mean((2, 3), keepdim=True)
        variance = features.var((2, 3), keepdim=True, unbiased=False)
    else:
        area = region.sum((2, 3), keepdim=True).clamp_min(1)
        mean = (features * region).sum((2, 3), keepdim=True) / area
        variance = ((features - mean) ** 2 * region).sum((2, 3), keepdim=True) / area
    return mean, (variance + 1e-5).sqrt()  # a flat region's standard deviation is not zero (a literal: it scripts)


def adain(content: torch.Tensor, style: tuple[torch.Tensor, torch.Tensor], region: torch.Tensor | None = None):
    """The content's features normalised per channel (over `region` where given) and given the style's mean and
    standard deviation (`style`: `channel_stats` of the style's features)."""
    mean, std = channel_stats(content, region)
    return (content - mean) / std * style[1] + style[0]


def conv(channels_in: int, channels_out: int, relu: bool = True) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), nn.Conv2d(channels_in, channels_out, 3), *([nn.ReLU()] if relu else [])]


class Decoder(nn.Sequential):
    """The paper's decoder: the VGG19 encoder to relu4_1 mirrored (pooling replaced by nearest-neighbour upsampling,
    reflection padding, no normalisation), from the 512 relu4_1 channels back to RGB. `width`: the channels at full
    resolution (the paper's 64), 2x and 4x deeper. Down by 8 and back up: other sizes are resized back."""

    def __init__(self, width: PositiveInt):
        up = [nn.Upsample(scale_factor=2, mode="nearest")]
        super().__init__(
            *conv(ENCODER_CHANNELS, 4 * width),
            *up,
            *conv(4 * width, 4 * width),
            *conv(4 * width, 4 * width),
            *conv(4 * width, 4 * width),
            *conv(4 * width, 2 * width),
            *up,
            *conv(2 * width, 2 * width),
            *conv(2 * width, width),
            *up,
            *conv(width, width),
            *conv(width, 3, relu=False),
        )


class Stylizer(nn.Module):
    """What the export holds: content [B, 3, H, W] and style [B, 3, h, w] RGB in [0, 1] and the strength `alpha`
    -> the stylised RGB [B, 3, H, W] in [0, 1]. Plain layers (no dicts, no autocast), so it scripts."""

    def __init__(self, encoder: VGGFeatures, decoder: Decoder):
        super().__init__()
        self.encoder = nn.Sequential(*encoder.body[: encoder.names.index(ENCODER_LAYER) + 1])
        self.register_buffer("mean", encoder.mean.clone())
        self.register_buffer("std", encoder.std.clone())
        self.decoder = decoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder((images - self.mean) / self.std)

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        features = self.encode(content)
        target = adain(features, channel_stats(self.encode(style)))
        out = self.decoder(alpha * target + (1 - alpha) * features)
        if out.shape[-2:] != content.shape[-2:]:
            out = F.interpolate(out, size=content.shape[-2:], mode="bilinear", align_corners=False)
        return out.clamp(0, 1)


class AdaINStyle(ConfiguredOptimizers, FeedForwardStyle, L.LightningModule, Exports, InferenceOverrides):
    """Trains the decoder on batches of content and style crops (`images`, `styles`): content loss, the decoded
    image's relu4_1 features against the AdaIN target; style loss, the channel means and standard deviations at
    `style_layers` against the style's. Validation stylises held-out contents with held-out styles (never trained on)
    and logs the losses (`val/loss`, `val/content`, `val/style`) and the scores of every style task (`val/content_loss`,
    `val/style_loss`, `val/ssim`: losses.style_scores, Gram distances at `style_layers`), averaged over the pairs.

    Checkpoints hold the decoder only: the encoder is the fixed VGG (`vgg`). Predict batches carry the content images,
    the style images (`styles`, blended by `style_weights`) and, with data.masks, their masks. The other arguments and
    their defaults: conf/model/adain.yaml.
    """

    inference_hparams = ("alpha", "style_weights", "preserve_color")

    def __init__(
        self,
        decoder: SettingsOf[Decoder],
        vgg: VGGSettings,
        optimizer: Target,
        allow_random_features: bool,
        style_layers: Layers,
        content_weight: PositiveFloat,
        style_weight: NonNegativeFloat,
        alpha: Annotated[float, Range(min=0, max=1)],
        style_weights: Annotated[list[NonNegativeFloat], NonEmpty()] | None,
        preserve_color: ColorMode | None,
        image_every_n_steps: PositiveInt,
    ):
        super().__init__()
        decoder, vgg, optimizer = to_plain(decoder), to_plain(vgg), to_plain(optimizer)
        style_layers, style_weights = list(to_plain(style_layers)), to_plain(style_weights)
        self.save_hyperparameters(logger=False)
        check_layers(vgg["arch"], style_layers, "model.style_layers")
        layers = [*style_layers, ENCODER_LAYER, SCORE_CONTENT_LAYER]
        self.encoder = VGGFeatures(layers, allow_random_features=allow_random_features, **vgg)
        self.decoder = Decoder(**decoder)
        self.style_layers = frozenset(style_layers)
        self.skipped_images = SkippedImages()
        self.strict_loading = False  # the checkpoint has no encoder (on_load_checkpoint checks the decoder is there)

    def state_dict(self, *args, **kwargs):
        # Checkpoints hold the decoder only (the encoder is fixed ImageNet VGG).
        state = super().state_dict(*args, **kwargs)
        return {key: value for key, value in state.items() if not key.startswith("encoder.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(
            set(self.decoder.state_dict()) - {k.removeprefix("decoder.") for k in checkpoint["state_dict"]}
        )
        if missing:
            raise UserError(f"the checkpoint lacks the AdaIN decoder's weights ({', '.join(missing[:3])}, ...)")

    def encode(self, images: torch.Tensor, layers=frozenset({ENCODER_LAYER})) -> dict[str, torch.Tensor]:
        return self.encoder(images, frozenset(layers))

    def decode(self, features: torch.Tensor, size: torch.Size) -> torch.Tensor:
        out = self.decoder(features)
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def losses(self, contents: torch.Tensor, styles: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The training losses of a batch of (content, style) pairs, and the decoded images."""
        content = self.encode(contents)[ENCODER_LAYER]
        style = self.encode(styles, self.style_layers | {ENCODER_LAYER})
        target = adain(content, channel_stats(style[ENCODER_LAYER]))
        out = self.decode(target, contents.shape[-2:])
        seen = self.encode(out, self.style_layers | {ENCODER_LAYER})
        parts = {"content": F.mse_loss(seen[ENCODER_LAYER], target)}
        parts["style"] = sum(
            F.mse_loss(a, b)
            for layer in sorted(self.style_layers)
            for a, b in zip(channel_stats(seen[layer]), channel_stats(style[layer]))
        )
        parts["loss"] = self.hparams.content_weight * parts["content"] + self.hparams.style_weight * parts["style"]
        return parts, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if not self.skipped_images.has_images(batch, "train"):
            return None
        parts, out = self.losses(batch["images"], batch["styles"])
        size = len(batch["images"])
        self.log_dict({f"train/{name}": value for name, value in parts.items() if name != "loss"}, batch_size=size)
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=size)
        board = tensorboard(self.trainer)
        if board is not None and self.global_step % self.hparams.image_every_n_steps == 0:
            shown = torch.cat([batch["images"][:4], batch["styles"][:4], out[:4].detach().clamp(0, 1)])
            board.add_images("train/content_style_stylized", shown, self.global_step)
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.skipped_images.has_images(batch, "val"):
            return
        contents, styles = batch["images"], batch["styles"]
        parts, out = self.losses(contents, styles)
        out = out.clamp(0, 1)
        grams = {layer: gram_matrix(f) for layer, f in self.encode(styles, self.style_layers).items()}
        weights = dict.fromkeys(self.style_layers, 1.0)
        scores = style_scores(self.encoder, out, contents, lambda f: style_loss(f, grams, weights), self.style_layers)
        self.log_dict({f"val/{name}": value for name, value in (parts | scores).items()}, batch_size=len(contents))

    @torch.no_grad()
    def stylise(
        self, contents: torch.Tensor, styles: list[torch.Tensor], masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`contents` [B, 3, H, W] with `styles` ([3, h, w] each, blended by model.style_weights; with `masks`
        [B, 1, H, W], one or two styles placed by them), at model.alpha, colours as model.preserve_color says."""
        out = self.decode(self.styled_features(contents, styles, masks), contents.shape[-2:]).clamp(0, 1)
        return with_content_chroma(out, contents) if self.hparams.preserve_color == "luminance" else out

    @torch.no_grad()
    def styled_features(
        self, contents: torch.Tensor, styles: list[torch.Tensor], masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What `stylise` decodes: the AdaIN target of the (blended or placed) styles, mixed with the content's
        features by model.alpha."""
        colors, alpha = self.hparams.preserve_color, self.hparams.alpha
        weights = self.hparams.style_weights or [1.0] * len(styles)
        if len(weights) != len(styles) or not sum(weights) > 0:
            raise UserError(
                f"model.style_weights={weights}: give one weight (>= 0, not all 0) for each of the {len(styles)} "
                "styles of data.styles"
            )
        if masks is not None and self.hparams.style_weights:
            raise UserError(
                "model.style_weights: with data.masks each style fills its own region and nothing is blended: remove "
                "model.style_weights"
            )
        inputs = contents
        batch = [s[None].expand(len(contents), -1, -1, -1) for s in styles]
        if colors == "luminance":  # grey views: the luminance of each, the styles' matched to each content's
            inputs = rgb_to_yiq(contents)[:, :1].expand(-1, 3, -1, -1)
            batch = [
                torch.cat([matched_luminance(s[None], c[None]) for c in contents]).expand(-1, 3, -1, -1) for s in styles
            ]
        elif colors == "histogram":
            batch = [matched_colors(s, contents) for s in batch]
        features = self.encode(inputs)[ENCODER_LAYER]
        stats = [channel_stats(self.encode(s)[ENCODER_LAYER]) for s in batch]
        if masks is None:
            total = sum(weights)
            target = sum(w / total * adain(features, s) for w, s in zip(weights, stats))
        else:
            white = (F.adaptive_avg_pool2d(masks, features.shape[-2:]) >= 0.5).to(features)
            regions = [white, 1 - white][: len(stats)]
            target = features * (1 - sum(regions))  # with one style, the black region keeps the content's features
            for region, style in zip(regions, stats):
                target = target + region * adain(features, style, region)
        return alpha * target + (1 - alpha) * features

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Stylises a batch and writes each result as PNG (atomically) under <run dir>/stylized/."""
        if not self.skipped_images.has_images(batch, "predict"):
            return []
        styles = [s.to(self.device) for s in batch["style_images"]]
        out = self.stylise(batch["images"], styles, batch.get("masks"))
        return self.write_stylised(batch, out)

    def export(self, directory: str | Path) -> Path:
        """TorchScript `adain.pt`: `torch.jit.load(path)(content, style, alpha)` (RGB [B, 3, H, W] in [0, 1], any
        sizes), and ONNX when `onnx` is installed; model.json."""
        decoder = Decoder(**self.hparams.decoder)
        decoder.load_state_dict(self.decoder.state_dict())
        stylizer = Stylizer(self.encoder, decoder).float()
        info = {
            "inputs": "content RGB float [B, 3, H, W] in [0, 1], style RGB float [B, 3, h, w] in [0, 1], alpha float",
            "output": "stylised RGB float [B, 3, H, W] in [0, 1]",
            "decoder": self.hparams.decoder,
            "vgg": self.hparams.vgg,
        }
        axes = {0: "batch", 2: "height", 3: "width"}
        example = (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
        names = {"content": axes, "style": axes, "stylized": axes}
        return export_network(directory, stylizer, "adain", example, names, info)

    def optimizer_params(self):
        return [p for p in self.decoder.parameters() if p.requires_grad]
