"""Perceptual losses of Gatys et al. and Johnson et al.: content, style (Gram matrices) and total variation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from framework.schema import NonEmpty, PositiveFloat
from lightning_modules.style.vgg import VGGFeatures, VGGSettings, check_layers

Layers = Annotated[list[str], NonEmpty()]  # VGG layer names (conv1_1, relu1_1, pool1, ...), checked per model.vgg.arch
LayerWeights = Annotated[dict[str, PositiveFloat], NonEmpty()]  # layer name: weight
SCORE_CONTENT_LAYER = "relu4_2"  # the content score of every style task (`style_scores`)


class _Gram(torch.autograd.Function):
    """flat^T @ flat * scale for flat [B, N, C]. Autograd would differentiate the two operands apart (two
    products and their sum); the product is symmetric, so one product makes the gradient: half the Gram's backward."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.scale = scale
        return flat.transpose(1, 2) @ flat * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (flat,) = ctx.saved_tensors
        # under a trainer.precision autocast the product was bfloat16 or float16: no autocast here to match the types
        return flat @ ((grad + grad.transpose(1, 2)) * ctx.scale).to(flat.dtype), None


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, C] feature correlations, divided by C*H*W so that layers and sizes compare."""
    batch, channels, height, width = features.shape
    # [B, H*W, C]: a view of VGGFeatures' channels_last activations (the [B, C, H*W] view would copy them)
    flat = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    return _Gram.apply(flat, 1 / (channels * height * width))


def content_loss(features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the content layers of the mean squared feature difference."""
    return sum(F.mse_loss(features[layer], target) for layer, target in targets.items())


def masked_gram(features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the features inside `region` ([1 or B, 1, h, w] weights in [0, 1] at any size >= the
    features', averaged down to them), divided by C times the region's area: a style's statistics where it is to go."""
    batch, channels, height, width = features.shape
    weights = F.adaptive_avg_pool2d(region.to(features), (height, width))
    flat = (features * weights).flatten(2)
    area = weights.flatten(1).sum(1).clamp_min(1e-6).view(-1, 1, 1)
    return flat @ flat.transpose(1, 2) / (channels * area)


def style_loss(
    features: dict[str, torch.Tensor],
    target_grams: dict[str, torch.Tensor],
    layer_weights: dict[str, float],
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over the style layers of weight * mean squared Gram difference (targets [1, C, C] serve a whole batch;
    [B, C, C] one each); with `region`, the Gram matrices of the features inside it (`masked_gram`)."""
    total = 0
    for layer, weight in layer_weights.items():
        gram = gram_matrix(features[layer]) if region is None else masked_gram(features[layer], region)
        total = total + weight * F.mse_loss(gram, target_grams[layer].expand_as(gram))
    return total


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertical plus horizontal neighbours (smooth, so LBFGS copes with it)."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).pow(2).mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).pow(2).mean()
    return vertical + horizontal


class PerceptualLoss(nn.Module):
    """content_weight * content + style_weight * style + tv_weight * TV on one VGG pass over the images.

    The style target is computed once by `set_style`: a blend of several styles' Gram matrices, or with regions (masks)
    each style's own Gram matrices, matched inside its region (masked Gram matrices).
    """

    def __init__(
        self,
        features: VGGFeatures,
        content_layers: list[str],
        style_layers: dict[str, float],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ):
        super().__init__()
        self.features = features
        self.content_layers, self.style_layers = list(content_layers), dict(style_layers)
        self.layers = frozenset([*self.content_layers, *self.style_layers])  # what the loss asks of the features
        self.content_weight, self.style_weight, self.tv_weight = content_weight, style_weight, tv_weight
        self.targets: list[tuple[torch.Tensor | None, dict[str, torch.Tensor]]] = []  # (region or None, Grams)

    @property
    def min_size(self) -> int:
        """The smallest image side the loss takes (a pixel left at its deepest layer)."""
        return self.features.min_size(self.layers)

    @property
    def deepest(self) -> str:
        return self.features.deepest(self.layers)

    @torch.no_grad()
    def set_style(
        self, styles: list[torch.Tensor], blend: list[float], regions: list[torch.Tensor] | None = None
    ) -> None:
        """Target Grams of the style images ([1, 3, H, W] each): the blend-weighted sum of their Gram matrices, or
        with `regions` ([1, 1, H, W] weights at the image's size, one per style) each style's own, for its region."""
        grams = [self.features(style, frozenset(self.style_layers)) for style in styles]
        if regions is not None:
            self.targets = [
                (region, {layer: gram_matrix(features[layer]) for layer in self.style_layers})
                for region, features in zip(regions, grams)
            ]
            return
        total = sum(blend)
        blended = {
            layer: sum(weight / total * gram_matrix(features[layer]) for weight, features in zip(blend, grams))
            for layer in self.style_layers
        }
        self.targets = [(None, blended)]

    def style_term(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(style_loss(features, grams, self.style_layers, region) for region, grams in self.targets)

    @torch.no_grad()
    def content_targets(self, content: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(content, frozenset(self.content_layers))

    def forward(self, images: torch.Tensor, content_targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.features(images, self.layers)
        parts = {
            "content": content_loss(features, content_targets),
            "style": self.style_term(features),
            "tv": total_variation(images),
        }
        parts["loss"] = (
            self.content_weight * parts["content"] + self.style_weight * parts["style"] + self.tv_weight * parts["tv"]
        )
        return parts

    def scores(
        self, images: torch.Tensor, contents: torch.Tensor, styled: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`style_scores` of stylised images against their contents and this loss's style targets."""
        return style_scores(self.features, images, contents, self.style_term, frozenset(self.style_layers), styled)


@torch.no_grad()
def style_scores(
    features: VGGFeatures,
    images: torch.Tensor,
    contents: torch.Tensor,
    style_term: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    style_layers: frozenset[str],
    styled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The numbers every style task reports, to compare results by: `content_loss`, the mean squared difference of
    the images' and the contents' VGG features at SCORE_CONTENT_LAYER (relu4_2, Gatys et al.'s content layer, whatever
    the task optimises); `style_loss`, `style_term` of the features at `style_layers` of `styled` (what the style was
    transferred to: the images, or their luminance where only that was stylised), the task's Gram distance to its
    style targets, unweighted by model.style_weight; `ssim` to the content (torchmetrics, data range 1)."""
    seen = features(images, frozenset({SCORE_CONTENT_LAYER}))[SCORE_CONTENT_LAYER]
    content = features(contents, frozenset({SCORE_CONTENT_LAYER}))[SCORE_CONTENT_LAYER]
    return {
        "content_loss": F.mse_loss(seen, content),
        "style_loss": style_term(features(images if styled is None else styled, style_layers)),
        "ssim": structural_similarity_index_measure(images.float(), contents.float(), data_range=1.0),
    }


def build_perceptual_loss(
    vgg: VGGSettings,
    allow_random_features: bool,
    content_layers: list[str],
    style_layers: dict[str, float],
    content_weight: float,
    style_weight: float,
    tv_weight: float,
) -> PerceptualLoss:
    """The loss from the model config (its types and ranges checked with the config: framework/schema.py); the layer
    names are checked here against model.vgg.arch (UserErrors name the model.* key). Its VGG also holds
    SCORE_CONTENT_LAYER, for `scores`; the loss itself runs it only as deep as its own layers."""
    check_layers(vgg["arch"], list(content_layers), "model.content_layers")
    check_layers(vgg["arch"], list(style_layers), "model.style_layers")
    layers = [*content_layers, *style_layers, SCORE_CONTENT_LAYER]
    features = VGGFeatures(layers, allow_random_features=allow_random_features, **vgg)
    return PerceptualLoss(features, content_layers, style_layers, content_weight, style_weight, tv_weight)
