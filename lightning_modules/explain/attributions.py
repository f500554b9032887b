"""Attribution maps through captum: vanilla gradient, SmoothGrad, Integrated Gradients and Grad-CAM."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Saliency

from lightning_modules.explain.classifier import PixelClassifier

Method = Literal["vanilla", "smoothgrad", "integrated_gradients", "gradcam"]  # model.methods takes these
METHODS: tuple[str, ...] = get_args(Method)


class Attributions:
    """The attribution methods of one classifier (settings: those of conf/model/saliency.yaml).

    - vanilla: |d score / d pixel| (Simonyan et al. 2014);
    - smoothgrad: the vanilla gradient averaged over `smoothgrad_samples` copies of the image with Gaussian
      noise of standard deviation `smoothgrad_noise` (in pixel units; Smilkov et al. 2017);
    - integrated_gradients: from a black image, `ig_steps` Gauss-Legendre steps (Sundararajan et al. 2017);
    - gradcam: Grad-CAM of `gradcam_layer` (Selvaraju et al. 2017), upsampled bilinearly to the image.

    SmoothGrad and Integrated Gradients run their noisy / interpolated copies through the classifier in chunks of
    about `internal_batch_size` images (memory).

    The classifier may be any module with a `layer(name)` lookup whose forward takes the pixels first: `forward_args`
    of `attribute` / `maps` are passed on after them, per image (captum expands them with the pixels), e.g. the
    caption a word of which is explained (see caption_words.py).
    """

    def __init__(
        self,
        classifier: PixelClassifier,
        gradcam_layer: str,
        smoothgrad_samples: int,
        smoothgrad_noise: float,
        ig_steps: int,
        internal_batch_size: int,
    ):
        saliency = Saliency(classifier)
        smoothgrad = NoiseTunnel(saliency)
        integrated_gradients = IntegratedGradients(classifier)
        gradcam = LayerGradCam(classifier, classifier.layer(gradcam_layer))
        self._methods = {
            "vanilla": lambda x, t, a: saliency.attribute(x, target=t, abs=True, additional_forward_args=a),
            "smoothgrad": lambda x, t, a: smoothgrad.attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=smoothgrad_samples,
                stdevs=smoothgrad_noise,
                target=t,
                abs=True,
                nt_samples_batch_size=max(1, internal_batch_size // len(x)),
                additional_forward_args=a,
            ),
            "integrated_gradients": lambda x, t, a: integrated_gradients.attribute(
                x,
                baselines=0.0,
                target=t,
                n_steps=ig_steps,
                internal_batch_size=max(len(x), internal_batch_size),
                additional_forward_args=a,
            ),
            "gradcam": lambda x, t, a: LayerAttribution.interpolate(
                gradcam.attribute(x, target=t, relu_attributions=True, additional_forward_args=a),
                tuple(x.shape[-2:]),
                "bilinear",
            ),
        }

    def attribute(
        self, method: str, pixels: torch.Tensor, targets: torch.Tensor, forward_args: tuple | None = None
    ) -> torch.Tensor:
        """captum's attributions, [B, 3, H, W] (Grad-CAM: [B, 1, H, W]); needs gradients enabled."""
        return self._methods[method](pixels, targets, forward_args)

    def maps(
        self, method: str, pixels: torch.Tensor, targets: torch.Tensor, forward_args: tuple | None = None
    ) -> torch.Tensor:
        return to_maps(self.attribute(method, pixels, targets, forward_args))


def to_maps(attributions: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 maps [B, H, W]: the attributions' absolute values summed over the colour channels
    (float32 also under bf16-mixed, where Grad-CAM's activations and gradients are bfloat16)."""
    return attributions.detach().float().abs().sum(1)
