"""Fidelity of generated images, as the DreamBooth paper measures it (Ruiz et al. 2023, section 4.1).

- CLIP-T (prompt fidelity): the CLIP score between each generated image and its prompt, as torchmetrics'
  CLIPScore defines it (max(100 cos, 0), averaged), divided by 100: the mean cosine similarity of the
  CLIP image and text embeddings, the paper's scale.
- CLIP-I and DINO (subject fidelity): the mean cosine similarity between the embeddings of every
  generated image and every real instance image; CLIP image embeddings, and the CLS token of a
  self-supervised ViT (DINO ViT-S/16 in the paper).

The embedding models are hub ids (from the local Hugging Face cache: nothing is downloaded) or local
folders written by save_pretrained. torchmetrics 1.9's CLIPScore is not used: it takes a local folder
only through a callable (its string form accepts a few hub names), and with transformers 5 it fails,
as `get_image_features` now returns a model output rather than a tensor. The score is computed here
with the same definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

from framework.pretrained import load_offline


def embedding(output) -> torch.Tensor:
    """get_image_features / get_text_features: a tensor in transformers 4, the pooled output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (row of a, row of b)."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


class Fidelity:
    """CLIP-T, CLIP-I and DINO from the configured models (either may be null: its metrics are left out)."""

    def __init__(self, clip: str | None = None, dino: str | None = None, key: str = "model.fidelity"):
        self.clip = load_offline(CLIPModel.from_pretrained, clip, f"{key}.clip").eval() if clip else None
        self.clip_processor = load_offline(CLIPProcessor.from_pretrained, clip, f"{key}.clip") if clip else None
        self.dino = load_offline(ViTModel.from_pretrained, dino, f"{key}.dino").eval() if dino else None
        self.dino_processor = load_offline(AutoImageProcessor.from_pretrained, dino, f"{key}.dino") if dino else None

    @torch.no_grad()
    def clip_t(self, images: list[Image.Image], prompts: list[str]) -> float:
        """Mean over images of max(cos(image, its prompt), 0): torchmetrics' CLIPScore / 100."""
        text = self.clip_processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        text_features = embedding(self.clip.get_text_features(**text.to(self.clip.device)))
        cosine = F.cosine_similarity(self.clip_embeddings(images).float(), text_features.float(), dim=-1)
        return float(cosine.clamp(min=0).mean())

    @torch.no_grad()
    def clip_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt")["pixel_values"]
        return embedding(self.clip.get_image_features(pixel_values=pixels.to(self.clip.device)))

    @torch.no_grad()
    def dino_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.dino(pixel_values=pixels.to(self.dino.device)).last_hidden_state[:, 0]

    def to(self, device: torch.device | str) -> Fidelity:
        if self.clip is not None:
            self.clip.to(device)
        if self.dino is not None:
            self.dino.to(device)
        return self

    @torch.no_grad()
    def pair_similarity(self, images: list[Image.Image], others: list[Image.Image]) -> float:
        """The mean cosine similarity of each image with its pair in `others` (same place): DINO embeddings, or CLIP
        image embeddings without a DINO model."""
        embed = self.dino_embeddings if self.dino is not None else self.clip_embeddings
        return float(F.cosine_similarity(embed(images).float(), embed(others).float(), dim=-1).mean())

    def __call__(
        self, images: list[Image.Image], prompts: list[str], references: list[Image.Image] | None = None
    ) -> dict[str, float]:
        """{"CLIP-T", "CLIP-I", "DINO"} for generated `images` made from `prompts`, against real `references`."""
        metrics = {}
        if self.clip is not None:
            metrics["CLIP-T"] = self.clip_t(images, prompts)
            if references:
                metrics["CLIP-I"] = mean_pairwise_cosine(self.clip_embeddings(images), self.clip_embeddings(references))
        if self.dino is not None and references:
            metrics["DINO"] = mean_pairwise_cosine(self.dino_embeddings(images), self.dino_embeddings(references))
        return metrics
