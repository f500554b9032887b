"""Aspect-ratio buckets (data.buckets=true): every training image keeps its aspect ratio.

The buckets for `data.resolution` R (a multiple of 64) are the (height, width) pairs of multiples of 64 with at most
R^2 pixels, aspect ratio from 1:4 to 4:1: for every short side s = 64, 128, ..., R the long side is the largest
multiple of 64 with s x long <= R^2, in both orientations (kohya's sd-scripts rule; the SDXL paper's buckets span
the same ratios at about 1024^2 pixels). R = 1024 gives 1024x1024, 960x1088, 896x1152, ..., 512x2048 and their
transposes. Each image goes to the bucket nearest its ratio (in log ratio, so that 2:1 and 1:2 are as far from
1:1), is resized to cover it with its ratio kept and then cropped by the few pixels that overhang (centre or random,
as data.center_crop says); its SDXL micro-conditioning is its original size, that crop's corner and the bucket.

`Buckets` assigns every training item (an instance example, with prior preservation paired with a class example)
to a bucket; `BucketSampler` orders the items so that every batch comes from one bucket.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch

from datamodules.sampling import EpochSampler
from framework.errors import UserError

log = logging.getLogger(__name__)

STEP = 64  # SDXL latents are 1/8 of the image and the UNet halves them twice more: sides in multiples of 64
MAX_RATIO = 4


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """The (height, width) buckets of about resolution^2 pixels (see the module docstring), sorted."""
    if not isinstance(resolution, int) or resolution < STEP or resolution % STEP:
        raise UserError(
            f"data.buckets=true needs data.resolution to be a multiple of {STEP} (got {resolution}): bucket sides "
            f"are multiples of {STEP} with about data.resolution^2 pixels, e.g. data.resolution=1024"
        )
    units = (resolution // STEP) ** 2
    sizes = set()
    for short in range(1, resolution // STEP + 1):
        long = units // short
        if long <= MAX_RATIO * short:
            sizes |= {(short * STEP, long * STEP), (long * STEP, short * STEP)}
    return sorted(sizes)


def nearest_bucket(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to that of an image; ties go to the first."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[1] / size[0]) - ratio))


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image scaled, with its aspect ratio, to cover `target` (height, width): the side that
    binds is scaled to the target's, the other truncated as torchvision's shorter-side resize does (so that a square
    target gives exactly the shorter-side resize)."""
    target_height, target_width = target
    if target_height * width >= target_width * height:
        return target_height, max(target_width, int(width * target_height / height))
    return max(target_height, int(height * target_width / width)), target_width


class Buckets:
    """The bucket of every training item, and which class example each item is paired with.

    Item `i` holds instance `i % len(instances)` (as without buckets) and goes to that image's bucket. Class images
    (prior preservation) are bucketed by the same rule; an item's class example is the next one, in turn, of the
    class images in its bucket, or, where a bucket has none (class images generated square, instances not), of all
    of them, each then resized and cropped into the item's bucket like any image (the micro-conditioning says so).
    """

    def __init__(self, resolution: int, instances: Sequence, classes: Sequence, length: int):
        self.sizes = bucket_sizes(resolution)
        bucket_of = {}  # image name -> bucket, from its upright size (Example.size: as the image is loaded)
        for example in (*instances, *classes):
            width, height = example.size
            bucket_of[example.image.name] = nearest_bucket(height, width, self.sizes)
        self.item_sizes = [bucket_of[instances[i % len(instances)].image.name] for i in range(length)]
        self.class_indices: list[int | None] = []
        pools = {
            size: [j for j, c in enumerate(classes) if bucket_of[c.image.name] == size] or list(range(len(classes)))
            for size in set(self.item_sizes)
        }
        used = Counter()
        for size in self.item_sizes:
            pool = pools[size]
            self.class_indices.append(pool[used[size] % len(pool)] if pool else None)
            used[size] += 1
        log.info(
            "aspect-ratio buckets (height x width: training items): %s",
            ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(Counter(self.item_sizes).items())),
        )

    def item(self, index: int) -> tuple[tuple[int, int], int | None]:
        """The (height, width) of item `index`'s examples and the index of its class example (None: no classes)."""
        return self.item_sizes[index], self.class_indices[index]


class BucketSampler(EpochSampler):
    """An `EpochSampler` (a function of seed and epoch, sharded over the ranks, skipping on a mid-epoch restart what
    the interrupted run trained on) whose keys come in runs of `batch_size` from one bucket: the loader's batches.

    Per epoch, each bucket's items are shuffled and cut into batches of `batch_size` (the last one filled up with
    the bucket's first items again, as DistributedSampler pads), the batches are shuffled, and rank r takes every
    r-th of them, the list first filled up with its own first batches to a multiple of the ranks. So every rank gets
    as many batches, each of `batch_size` from one bucket, and the ranks' shares overlap only in that filling (per
    rank, not per step: with a few images per bucket, one bucket for all ranks would repeat most of them).
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        super().__init__(len(buckets), seed, num_replicas, rank, position)
        self.buckets, self.batch_size = list(buckets), batch_size
        batches = sum(math.ceil(n / batch_size) for n in Counter(self.buckets).values())
        self.num_samples = math.ceil(batches / num_replicas) * batch_size
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, done = self.position()
        generator = self.generator(epoch)
        item_seeds = torch.randint(2**31 - 1, (len(self.buckets),), generator=generator)
        batches = []
        for size in sorted(set(self.buckets)):
            members = torch.tensor([i for i, bucket in enumerate(self.buckets) if bucket == size])
            members = members[torch.randperm(len(members), generator=generator)]
            padded = members[torch.arange(math.ceil(len(members) / self.batch_size) * self.batch_size) % len(members)]
            batches += padded.split(self.batch_size)
        order = torch.randperm(len(batches), generator=generator)
        order = order[torch.arange(self.total_size // self.batch_size) % len(order)]
        shard = [int(i) for b in order[self.rank :: self.num_replicas] for i in batches[b]][done:]
        return iter([(i, int(item_seeds[i])) for i in shard])
