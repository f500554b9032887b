"""CLIP-T, CLIP-I and DINO (lightning_modules/generation/fidelity.py) with tiny CLIP and ViT models from configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.generation.fidelity import Fidelity
from tests.helpers.tiny_models import save_tiny_clip

PAIRS = {"a red square": (220, 30, 30), "a blue circle": (30, 70, 225)}


def picture(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), colour, np.uint8))


def noise_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def test_identical_image_sets_give_clip_i_and_dino_of_one(fidelity_models):
    clip, dino = fidelity_models
    fidelity = Fidelity(clip=str(clip), dino=str(dino))
    image = noise_image(0)
    same = fidelity([image] * 3, ["a photo of sks dog"] * 3, references=[image] * 2)
    assert same["CLIP-I"] == pytest.approx(1.0, abs=1e-5) and same["DINO"] == pytest.approx(1.0, abs=1e-5)
    other = fidelity([image] * 3, ["a photo of sks dog"] * 3, references=[noise_image(1), noise_image(2)])
    assert other["CLIP-I"] < 1 - 1e-4 and other["DINO"] < 1 - 1e-4
    assert set(Fidelity(dino=str(dino))([image], ["x"], [image])) == {"DINO"}  # no CLIP model: no CLIP metrics


@pytest.fixture(scope="module")
def aligned_clip(tmp_path_factory) -> Path:
    """A tiny CLIP trained contrastively until each of two colour pictures matches its own caption.

    A randomly initialised CLIP ranks prompts by chance; after training, a CLIP-T that is computed
    correctly (right embeddings, right pairing, cosine) must rank the matching prompt first.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path_factory.mktemp("aligned") / "clip")
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=list(PAIRS), images=[picture(c) for c in PAIRS.values()], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(30):
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    model.save_pretrained(folder)
    return folder


def test_clip_t_ranks_the_matching_prompt_first(aligned_clip):
    fidelity = Fidelity(clip=str(aligned_clip))
    (red_prompt, red), (blue_prompt, blue) = PAIRS.items()
    assert fidelity.clip_t([picture(red)], [red_prompt]) > fidelity.clip_t([picture(red)], [blue_prompt])
    assert fidelity.clip_t([picture(blue)], [blue_prompt]) > fidelity.clip_t([picture(blue)], [red_prompt])
    matched = fidelity([picture(red), picture(blue)], [red_prompt, blue_prompt])["CLIP-T"]
    swapped = fidelity([picture(red), picture(blue)], [blue_prompt, red_prompt])["CLIP-T"]
    assert 0 <= swapped < matched <= 1


def test_a_missing_embedding_model_names_its_key(tmp_path):
    from framework.errors import UserError

    with pytest.raises(UserError, match=r"model\.fidelity\.dino"):
        Fidelity(dino=str(tmp_path / "no_such_model"))
