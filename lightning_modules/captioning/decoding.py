"""Greedy and batched beam-search decoding over a decoder's `start`/`step` interface."""

from __future__ import annotations

import torch


def _select(tree, index: torch.Tensor):
    """Rows `index` of every tensor in a nested tuple (decoder memory or state)."""
    if isinstance(tree, tuple):
        return tuple(_select(t, index) for t in tree)
    return tree.index_select(0, index)


@torch.no_grad()
def greedy_decode(decoder, features: torch.Tensor, bos: int, eos: int, max_len: int):
    """Most likely word at every step. Returns tokens [B, T] and attention weights [B, T, N] (or None)."""
    memory, state = decoder.start(features)
    tokens = torch.full((features.shape[0],), bos, dtype=torch.long, device=features.device)
    finished = torch.zeros_like(tokens, dtype=torch.bool)
    steps, alphas = [], []
    for _ in range(max_len + 1):  # max_len words and <eos>
        logits, state, alpha = decoder.step(tokens, memory, state)
        tokens = logits.argmax(dim=-1)
        steps.append(tokens)
        alphas.append(alpha)
        finished |= tokens == eos
        if finished.all():
            break
    return torch.stack(steps, 1), (torch.stack(alphas, 1) if alphas[0] is not None else None)


@torch.no_grad()
def beam_search(decoder, features: torch.Tensor, bos: int, eos: int, max_len: int, beam_size: int) -> torch.Tensor:
    """Batched beam search: all images and beams advance together as one batch of B*K rows.

    Scores are summed log-probabilities; a beam that has emitted <eos> keeps its score and only
    extends with <eos>, so it competes unchanged with longer beams. Returns the best tokens [B, T].
    """
    batch, k = features.shape[0], beam_size
    rows = torch.arange(batch, device=features.device).repeat_interleave(k)
    memory, state = decoder.start(features)
    memory, state = _select(memory, rows), _select(state, rows)
    tokens = torch.full((batch * k,), bos, dtype=torch.long, device=features.device)
    scores = torch.full((batch, k), float("-inf"), device=features.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(batch * k, dtype=torch.bool, device=features.device)
    sequences = tokens.new_empty((batch * k, 0))
    for _ in range(max_len + 1):
        logits, state, _ = decoder.step(tokens, memory, state)
        log_probs = logits.float().log_softmax(dim=-1)
        vocab = log_probs.shape[-1]
        done_row = torch.full_like(log_probs[0], float("-inf"))
        done_row[eos] = 0.0
        log_probs = torch.where(finished.unsqueeze(1), done_row, log_probs)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        scores, best = candidates.topk(k, dim=1)
        source = (best // vocab + torch.arange(batch, device=features.device).unsqueeze(1) * k).view(-1)
        tokens = (best % vocab).view(-1)
        sequences = torch.cat([sequences.index_select(0, source), tokens.unsqueeze(1)], dim=1)
        state = _select(state, source)
        finished = finished.index_select(0, source) | (tokens == eos)
        if finished.all():
            break
    winner = scores.argmax(dim=1) + torch.arange(batch, device=features.device) * k
    return sequences.index_select(0, winner)
