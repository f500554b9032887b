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


def sample_decode(decoder, features: torch.Tensor, bos: int, eos: int, max_len: int, num_samples: int):
    """`num_samples` captions per image drawn from the model (with gradients, for policy-gradient training).

    Returns tokens [B*S, T] (the S samples of an image are adjacent), their log-probabilities [B*S, T]
    and a mask [B*S, T] that is true up to and including each caption's <eos>.
    """
    memory, state = decoder.start(features)
    state = _select(state, torch.arange(len(features), device=features.device).repeat_interleave(num_samples))
    tokens = torch.full((len(features) * num_samples,), bos, dtype=torch.long, device=features.device)
    finished = torch.zeros_like(tokens, dtype=torch.bool)
    steps, log_probs, masks = [], [], []
    for _ in range(max_len + 1):
        logits, state, _ = decoder.step(tokens, memory, state)
        step_log_probs = logits.float().log_softmax(dim=-1)
        tokens = torch.multinomial(step_log_probs.detach().exp(), 1).squeeze(1)
        steps.append(tokens)
        log_probs.append(step_log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        masks.append(~finished)
        finished = finished | (tokens == eos)
        if finished.all():
            break
    return torch.stack(steps, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


@torch.no_grad()
def beam_search(decoder, features: torch.Tensor, bos: int, eos: int, max_len: int, beam_size: int) -> torch.Tensor:
    """Batched beam search: all images and beams advance together as one batch of B*K rows.

    Scores are summed log-probabilities; a beam that has emitted <eos> keeps its score and only
    extends with <eos>, so it competes unchanged with longer beams. The K beams of an image share its
    encoder memory (beams are only reordered within an image), and an image leaves the batch as soon
    as all its beams have ended. Returns the best tokens [B, T], padded with <eos>.
    """
    k, device = beam_size, features.device
    memory, state = decoder.start(features)
    state = _select(state, torch.arange(len(features), device=device).repeat_interleave(k))
    images = torch.arange(len(features), device=device)  # the input image of each image still decoding
    tokens = torch.full((len(features) * k,), bos, dtype=torch.long, device=device)
    scores = torch.full((len(features), k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros_like(tokens, dtype=torch.bool)
    sequences = tokens.new_empty((len(tokens), 0))
    best: list[torch.Tensor] = [tokens.new_empty(0)] * len(features)
    for step in range(max_len + 1):  # max_len words and <eos>
        live = len(images)
        logits, state, _ = decoder.step(tokens, memory, state)
        log_probs = logits.float().log_softmax(dim=-1)
        vocab = log_probs.shape[-1]
        done_row = torch.full_like(log_probs[0], float("-inf"))
        done_row[eos] = 0.0
        log_probs = torch.where(finished.unsqueeze(1), done_row, log_probs)
        scores, top = (scores.view(-1, 1) + log_probs).view(live, k * vocab).topk(k, dim=1)
        source = (top // vocab + torch.arange(live, device=device).unsqueeze(1) * k).view(-1)
        tokens = (top % vocab).view(-1)
        sequences = torch.cat([sequences.index_select(0, source), tokens.unsqueeze(1)], dim=1)
        state = _select(state, source)
        finished = finished.index_select(0, source) | (tokens == eos)
        done = finished.view(live, k).all(dim=1) | (step == max_len)
        if done.any():
            winners = scores.argmax(dim=1)
            for i in done.nonzero().flatten().tolist():
                best[images[i]] = sequences[i * k + winners[i]]
            keep = (~done).nonzero().flatten()
            if not len(keep):
                break
            rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
            memory, state, images, scores = _select(memory, keep), _select(state, rows), images[keep], scores[keep]
            tokens, finished, sequences = tokens[rows], finished[rows], sequences[rows]
    return torch.nn.utils.rnn.pad_sequence(best, batch_first=True, padding_value=eos)
