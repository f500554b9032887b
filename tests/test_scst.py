"""The pieces of self-critical training: the CIDEr-D reward and sampling with gradients."""

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from lightning_modules.captioning.cider import CiderD
from lightning_modules.captioning.decoding import sample_decode
from lightning_modules.captioning.nets import RNNDecoder

REFERENCES = {
    1: ["a red circle", "a small red circle", "there is a red circle"],
    2: ["a blue square left of a green circle", "there is a blue square", "a green circle right of a blue square"],
    3: ["a large yellow diamond", "one yellow diamond"],
}


def cider_d(references=REFERENCES):
    return CiderD([[r.split() for r in refs] for refs in references.values()])


def test_matches_pycocoevalcap_cider_given_the_same_document_frequencies():
    """pycocoevalcap's Cider is coco-caption's CIDEr-D with frequencies from the references it is given:
    scored over the same corpus, the two agree, repetitions (clipped matches) included."""
    candidates = {1: "red red red red", 2: "a blue square", 3: "one large diamond"}
    _, expected = Cider().compute_score(REFERENCES, {i: [c] for i, c in candidates.items()})
    scorer = cider_d()
    ours = [scorer.score(candidates[i].split(), [r.split() for r in REFERENCES[i]]) for i in REFERENCES]
    assert ours == pytest.approx(list(expected), rel=1e-9)


def test_clipping_penalises_repetition():
    scorer = cider_d()
    references = [r.split() for r in REFERENCES[1]]
    assert scorer.score("red red red red".split(), references) < scorer.score("a red circle".split(), references)
    assert scorer.score("a red circle".split(), references) == scorer.score("a red circle".split(), references[::-1])


def test_sample_decode_masks_after_eos_and_has_gradients():
    torch.manual_seed(0)
    decoder = RNNDecoder(vocab_size=10, feature_dim=6, embed_dim=8, hidden_dim=12, attention_dim=8)
    tokens, log_probs, mask = sample_decode(decoder, torch.randn(3, 4, 6), bos=1, eos=2, max_len=6, num_samples=4)
    assert tokens.shape == log_probs.shape == mask.shape and tokens.shape[0] == 12
    assert (log_probs <= 0).all() and log_probs.requires_grad
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        length = row.index(2) + 1 if 2 in row else len(row)
        assert row_mask == [True] * length + [False] * (len(row) - length)
    (log_probs * mask).sum().backward()
    assert decoder.output.weight.grad.abs().sum() > 0
