"""Perceptual losses of Gatys et al. and Johnson et al.: content, style (Gram matrices) and total variation."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from framework.schema import NonEmpty, PositiveFloat
from lightning_modules.style.vgg import VGGFeatures, VGGSettings, check_layers

Layers = Annotated[list[str], NonEmpty()]  # VGG layer names (conv1_1, relu1_1, pool1, ...), checked per model.vgg.arch
LayerWeights = Annotated[dict[str, PositiveFloat], NonEmpty()]  # layer name: weight


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


def style_loss(
    features: dict[str, torch.Tensor], target_grams: dict[str, torch.Tensor], layer_weights: dict[str, float]
) -> torch.Tensor:
    """Sum over the style layers of weight * mean squared Gram difference (targets [1, C, C] serve a whole batch)."""
    return sum(
        weight * F.mse_loss(gram_matrix(features[layer]), target_grams[layer].expand(len(features[layer]), -1, -1))
        for layer, weight in layer_weights.items()
    )


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertical plus horizontal neighbours (smooth, so LBFGS copes with it)."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).pow(2).mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).pow(2).mean()
    return vertical + horizontal


class PerceptualLoss(nn.Module):
    """content_weight * content + style_weight * style + tv_weight * TV on one VGG pass over the images.

    The style target (a blend of several styles' Gram matrices) is computed once by `set_style`.
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
        self.content_weight, self.style_weight, self.tv_weight = content_weight, style_weight, tv_weight
        self.style_grams: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def set_style(self, styles: list[torch.Tensor], blend: list[float]) -> None:
        """Target Grams: the blend-weighted sum of each style image's ([1, 3, H, W]) Gram matrices."""
        total = sum(blend)
        grams = [self.features(style) for style in styles]
        self.style_grams = {
            layer: sum(weight / total * gram_matrix(features[layer]) for weight, features in zip(blend, grams))
            for layer in self.style_layers
        }

    @torch.no_grad()
    def content_targets(self, content: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(content)
        return {layer: features[layer] for layer in self.content_layers}

    def forward(self, images: torch.Tensor, content_targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.features(images)
        parts = {
            "content": content_loss(features, content_targets),
            "style": style_loss(features, self.style_grams, self.style_layers),
            "tv": total_variation(images),
        }
        parts["loss"] = (
            self.content_weight * parts["content"] + self.style_weight * parts["style"] + self.tv_weight * parts["tv"]
        )
        return parts


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
    names are checked here against model.vgg.arch (UserErrors name the model.* key)."""
    check_layers(vgg["arch"], list(content_layers), "model.content_layers")
    check_layers(vgg["arch"], list(style_layers), "model.style_layers")
    features = VGGFeatures([*content_layers, *style_layers], allow_random_features=allow_random_features, **vgg)
    return PerceptualLoss(features, content_layers, style_layers, content_weight, style_weight, tv_weight)
