"""Aspect-ratio buckets for SDXL DreamBooth LoRA (data.buckets=true): the bucket rule, the micro-conditioning of each
image, batches from one bucket (also with prior preservation and the latent cache), the sampler under two ranks
and on a mid-epoch restart, and a short training run through the runner on the tiny SDXL pipeline."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.buckets import BucketSampler, bucket_sizes
from datamodules.dreambooth import DreamBoothDataModule, read_instance_folder
from framework.errors import UserError
from lightning_modules.generation.tiny import save_tiny_sdxl
from tests.conftest import compose_config, read_metrics

RESOLUTION = 256  # buckets 128x512, 192x320, 256x256, 320x192, 512x128 (height x width)
# (width, height) of the test images -> the bucket (height, width) each belongs to, worked out by hand: the bucket
# ratio (width / height) nearest in log ratio to the image's: 3:4 -> 192/320 (0.6), 16:9 -> 320/192 (1.67).
IMAGES = {
    (300, 400): (320, 192),  # 3:4
    (240, 320): (320, 192),  # 3:4
    (200, 200): (256, 256),  # 1:1, upscaled
    (300, 300): (256, 256),  # 1:1
    (448, 252): (192, 320),  # 16:9
    (512, 288): (192, 320),  # 16:9
}


def gradient(width: int, height: int) -> Image.Image:
    """Ramps (red across, green down, blue diagonal): a crop a few pixels off shows, the resize filter hardly."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], -1).astype(np.uint8))


def save_folder(folder: Path, sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        gradient(width, height).save(folder / f"{width}x{height}.png")
    return folder


def expected_view(path: Path, bucket: tuple[int, int]) -> dict:
    """What the model must see of an image (centre crop, no flip), computed here from the geometry alone: scaled
    with its ratio kept until it covers the bucket, then the overhang cut evenly from both sides."""
    image = Image.open(path).convert("RGB")
    height, width = bucket
    scale = max(height / image.height, width / image.width)
    resized = (math.floor(image.width * scale + 1e-9), math.floor(image.height * scale + 1e-9))
    top, left = round((resized[1] - height) / 2), round((resized[0] - width) / 2)
    crop = image.resize(resized, Image.BILINEAR).crop((left, top, left + width, top + height))
    return {
        "original_size": [image.height, image.width],
        "crop_top_left": [top, left],
        "target_size": [height, width],
        "pixels": torch.from_numpy(np.asarray(crop, np.float32) / 127.5 - 1).permute(2, 0, 1),
    }


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    return save_folder(tmp_path_factory.mktemp("buckets") / "subject", IMAGES)


# ----------------------------------------------------------------------------------------------------- the rule
def test_buckets_are_multiples_of_64_of_about_resolution_squared_pixels():
    sdxl = bucket_sizes(1024)
    upright = [(1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1344, 768), (1472, 704), (1600, 640)]
    upright += [(1792, 576), (2048, 512)]  # the SDXL paper's largest bucket per short side, to 4:1
    assert sorted(sdxl) == sorted(set(upright + [(w, h) for h, w in upright]))
    for height, width in sdxl:
        assert height * width <= 1024**2 < (height + 64) * width  # no taller bucket fits the pixel budget
    assert bucket_sizes(RESOLUTION) == [(128, 512), (192, 320), (256, 256), (320, 192), (512, 128)]
    for resolution in (1000, 32, 0):
        with pytest.raises(UserError, match=f"data.buckets=true needs data.resolution .*got {resolution}"):
            DreamBoothDataModule(resolution=resolution, buckets=True)
    DreamBoothDataModule(resolution=1000)  # without buckets any resolution goes


# ------------------------------------------------------------------------------------------- data, no training
def data_module(folder: Path, **overrides) -> DreamBoothDataModule:
    settings = {"resolution": RESOLUTION, "center_crop": True, "buckets": True, "batch_size": 2, **overrides}
    return DreamBoothDataModule(source=partial(read_instance_folder, folder, "a photo of sks dog"), **settings)


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """Stand-in for the VAE: 8 channels at 1/8 of the size, a function of the pixels."""
    return F.avg_pool2d(pixels, 8).repeat(1, 3, 1, 1)[:, :8]


def test_prior_preservation_and_the_latent_cache_go_through_the_same_buckets(instances, tmp_path):
    # Class images: two square (as generated) and one 16:9; the 3:4 bucket has none, so it takes all of them.
    classes = save_folder(tmp_path / "classes", [(64, 64), (80, 80), (448, 252)])
    data = data_module(
        instances, prior_preservation=True, class_prompt="a photo of a dog", class_images=classes, cache_latents=True
    )
    dataset = data.training_images()
    names = [Path(e.image.name).name for e in dataset.classes]
    pairs = {}
    for index in range(len(dataset)):
        size, class_index = dataset.layout(index)
        pairs.setdefault(size, set()).add(names[class_index])
    assert pairs == {
        (256, 256): {"64x64.png", "80x80.png"},
        (192, 320): {"448x252.png"},
        (320, 192): {"448x252.png", "64x64.png"},  # its two items: the first two of all class images
    }

    data.set_latent_cache([(views, fake_encode(pixels)) for views, pixels in data.views_to_encode()])
    shown = {(Path(name).name, size) for name, size in data._latents}
    assert shown == {(Path(e.image.name).name, size) for e, size in dataset.views()}
    assert ("64x64.png", (320, 192)) in shown and ("64x64.png", (256, 256)) in shown  # one class image, two sizes
    for (name, (height, width)), views in data._latents.items():
        assert views[0]["latent_parameters"].shape == (8, height // 8, width // 8), name
        assert views[0]["target_size"].tolist() == [height, width]

    batches = list(data.train_dataloader())
    assert len(batches) == 3 and all(b["num_instance"] == 2 and len(b["prompts"]) == 4 for b in batches)
    for batch in batches:  # instance and class halves in one bucket: one latent size, one target size
        assert len({tuple(t) for t in batch["target_size"].tolist()}) == 1
        assert batch["latent_parameters"].shape[-2:] == tuple(s // 8 for s in batch["target_size"][0].tolist())


def test_a_mid_epoch_restart_replays_the_rest_of_the_epoch():
    buckets = [(256, 256)] * 5 + [(192, 320)] * 3 + [(320, 192)] * 2
    full = list(BucketSampler(buckets, 2, seed=7, position=lambda: (3, 0)))
    assert full == list(BucketSampler(buckets, 2, seed=7, position=lambda: (3, 0)))  # a function of seed, epoch
    assert [i for i, _ in full] != [i for i, _ in BucketSampler(buckets, 2, seed=7, position=lambda: (4, 0))]
    restarted = list(BucketSampler(buckets, 2, seed=7, position=lambda: (3, 4)))  # two batches were trained on
    assert restarted == full[4:]


class ImagesSeen(L.LightningModule):
    """Trains one weight on the batches and notes which images (known by their original size) each held."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append([tuple(size) for size in batch["original_size"].tolist()])
        return (self.weight * batch["pixels"].mean()).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resumes_mid_epoch_with_the_same_batches(instances, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None) -> list:
        torch.manual_seed(3)  # the run's seed (seed_everything): the sampler's
        module = ImagesSeen()
        saving = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[saving]
        )
        trainer.fit(module, datamodule=data_module(instances, batch_size=1), ckpt_path=ckpt_path)
        return module.seen

    uninterrupted = fit(9)  # an epoch and a half: 6 images, one per batch
    assert sorted(size for batch in uninterrupted[:6] for size in batch) == sorted((h, w) for w, h in IMAGES)
    assert fit(9, tmp_path / "step=2.ckpt") == uninterrupted[2:]  # resumed after the second step of the first epoch


def test_two_ranks_get_disjoint_equal_shares_of_one_bucket_batches():
    def one_bucket_batches(share: list[int], buckets: list) -> bool:
        return all(len({buckets[i] for i in share[k : k + 2]}) == 1 for k in range(0, len(share), 2))

    buckets = [(256, 256)] * 8 + [(192, 320)] * 4 + [(320, 192)] * 4
    orders = set()
    for epoch in range(3):
        samplers = [BucketSampler(buckets, 2, seed=1, num_replicas=2, rank=rank) for rank in range(2)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shares = [[i for i, _ in sampler] for sampler in samplers]
        assert len(shares[0]) == len(shares[1]) == len(samplers[0]) == 8
        assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(16))
        assert all(one_bucket_batches(share, buckets) for share in shares)
        orders.add(tuple(shares[0]))
    assert len(orders) == 3  # a new order every epoch
    # A bucket's last batch is filled up with its own items, and the batches (5 here) to a multiple of the ranks
    # with the first ones again: still equal shares of full one-bucket batches, together every item.
    uneven = [(256, 256)] * 5 + [(192, 320)] * 2 + [(320, 192)]
    shares = [[i for i, _ in BucketSampler(uneven, 2, seed=1, num_replicas=2, rank=rank)] for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(BucketSampler(uneven, 2, seed=1, num_replicas=2)) == 6
    assert set(shares[0]) | set(shares[1]) == set(range(8))
    assert all(one_bucket_batches(share, uneven) for share in shares)


# ---------------------------------------------------------------------------------------------------- training
class RecordBatches(L.Callback):
    """Given to the runner as +callbacks.record: saves what every training batch held to `path`."""

    def __init__(self, path: str):
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.batches, self.path)


def test_training_with_buckets_through_the_runner(instances, tmp_path, data_dir):
    from framework.runner import run

    pipeline = save_tiny_sdxl(tmp_path / "pipeline")
    args = [
        "task=sdxl_dreambooth",
        f"model.pretrained={pipeline}",
        "model.vae=null",
        "model.fidelity.clip=null",
        "model.fidelity.dino=null",
        "trainer.precision=32-true",
        f"data.source.folder={instances}",
        f"data.resolution={RESOLUTION}",
        "data.buckets=true",
        "data.center_crop=true",
        "data.batch_size=2",
        "data.test_prompts=[]",
        "trainer.max_steps=3",  # one epoch: 6 images, 3 buckets of 2
        "export_after_train=false",
        "~callbacks.model_summary",
        "logger=csv",
        "+callbacks.record._target_=tests.test_dreambooth_buckets.RecordBatches",
        f"+callbacks.record.path={tmp_path / 'batches.pt'}",
    ]
    run(compose_config(args, tmp_path / "run", data_dir))
    assert np.isfinite(read_metrics(tmp_path / "run")["train/loss"])

    batches = torch.load(tmp_path / "batches.pt", weights_only=False)
    assert len(batches) == 3
    assert sorted({tuple(b["target_size"][0].tolist()) for b in batches}) == [(192, 320), (256, 256), (320, 192)]
    seen = set()
    for batch in batches:
        assert len({tuple(t) for t in batch["target_size"].tolist()}) == 1  # one bucket per batch
        for row, original in enumerate(batch["original_size"].tolist()):
            height, width = original
            expected = expected_view(instances / f"{width}x{height}.png", IMAGES[width, height])
            for key in ("original_size", "crop_top_left", "target_size"):
                assert batch[key][row].tolist() == expected[key], (key, width, height)
            assert batch["pixels"][row].shape == expected["pixels"].shape
            assert (batch["pixels"][row] - expected["pixels"]).abs().mean() < 0.01, (width, height)
            seen.add((width, height))
    assert seen == set(IMAGES)  # one epoch: every image once
