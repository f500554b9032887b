"""A training order that is a function of (seed, epoch) alone, so that a resumed run sees the same batches.

The default RandomSampler draws its permutation from the global RNG when an epoch starts, and
datasets that pick one of several captions draw from it again per item; after a mid-epoch resume
neither can be replayed. `EpochSampler` instead derives the permutation and a per-item seed from
(seed, epoch), shards them over the ranks like DistributedSampler, and on a mid-epoch restart skips
the samples the interrupted run had already trained on. `ResumableLoader` is the training loader over it: resumable
in Lightning's sense, so Lightning does not warn that a mid-epoch resume is unreliable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger(__name__)


def item_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """(index, per-item seed) from what a sampler yields: EpochSampler's pairs or a plain index."""
    return key if isinstance(key, tuple) else (key, None)


def fit_position(trainer, batch_size: int) -> Callable[[], tuple[int, int]]:
    """EpochSampler's `position` under `trainer`: the epoch, and on a mid-epoch restart the samples this rank already
    trained on in it (`batch_size`: per device)."""

    def position() -> tuple[int, int]:
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed * batch_size if loop.restarting else 0
        return trainer.current_epoch, done

    return position


class EpochSampler(DistributedSampler):
    """Yields (index, item seed) pairs; a DistributedSampler subclass, so Lightning keeps it under DDP.

    `position()` gives (epoch, samples of this rank already trained on in it), read when an epoch's
    iteration starts: loader workers start consuming the sampler before Lightning calls `set_epoch`
    on a resumed run, so the trainer's own counters are the reliable source. Without it, the epoch
    comes from `set_epoch` and nothing is skipped.
    """

    def __init__(
        self,
        length: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.position = position or (lambda: (self.epoch, 0))

    def generator(self, epoch: int) -> torch.Generator:
        # Modulo 2**63: unseeded (seed=null), torch's initial seed is any 64-bit number, too large for manual_seed.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, done = self.position()
        generator = self.generator(epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        item_seeds = torch.randint(2**31 - 1, (len(self.dataset),), generator=generator)
        order = torch.cat([order, order[: self.total_size - len(order)]])  # pad to an even shard size
        shard = order[self.rank : self.total_size : self.num_replicas][done:]
        return iter([(int(i), int(item_seeds[i])) for i in shard])


class ResumableLoader(DataLoader):
    """A training DataLoader over an `EpochSampler`, stateful as Lightning counts it (`state_dict`/`load_state_dict`,
    kept in checkpoints): the order of an epoch is a function of (seed, epoch) and the sampler finds where to go on
    from the trainer's progress, so the state is the seed, and loading it checks that the resumed run has it."""

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            log.warning(
                "the checkpoint's training order came from seed %s, this run's from %s: the rest of the interrupted "
                "epoch is not what the interrupted run would have trained (resume with its seed for the same run)",
                state["seed"],
                self.seed,
            )

    @property
    def seed(self) -> int | None:
        # None where Lightning replaced the sampler (trainer.overfit_batches: the same batches every epoch).
        return getattr(self.sampler, "seed", None)
