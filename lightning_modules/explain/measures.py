"""Measuring attribution maps: deletion / insertion AUC, the pointing game and the model-randomisation check."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from torchvision.transforms.functional import gaussian_blur

from lightning_modules.explain.classifier import PixelClassifier


@torch.no_grad()
def deletion_insertion(
    classifier: PixelClassifier, pixels: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC per image (Petsiuk et al. 2018, RISE).

    Pixels are ranked by the map, most important first. Deletion replaces the top k/steps of them with
    black; insertion starts from a blurred copy (Gaussian, sigma = 1/20 of the image side) and puts the top
    k/steps back. The curves of the target's probability over k = 0..steps are integrated over [0, 1]
    (trapezoid). A faithful map gives a low deletion and a high insertion AUC.
    """
    batch, height, width = maps.shape
    ranks = torch.empty_like(maps.flatten(1), dtype=torch.long)
    ranks.scatter_(
        1,
        maps.flatten(1).argsort(1, descending=True),
        torch.arange(height * width, device=maps.device).expand(batch, -1),
    )
    ranks = ranks.view(batch, 1, height, width)
    sigma = max(height, width) / 20
    blurred = gaussian_blur(pixels, [2 * round(2 * sigma) + 1] * 2, [sigma, sigma])
    deletion, insertion = [], []
    for k in range(steps + 1):
        top = ranks < round(k / steps * height * width)
        for curve, image in ((deletion, torch.where(top, 0.0, pixels)), (insertion, torch.where(top, pixels, blurred))):
            curve.append(classifier(image).softmax(1).gather(1, targets[:, None])[:, 0])
    return tuple(torch.trapezoid(torch.stack(curve, 1), dx=1 / steps, dim=1) for curve in (deletion, insertion))


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Whether each map's maximum falls inside its object box [x0, y0, x1, y1], or within `tolerance` pixels of it
    (Zhang et al. 2016 allow 15 pixels at 224), [B] bool."""
    peak = maps.flatten(1).argmax(1)
    y, x = peak // maps.shape[-1], peak % maps.shape[-1]
    x0, y0, x1, y1 = widen(boxes, tolerance)
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def pointing_chance(boxes: torch.Tensor, height: int, width: int, tolerance: float = 0.0) -> torch.Tensor:
    """The pointing game's chance level (a peak anywhere in the image): the share of the image that counts as a hit."""
    x0, y0, x1, y1 = widen(boxes, tolerance)
    area = (x1.clamp(max=width - 1) - x0.clamp(min=0) + 1) * (y1.clamp(max=height - 1) - y0.clamp(min=0) + 1)
    return area / (height * width)


def widen(boxes: torch.Tensor, margin: float) -> tuple[torch.Tensor, ...]:
    """x0, y0, x1, y1 of boxes [B, 4] grown by `margin` on every side."""
    return (boxes + torch.tensor([-margin, -margin, margin, margin], device=boxes.device)).unbind(1)


def cascading_randomisations(classifier: PixelClassifier, seed: int = 0) -> list[tuple[str, PixelClassifier]]:
    """Copies of `classifier` with its weighted layers re-initialised cumulatively from the output down
    (Adebayo et al. 2018): [("fc", fc random), ("block3", fc and block3 random), ...]."""
    randomised, model = [], classifier
    for step, name in enumerate(reversed(classifier.parameterised_layers())):
        model = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)
            for module in model.net.get_submodule(name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):  # BatchNorm: forget the trained statistics too
                    module.reset_running_stats()
        randomised.append((name, model))
    return randomised


def spearman(maps: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps [B, H, W] (ties ranked by their mean).

    A constant map (e.g. Grad-CAM of a randomised network, all zero after its ReLU) ranks nothing: it counts as 0.
    """
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about constant inputs; they give nan, counted as 0
        for a, b in zip(maps.flatten(1).cpu().double().numpy(), others.flatten(1).cpu().double().numpy()):
            values.append(np.nan_to_num(spearmanr(a, b).statistic, nan=0.0))
    return torch.tensor(values, dtype=torch.float32)
