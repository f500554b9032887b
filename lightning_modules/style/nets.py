"""Johnson et al.'s image transformation network (supplementary material of "Perceptual Losses for Real-Time
Style Transfer and Super-Resolution", 2016), with Ulyanov et al.'s instance normalisation and
nearest-neighbour upsampling + convolution instead of transposed convolutions (no checkerboard artefacts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.schema import NonNegativeInt, PositiveInt


class ConvLayer(nn.Sequential):
    """Reflection-padded convolution, instance norm, optionally ReLU; `upsample` first doubles the size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        upsample: bool = False,
        relu: bool = True,
    ):
        layers = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
        layers += [
            nn.ReflectionPad2d(kernel // 2),
            nn.Conv2d(in_channels, out_channels, kernel, stride),
            nn.InstanceNorm2d(out_channels, affine=True),
        ]
        super().__init__(*layers, *([nn.ReLU()] if relu else []))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvLayer(channels, channels, 3), ConvLayer(channels, channels, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TransformerNet(nn.Module):
    """RGB [B, 3, H, W] in [0, 1] -> stylised RGB in [0, 1] (a sigmoid bounds it, as the paper's scaled tanh).

    Down by 4 and back up: H and W that are multiples of 4 come back the same; others are resized back.
    The settings (`width`: channels of the first layer; then 2x and 4x): conf/model/fast_style.yaml's `net` block.
    """

    # The smallest image side it takes: the first 9x9 convolution's reflection padding (4 px each side) needs more
    # than 4 px; the two stride-2 convolutions then leave 2 px, which the residual blocks' 1 px padding still takes.
    # (datamodules/style.py SMALLEST_SIDE repeats it for the images to stylise: a data module imports no model.)
    min_size = 5

    def __init__(self, width: PositiveInt, residual_blocks: NonNegativeInt):
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(3, width, 9),
            ConvLayer(width, 2 * width, 3, stride=2),
            ConvLayer(2 * width, 4 * width, 3, stride=2),
            *[ResidualBlock(4 * width) for _ in range(residual_blocks)],
            ConvLayer(4 * width, 2 * width, 3, upsample=True),
            ConvLayer(2 * width, width, 3, upsample=True),
            nn.ReflectionPad2d(4),
            nn.Conv2d(width, 3, 9),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(self.body(images))
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out
