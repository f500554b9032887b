"""CLIPScore and RefCLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning").

torchmetrics 1.9's CLIPScore is not used: it would take the loaded model through a callable, but with transformers 5 it
fails (`get_image_features` returns a model output, not a tensor), it drops PIL images (it takes tensors only), it
clips the mean cosine at 0 rather than each image's, and it cuts long captions by slicing off their end-of-text token
(the one CLIP pools). The embeddings come from CLIPModel.get_image_features / get_text_features here instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from framework.pretrained import load_offline
from lightning_modules.generation.fidelity import embedding

KEY = "model.metrics.clip"
PREFIX = "A photo depicts "  # jmhessel/clipscore's CLIPCapDataset prompt, on candidates and references alike
W = 2.5  # the paper's rescaling of the image-text cosine


class CLIPScorer:
    """{"CLIPScore", "RefCLIPScore"} of candidate captions, averaged over their images, as the paper defines them:

    - CLIP-S(c, v) = W * max(cos(c, v), 0), of the candidate's and the image's CLIP embeddings;
    - RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0)), r over the image's references (no W).

    Every text is prefixed with "A photo depicts " and truncated to CLIP's text length, as in the reference code
    (jmhessel/clipscore). The paper's eq. 2 clips the reference term at 0, which that code leaves out; the paper is
    followed. A harmonic mean of two zeros is 0. The paper's numbers are with openai/clip-vit-base-patch32.

    `pretrained` is a save_pretrained folder of a CLIPModel and CLIPProcessor or a hub id in the local Hugging Face
    cache (nothing is downloaded); loading takes a while, so build one and keep it.
    """

    def __init__(self, pretrained: str, device: torch.device | str = "cpu", batch_size: int = 64):
        self.model = load_offline(CLIPModel.from_pretrained, pretrained, KEY).eval().to(device)
        self.processor = load_offline(CLIPProcessor.from_pretrained, pretrained, KEY)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit CLIP embeddings of the images, `batch_size` at a time."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            chunks.append(embedding(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP embeddings of "A photo depicts <text>", cut to the text model's length, `batch_size` at a time."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                [PREFIX + text for text in texts[start : start + self.batch_size]],
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            chunks.append(embedding(self.model.get_text_features(**tokens.to(self.device))))
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def __call__(
        self, images: list[Image.Image], candidates: list[str], references: list[list[str]]
    ) -> dict[str, float]:
        """The mean CLIP-S and RefCLIP-S of candidates[i] for images[i], with references[i] (one or more)."""
        if not images or not len(images) == len(candidates) == len(references):
            raise ValueError(
                f"CLIPScorer: needs as many images, candidates and reference lists, at least one "
                f"(got {len(images)}, {len(candidates)}, {len(references)})"
            )
        if missing := [i for i, refs in enumerate(references) if not refs]:
            raise ValueError(f"CLIPScorer: no references for images {missing}")
        captions = self.text_embeddings(candidates)
        clip_s = W * (self.image_embeddings(images) * captions).sum(-1).clamp(min=0)
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs], device=captions.device)
        cosines = (self.text_embeddings([r for refs in references for r in refs]) * captions[owner]).sum(-1)
        best = torch.full_like(clip_s, -1.0).scatter_reduce(0, owner, cosines, "amax").clamp(min=0)
        total = clip_s + best
        ref_clip_s = torch.where(total > 0, 2 * clip_s * best / total, torch.zeros_like(total))
        return {"CLIPScore": float(clip_s.mean()), "RefCLIPScore": float(ref_clip_s.mean())}
