"""What a distributed run shares: objects from every rank, global-batch loss means and per-device batch sizes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.errors import UserError


def gather_objects(obj) -> list:
    """A list with `obj` from every rank (just [obj] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def global_token_mean(token_losses_sum: torch.Tensor, tokens: int | torch.Tensor) -> torch.Tensor:
    """Sum over this rank's tokens, divided so that DDP's gradient averaging yields the gradient of the mean over
    the tokens of the whole global batch - what one process with the same global batch computes (per-rank means
    would weight the tokens of ranks with shorter captions more). Not distributed: the plain mean."""
    tokens = torch.as_tensor(tokens, dtype=torch.float32, device=token_losses_sum.device)
    if not (dist.is_available() and dist.is_initialized()):
        return token_losses_sum / tokens.clamp(min=1)
    world_tokens = tokens.clone()
    dist.all_reduce(world_tokens)
    return token_losses_sum * dist.get_world_size() / world_tokens.clamp(min=1)


def per_device_batch_size(batch_size: int, trainer, key: str = "data.batch_size") -> int:
    """`batch_size` is the global batch of one optimizer step: split over devices x nodes and accumulated batches."""
    if trainer is None:
        return batch_size
    parts = trainer.world_size * trainer.accumulate_grad_batches
    if batch_size % parts:
        raise UserError(
            f"{key}={batch_size} is the global batch and must be divisible by world size x "
            f"trainer.accumulate_grad_batches = {trainer.world_size} x {trainer.accumulate_grad_batches}"
        )
    return batch_size // parts
