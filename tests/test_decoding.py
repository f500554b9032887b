"""Greedy and beam search decode the same model; beam search is exact when the beam holds everything."""

import itertools

import pytest
import torch

from lightning_modules.captioning.decoding import beam_search, greedy_decode
from lightning_modules.captioning.nets import RNNDecoder

BOS, EOS = 1, 2


def trim(row: torch.Tensor) -> list[int]:
    """Tokens up to and including the first <eos>."""
    out = []
    for token in row.tolist():
        out.append(token)
        if token == EOS:
            break
    return out


@pytest.fixture(params=[("lstm", True), ("gru", False)], ids=["lstm-attention", "gru-pooled"])
def decoder(request):
    torch.manual_seed(0)
    rnn, attention = request.param
    return RNNDecoder(
        vocab_size=12,
        feature_dim=8,
        rnn=rnn,
        attention=attention,
        embed_dim=8,
        hidden_dim=16,
        attention_dim=8,
        dropout=0.0,
    ).eval()


def test_beam_size_one_equals_greedy(decoder):
    features = torch.randn(16, 5, 8)
    greedy = greedy_decode(decoder, features, BOS, EOS, max_len=10)[0]
    beam = beam_search(decoder, features, BOS, EOS, max_len=10, beam_size=1)
    assert [trim(r) for r in greedy] == [trim(r) for r in beam]


@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_equals_one_image_at_a_time(decoder, beam_size):
    features = torch.randn(6, 5, 8)
    batched = beam_search(decoder, features, BOS, EOS, max_len=10, beam_size=beam_size)
    for i in range(len(features)):
        alone = beam_search(decoder, features[i : i + 1], BOS, EOS, max_len=10, beam_size=beam_size)
        assert trim(batched[i]) == trim(alone[0])


def sequence_log_prob(decoder, features, tokens: list[int]) -> float:
    memory, state = decoder.start(features)
    total, previous = 0.0, torch.tensor([BOS])
    for token in tokens:
        logits, state, _ = decoder.step(previous, memory, state)
        total += logits.log_softmax(-1)[0, token].item()
        previous = torch.tensor([token])
    return total


def test_wide_beam_finds_the_most_likely_caption(decoder):
    """With a beam as wide as all candidates, beam search must return the exhaustive-search optimum."""
    max_len, vocab = 2, 12
    features = torch.randn(1, 5, 8)
    words = [t for t in range(vocab) if t != EOS]
    candidates = [[*c, EOS] for n in range(max_len + 1) for c in itertools.product(words, repeat=n)]
    candidates += [list(c) for c in itertools.product(words, repeat=max_len + 1)]  # cut at max_len, no <eos>
    best = max(candidates, key=lambda c: sequence_log_prob(decoder, features, c))
    found = beam_search(decoder, features, BOS, EOS, max_len=max_len, beam_size=vocab**2)
    assert trim(found[0]) == best


def test_greedy_returns_attention_per_step():
    torch.manual_seed(0)
    decoder = RNNDecoder(
        vocab_size=12,
        feature_dim=8,
        rnn="lstm",
        attention=True,
        embed_dim=8,
        hidden_dim=16,
        attention_dim=8,
        dropout=0.0,
    ).eval()
    tokens, alphas = greedy_decode(decoder, torch.randn(3, 5, 8), BOS, EOS, max_len=4)
    assert alphas.shape == (3, tokens.shape[1], 5)
    assert torch.allclose(alphas.sum(-1), torch.ones(3, tokens.shape[1]))
