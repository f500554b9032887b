"""Luminance (YIQ) helpers shared by the style modules."""

from __future__ import annotations

import torch

# NTSC YIQ: Y is the luminance, I and Q the chrominance (Gatys et al. 2016, "Preserving color in neural
# artistic style transfer", transfer the style on Y only).
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rgb_to_yiq(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", RGB_TO_YIQ.to(images), images)


def yiq_to_rgb(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(RGB_TO_YIQ).to(images), images)


def matched_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style's luminance [1, 1, H, W], shifted and scaled to the content luminance's mean and std."""
    style_y, content_y = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    return (style_y - style_y.mean()) / style_y.std().clamp_min(1e-6) * content_y.std() + content_y.mean()
