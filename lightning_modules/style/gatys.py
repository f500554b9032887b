"""Gatys et al. (2016), "Image Style Transfer Using Convolutional Neural Networks": the image itself is the
parameter, optimised (LBFGS or Adam) so that its VGG features match the content image's and its Gram matrices
the style images'.

Options: start from the content or from noise; the content's colours kept (Gatys et al. 2016, "Preserving Color
in Neural Artistic Style Transfer"): `luminance`, the style transferred on the YIQ luminance and the content's
chrominance kept, or `histogram`, each style's colours matched to the content's first; masks: a content mask decides
where each style goes (masked Gram matrices); coarse-to-fine: the first scales are optimised at a fraction of the
size, then upsampled and continued.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Annotated, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from framework.config import to_plain
from framework.errors import UserError
from framework.files import write_png
from framework.images import to_rgb
from framework.loggers import tensorboard
from framework.optim import ConfiguredOptimizers
from framework.schema import NonEmpty, NonNegativeFloat, PositiveFloat, PositiveInt, Range, Target
from lightning_modules.style.images import ColorMode, matched_colors, matched_luminance, rgb_to_yiq, with_content_chroma
from lightning_modules.style.losses import Layers, LayerWeights, build_perceptual_loss
from lightning_modules.style.vgg import VGGSettings

log = logging.getLogger(__name__)

Scale = Annotated[float, Range(above=0, max=1)]  # a fraction of the content's size (data.image_size)


class GatysStyleTransfer(ConfiguredOptimizers, L.LightningModule):
    """`content` [3, H, W] and `styles` ([3, h, w] each, blended with `style_weights`; `style_names`: the config key
    and file of each, for errors) are RGB in [0, 1], from the data module; so is `regions`: None, or one weight map
    [1, H, W] per style (from data.masks), each style matched inside its own (masked Gram matrices), not blended.

    Each of `scales` (fractions of the content size, ascending) gets its share of the training steps (`scale_shares`,
    relative; None: equal shares); at each new scale the image is upsampled, the targets recomputed and the
    optimizer started afresh. The style targets are computed once per scale. After fitting, the result is written
    to `output` (PNG) and scored (validation: `val/content_loss`, `val/style_loss`, `val/ssim`,
    losses.style_scores). The other arguments and their defaults: conf/model/gatys.yaml.
    """

    data_inputs = ("content", "styles", "style_weights", "style_names", "regions")  # from the data, before building

    def __init__(
        self,
        content: torch.Tensor,
        styles: list[torch.Tensor],
        style_weights: list[PositiveFloat],
        style_names: list[str],
        regions: list[torch.Tensor] | None,
        vgg: VGGSettings,
        optimizer: Target,
        allow_random_features: bool,
        content_layers: Layers,
        style_layers: LayerWeights,
        content_weight: NonNegativeFloat,
        style_weight: PositiveFloat,
        tv_weight: NonNegativeFloat,
        init: Literal["content", "noise"],
        preserve_color: ColorMode | None,
        scales: Annotated[list[Scale], NonEmpty()],
        scale_shares: Annotated[list[PositiveFloat], NonEmpty()] | None,
        output: str,
        image_every_n_steps: PositiveInt,
    ):
        super().__init__()
        vgg, optimizer, scales = to_plain(vgg), to_plain(optimizer), list(to_plain(scales))
        content_layers, style_layers = list(to_plain(content_layers)), to_plain(style_layers)
        if scales != sorted(scales):
            raise UserError(f"model.scales={scales} must be ascending (coarse to fine, e.g. [0.25, 0.5, 1.0])")
        shares = [1.0] * len(scales) if scale_shares is None else list(to_plain(scale_shares))
        if len(shares) != len(scales):
            raise UserError(
                f"model.scale_shares={shares} needs one share per scale of model.scales={scales} "
                "(or null: equal shares)"
            )
        self.scale_ends = [sum(shares[: i + 1]) / sum(shares) for i in range(len(shares))]  # cumulative fractions
        self.save_hyperparameters(ignore=["content", "styles", "style_names", "regions"], logger=False)
        self.loss = build_perceptual_loss(
            vgg, allow_random_features, content_layers, style_layers, content_weight, style_weight, tv_weight
        )
        self.sizes = [(max(1, round(content.shape[1] * s)), max(1, round(content.shape[2] * s))) for s in scales]
        self.check_sizes(content, styles, style_names, scales)
        self.register_buffer("content", content.unsqueeze(0), persistent=False)
        self.style_images = [s.unsqueeze(0) for s in styles]  # sizes differ: a list, moved when used
        self.regions = None if regions is None else [r.unsqueeze(0) for r in regions]
        start = self.working(self.resized(self.content, 0))
        self.image = nn.Parameter(start.clone() if init == "content" else torch.rand_like(start))
        self.scale_index, self.content_targets = 0, {}

    def check_sizes(self, content: torch.Tensor, styles: list[torch.Tensor], names: list[str], scales) -> None:
        """Every image at the first (smallest) scale must leave a pixel at the deepest layer: one error naming the
        image and what to change, before any step."""
        need, layer = self.loss.min_size, self.loss.deepest
        height, width = self.sizes[0]
        if min(height, width) < need:
            raise UserError(
                f"data.content: the image is {width}x{height} px at model.scales[0]={scales[0]}: layer {layer} needs "
                f"at least {need} px a side; raise data.image_size or the first scale"
            )
        for style, name in zip(styles, names):
            # style_inputs: F.interpolate with scale_factor, which rounds down
            small = [math.floor(side * scales[0]) for side in style.shape[-2:]]
            if min(small) < need:
                raise UserError(
                    f"{name}: the style image is {style.shape[-1]}x{style.shape[-2]} px as resized "
                    f"(data.style_scale), {small[1]}x{small[0]} px at model.scales[0]={scales[0]}: layer {layer} needs "
                    f"at least {need} px a side; raise data.style_scale or the first scale, or use a less elongated "
                    "style image"
                )

    def resized(self, images: torch.Tensor, scale_index: int) -> torch.Tensor:
        size = self.sizes[scale_index]
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)

    def working(self, rgb: torch.Tensor) -> torch.Tensor:
        """What is optimised: the RGB image, or with preserve_color=luminance its luminance [B, 1, H, W]."""
        return rgb_to_yiq(rgb)[:, :1] if self.hparams.preserve_color == "luminance" else rgb

    @staticmethod
    def rgb_view(images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1)  # a luminance image as grey RGB; RGB unchanged

    def style_inputs(self, scale: float) -> list[torch.Tensor]:
        styles = [s.to(self.device) for s in self.style_images]
        styles = (
            [F.interpolate(s, scale_factor=scale, mode="bilinear", antialias=True) for s in styles]
            if scale != 1
            else styles
        )
        if self.hparams.preserve_color == "luminance":  # the style's luminance, matched to the content's mean, spread
            return [self.rgb_view(matched_luminance(s, self.content)) for s in styles]
        if self.hparams.preserve_color == "histogram":
            return [matched_colors(s, self.content) for s in styles]
        return styles

    def enter_scale(self, index: int) -> None:
        if index > 0:
            self.image.data = self.resized(self.image.data, index)
            self.trainer.strategy.setup_optimizers(self.trainer)  # the image changed shape: fresh optimizer state
            log.info("scale %d/%d: %dx%d", index + 1, len(self.sizes), *self.sizes[index][::-1])
        self.content_targets = self.loss.content_targets(self.rgb_view(self.working(self.resized(self.content, index))))
        regions = None if self.regions is None else [r.to(self.device) for r in self.regions]
        self.loss.set_style(self.style_inputs(self.hparams.scales[index]), self.hparams.style_weights, regions)
        self.scale_index = index

    def on_fit_start(self) -> None:
        log.info("Gatys style transfer at %dx%d, VGG features: %s", *self.sizes[-1][::-1], self.loss.features.weights)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        index = bisect.bisect_right(self.scale_ends, batch_idx / self.trainer.num_training_batches)
        index = min(index, len(self.sizes) - 1)
        if index != self.scale_index or not self.content_targets:
            self.enter_scale(index)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Back into [0, 1] before each evaluation, as the PyTorch tutorial does: LBFGS's first full steps leave the
        # range far behind, and unclamped runs stalled there (loss 781 -> 780 in 20 evaluations, 2.5 clamped).
        self.image.data.clamp_(0, 1)
        parts = self.loss(self.rgb_view(self.image), self.content_targets)
        self.log_dict({f"train/{name}": value for name, value in parts.items() if name != "loss"}, batch_size=1)
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=1)
        return parts["loss"]

    def on_after_backward(self) -> None:
        # Projected gradient: a pixel at 0 pulled lower or at 1 pulled higher cannot move (the next clamp undoes
        # it), so its gradient is zeroed; LBFGS then builds its curvature from moves that happen. Against the
        # tutorial's plain clamp it reaches the tutorial's best loss in fewer evaluations and ends lower
        # (benchmarks/RESULTS.md, "Time to quality").
        image, grad = self.image.data, self.image.grad
        if grad is not None:
            grad.masked_fill_(((image <= 0) & (grad > 0)) | ((image >= 1) & (grad < 0)), 0)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.image_every_n_steps == 0:
            self.log_image("train/image")

    def log_image(self, tag: str) -> None:
        board = tensorboard(self.trainer)
        if board is not None:
            board.add_image(tag, self.result(), self.global_step)

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """The stylised image [3, H, W] in [0, 1] (preserve_color=luminance: its luminance, the content's
        chrominance)."""
        image = self.image.detach().clamp(0, 1)
        if self.hparams.preserve_color == "luminance":
            image = with_content_chroma(image, self.resized(self.content, self.scale_index))
        return image[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        """The result's scores (losses.style_scores); the style term sees what was optimised (the luminance, with
        preserve_color=luminance)."""
        if not self.content_targets:  # no targets before the first step (a sanity check): nothing to score
            return
        result = self.result()[None]
        scores = self.loss.scores(
            result, self.resized(self.content, self.scale_index), self.rgb_view(self.working(result))
        )
        self.log_dict({f"val/{name}": value for name, value in scores.items()}, batch_size=1)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.log_image("result")
            log.info("wrote the stylised image to %s", write_png(self.hparams.output, to_rgb(self.result())))
