"""Colour helpers shared by the style modules: YIQ luminance and the two ways of keeping the content's colours (Gatys
et al. 2016, "Preserving color in neural artistic style transfer"): `luminance` (style on the luminance only, the
content's chrominance kept) and `histogram` (colours matched to the content's before or after stylising)."""

from __future__ import annotations

from typing import Literal

import torch

ColorMode = Literal["luminance", "histogram"]  # model.preserve_color; null keeps the style's colours

# NTSC YIQ: Y is the luminance, I and Q the chrominance (Gatys et al. 2016 transfer the style on Y only).
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rgb_to_yiq(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", RGB_TO_YIQ.to(images), images)


def yiq_to_rgb(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(RGB_TO_YIQ).to(images), images)


def matched_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style's luminance [B, 1, H, W], shifted and scaled to the content luminance's mean and std."""
    style_y, content_y = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    return (style_y - style_y.mean()) / style_y.std().clamp_min(1e-6) * content_y.std() + content_y.mean()


def with_content_chroma(luminance: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] from the luminance (Y) of `luminance` ([B, 1 or 3, H, W]: its Y is taken) and the
    chrominance (I, Q) of `content` (same size)."""
    y = luminance if luminance.shape[1] == 1 else rgb_to_yiq(luminance)[:, :1]
    return yiq_to_rgb(torch.cat([y, rgb_to_yiq(content)[:, 1:]], 1)).clamp(0, 1)


def _sqrtm(covariance: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(1e-5).pow(-0.5 if inverse else 0.5)
    return vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)


def matched_colors(source: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`source` [B, 3, H, W] with its colours' mean and covariance made those of `reference` [B, 3, h, w] (each image
    its own), by the linear map of Gatys et al. 2016 section 2.2 (A = Σr^½ Σs^-½ on the centred pixels), in [0, 1]."""
    flat_s, flat_r = source.flatten(2).double(), reference.flatten(2).double()
    mean_s, mean_r = flat_s.mean(2, keepdim=True), flat_r.mean(2, keepdim=True)
    centred_s, centred_r = flat_s - mean_s, flat_r - mean_r
    cov_s = centred_s @ centred_s.transpose(1, 2) / centred_s.shape[2]
    cov_r = centred_r @ centred_r.transpose(1, 2) / centred_r.shape[2]
    mapped = _sqrtm(cov_r) @ _sqrtm(cov_s, inverse=True) @ centred_s + mean_r
    return mapped.view_as(source).to(source.dtype).clamp(0, 1)


def content_colored(stylised: torch.Tensor, content: torch.Tensor, mode: ColorMode | None) -> torch.Tensor:
    """A stylised image given the content's colours afterwards (feed-forward networks, whose style is fixed or already
    applied): `luminance` keeps its luminance and the content's chrominance, `histogram` matches its colours to the
    content's; None returns it as it is."""
    if mode == "luminance":
        return with_content_chroma(stylised, content)
    if mode == "histogram":
        return matched_colors(stylised, content)
    return stylised
