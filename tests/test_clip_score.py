"""CLIPScorer against the paper's formulas computed here from a tiny CLIP's own embeddings, one text at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from framework.errors import UserError
from lightning_modules.captioning.clip_score import CLIPScorer
from lightning_modules.generation.fidelity import embedding
from tests.helpers.tiny_models import save_tiny_clip

POOL = ["a red circle", "a blue square", "two green triangles", "a dog", "a cat on a mat", "a large yellow star", "zzz"]
LONG = "a very long caption " * 10  # more tokens than CLIP's 77: cut to them


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip_score") / "clip")


def direct_embeddings(clip_dir: Path, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and "A photo depicts <text>" embeddings, unbatched."""
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = embedding(model.get_image_features(pixel_values=pixels))
        tokens = [processor.tokenizer(["A photo depicts " + t], truncation=True, return_tensors="pt") for t in texts]
        text = [embedding(model.get_text_features(**t)) for t in tokens]
    return F.normalize(image, dim=-1), F.normalize(torch.cat(text), dim=-1)


def test_scores_are_the_papers_formulas_with_negative_cosines_clipped(clip_dir):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    image, pool = direct_embeddings(clip_dir, images, POOL)
    cosines = image @ pool.T
    # the first image gets its least similar caption, which must be negative: its CLIP-S is clipped to 0
    assert cosines[0].min() < 0
    picks = [int(cosines[0].argmin()), int(cosines[1].argmax()), int(cosines[2].argmax())]
    candidates = [POOL[i] for i in picks]
    references = [[POOL[(i + 1) % len(POOL)], POOL[(i + 2) % len(POOL)]] for i in picks]
    references[1][1] = LONG

    _, texts = direct_embeddings(clip_dir, images, candidates + [r for refs in references for r in refs])
    caption, refs = texts[:3], texts[3:].view(3, 2, -1)
    image_text = (image * caption).sum(-1)
    clip_s = 2.5 * image_text.clamp(min=0)
    ref_term = torch.einsum("nd,nrd->nr", caption, refs).max(-1).values.clamp(min=0)
    expected = {"CLIPScore": clip_s.mean(), "RefCLIPScore": (2 * clip_s * ref_term / (clip_s + ref_term)).mean()}
    assert clip_s[0] == 0 and clip_s.mean() != 2.5 * image_text.mean()

    scores = CLIPScorer(str(clip_dir), batch_size=2)(images, candidates, references)  # batches cross images
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(float(value), abs=1e-5), name


def test_a_negative_reference_term_is_clipped_and_two_zeros_give_zero(clip_dir, monkeypatch):
    """The paper clips max_r cos(c, r) at 0 (the reference code does not); CLIP-S and that term both 0 give a harmonic
    mean of 0, not NaN. Texts starting "not " get their embeddings flipped, so that their cosines are negative."""
    scorer = CLIPScorer(str(clip_dir))
    embed = scorer.text_embeddings

    def flipped(texts: list[str]) -> torch.Tensor:
        return embed(texts) * torch.tensor([[-1.0] if text.startswith("not ") else [1.0] for text in texts])

    monkeypatch.setattr(scorer, "text_embeddings", flipped)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    candidates = ["a dog", "not a dog"]
    references = [["not a dog", "not a cat on a mat"], ["a dog", "a cat on a mat"]]
    caption = scorer.text_embeddings(candidates)
    for i, refs in enumerate(references):
        assert (scorer.text_embeddings(refs) @ caption[i] < 0).all()
    image_text = scorer.image_embeddings([image, image]) @ caption.T
    assert image_text[0, 0] > 0 > image_text[1, 1]  # a positive CLIP-S beside a zero one

    scores = scorer([image, image], candidates, references)
    assert scores == pytest.approx({"CLIPScore": 2.5 * float(image_text[0, 0]) / 2, "RefCLIPScore": 0.0}, abs=1e-6)


def test_a_missing_folder_names_the_config_key(tmp_path):
    with pytest.raises(UserError, match=r"model\.metrics\.clip"):
        CLIPScorer(str(tmp_path / "missing"))
