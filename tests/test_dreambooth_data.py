"""SDXL DreamBooth LoRA's data side: instance folders and captioned images (bad input too: broken links, images
above the pixel limit, prompt files), settings checked before anything is built, photos turned by their EXIF
orientation, the micro-conditioning of crops and flips, the resize filter, images decoded and resized once;
aspect-ratio buckets (data.buckets=true): the bucket rule, the micro-conditioning of each image, batches from one
bucket (also with prior preservation and the latent cache), the sampler under two ranks and on a mid-epoch restart,
and a short training run through the runner on the tiny SDXL pipeline. The module and its training:
tests/test_dreambooth.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from datamodules.buckets import BucketSampler, bucket_sizes
from datamodules.dreambooth import DreamBoothDataModule
from framework.checks import check_config
from framework.errors import UserError
from lightning_modules.generation.tiny import save_tiny_sdxl
from tests.helpers.config import compose_config, read_metrics
from tests.helpers.dreambooth import dreambooth_data, save_images

RESOLUTION = 256  # of the bucket tests: buckets 128x512, 192x320, 256x256, 320x192, 512x128 (height x width)


# ---------------------------------------------------------------------------------------------------- instance images
def test_bad_instance_folders(tmp_path, caplog):
    from datamodules.dreambooth import read_captioned_images, read_instance_folder

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        read_instance_folder(empty, "a photo of sks dog")
    with pytest.raises(UserError, match="does not exist"):
        read_instance_folder(tmp_path / "missing", "a photo of sks dog")

    folder = save_images(tmp_path / "small", 2, size=32)
    (folder / "notes.txt").write_text("x")
    (folder / "labels.csv").write_text("x")
    save_images(folder / "more", 1, size=32)  # the one listing rule (datamodules.images): subfolders are read,
    save_images(folder / ".cache", 1, size=32)  # hidden files and folders are not
    (folder / "._img_0.png").write_bytes(b"macOS metadata")
    os.symlink(folder / "gone.png", folder / "img_9.png")  # a link to an image that is no longer there
    caplog.clear()
    data = dreambooth_data(folder, "a photo of a dog", trigger_token="sks", resolution=64)
    assert [example.image.path.relative_to(folder).as_posix() for example in data.instances] == [
        "img_0.png",
        "img_1.png",
        "more/img_0.png",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the broken link is named with the other files skipped, not dropped silently
    assert sum("not images" in w and "img_9.png (a broken link), labels.csv, notes.txt" in w for w in warnings) == 1
    assert any("smaller than data.resolution=64" in w for w in warnings)
    assert any("lack the trigger token 'sks'" in w for w in warnings)

    (tmp_path / "captioned").mkdir()
    (tmp_path / "captioned" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="line 1.*'prompt'"):
        read_captioned_images(tmp_path / "captioned", "prompt", "image")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install datasets"):
            read_captioned_images(tmp_path / "hf", "prompt", "image")


def test_micro_conditioning_follows_the_crop_and_the_flip():
    from datamodules.dreambooth import crop_and_flip
    from lightning_modules.generation.sdxl import time_ids

    image = Image.fromarray(np.arange(64 * 80 * 3, dtype=np.uint8).reshape(64, 80, 3))
    plain = crop_and_flip(image, (64, 64), (0, 4), flip=False)
    mirrored = crop_and_flip(image, (64, 64), (0, 4), flip=True)
    assert plain["crop_top_left"].tolist() == [0, 4] and mirrored["crop_top_left"].tolist() == [0, 80 - 4 - 64]
    assert torch.equal(mirrored["pixels"], plain["pixels"].flip(-1))
    ids = time_ids(torch.tensor([[300, 400]]), torch.tensor([[0, 12]]), torch.tensor([[64, 64]]))
    assert ids.tolist() == [[300, 400, 0, 12, 64, 64]]


def test_interpolation_is_the_resize_filter(dog, tmp_path, data_dir):
    import numpy as np
    from torchvision.transforms import functional as TF

    from framework.runner import instantiate

    def resized(name: str) -> np.ndarray:
        args = ["task=sdxl_dreambooth", f"data.source.folder={dog}", f"data.interpolation={name}"]
        data = instantiate(compose_config(args, tmp_path, data_dir).data)
        dataset = data.training_images()
        return np.asarray(dataset.resized(dataset.instances[0], (32, 32))[0])  # resized to cover 32 x 32

    original = np.asarray(Image.open(dog / "img_0.png"))  # two colours, 64 x 72 pixels
    colours = {tuple(c) for c in original.reshape(-1, 3)}
    nearest, lanczos = resized("nearest"), resized("lanczos")
    assert nearest.shape == lanczos.shape == (32, 36, 3)
    assert {tuple(c) for c in nearest.reshape(-1, 3)} <= colours  # nearest neighbour makes no new colours
    expected = TF.resize(Image.open(dog / "img_0.png"), [32, 36], interpolation=TF.InterpolationMode.LANCZOS)
    np.testing.assert_array_equal(lanczos, np.asarray(expected))
    assert not np.array_equal(lanczos, resized("bilinear"))
    cubic = compose_config(["task=sdxl_dreambooth", "data.interpolation=cubic"], tmp_path, data_dir)
    with pytest.raises(UserError, match=r"data.interpolation=cubic: takes one of nearest, nearest_exact, bilinear"):
        check_config(cubic)  # before anything is built


def test_images_are_decoded_and_resized_once_and_cropped_every_step(dog, monkeypatch):
    from datamodules import dreambooth_items
    from datamodules.dreambooth_sources import FileImage

    loads = []
    load = FileImage.load
    monkeypatch.setattr(FileImage, "load", lambda self: (loads.append(Path(self.name).name), load(self))[1])
    data = dreambooth_data(dog, resolution=64)
    dataset = data.training_images()
    loads.clear()  # reading the folder checks every image once
    crops = {tuple(dataset[(0, seed)]["instance"]["crop_top_left"].tolist()) for seed in range(8)}
    assert loads == ["img_0.png"] and len(crops) > 1  # one decode; a crop drawn per item (64 x 72 px: 8 to spare)
    monkeypatch.setattr(dreambooth_items, "RESIZED_KEPT", 1)
    for index in (1, 0, 0):
        dataset[(index, 0)]
    assert loads == ["img_0.png", "img_1.png", "img_0.png"]  # one kept: the least recently used goes


def test_imagefolder_metadata_csv_with_another_caption_column(dog, tmp_path, data_dir):
    import shutil

    from framework.runner import instantiate

    folder = tmp_path / "icons"
    folder.mkdir()
    shutil.copy(dog / "img_0.png", folder / "a.png")
    (folder / "metadata.csv").write_text('file_name,text\na.png,"a TOK dog, sitting"\n')
    args = ["task=sdxl_lora_3d_icons", f"data.source.folder={folder}", "data.source.prompt_column=text"]
    data = instantiate(compose_config(args, tmp_path, data_dir).data)
    assert [(e.image.name, e.prompt) for e in data.instances] == [(str(folder / "a.png"), "a TOK dog, sitting")]
    # as a spreadsheet saves it: a byte-order mark must not hide the first column's name
    (folder / "metadata.csv").write_text('\ufefffile_name,text\na.png,"a TOK dog, sitting"\n', encoding="utf-8")
    data = instantiate(compose_config(args, tmp_path, data_dir).data)
    assert [(e.image.name, e.prompt) for e in data.instances] == [(str(folder / "a.png"), "a TOK dog, sitting")]
    with pytest.raises(UserError, match=r"metadata.csv, line 2: expected a row with 'file_name' and 'prompt'"):
        instantiate(compose_config(args[:2], tmp_path, data_dir).data).train_prompts()


def test_an_image_above_the_pixel_limit_is_a_named_bad_image_that_can_be_skipped(tmp_path, monkeypatch, caplog):
    from PIL import Image as PILImage

    folder = save_images(tmp_path / "subject", 1, size=64)  # 64 x 72 px
    save_images(tmp_path / "small", 1, size=8)
    (tmp_path / "small" / "img_0.png").rename(folder / "tiny.png")  # 8 x 16 px
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # framework.images' limit, lowered: 64 x 72 px is above
    with pytest.raises(UserError, match=r"cannot read image .*img_0.png: .*images are limited to .*skip_bad_images"):
        dreambooth_data(folder).setup("fit")
    caplog.clear()
    data = dreambooth_data(folder, skip_bad_images=True)
    data.setup("fit")
    assert [Path(e.image.name).name for e in data.instances] == ["tiny.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("skipped 1 unreadable images" in w and "img_0.png" in w for w in warnings)


def test_training_reads_its_images_before_work_and_predict_does_not(tmp_path):
    data = dreambooth_data(tmp_path / "missing")
    data.setup("predict")  # generating images needs no training images
    with pytest.raises(UserError, match=r"image folder .*missing does not exist \(set data.source.folder"):
        data.setup("fit")  # before class images are generated or latents cached (framework/preparation.py)


def test_prompt_files_are_read_when_the_data_is_built(tmp_path):
    prompts = tmp_path / "prompts.txt"  # as a Windows editor saves it: a byte-order mark, blank lines, CRLF
    prompts.write_text("\ufeffa photo of sks dog\r\n\r\n  sks dog on a beach  \r\n", encoding="utf-8")
    data = dreambooth_data(None, prompts=str(prompts), validation_prompts=[], test_prompts=None)
    assert data.prompt_sets == {"val": [], "test": [], "predict": ["a photo of sks dog", "sks dog on a beach"]}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=rf"data.test_prompts={empty}: the prompts file holds no prompt"):
        dreambooth_data(None, test_prompts=str(empty))
    with pytest.raises(UserError, match=r"data.prompts=.*missing.txt: cannot read the prompts file"):
        dreambooth_data(None, prompts=str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match=r"mode=predict needs prompts: set data.prompts"):
        dreambooth_data(None, prompts=None).predict_dataloader()


def test_bad_settings_are_named_before_anything_is_built(tmp_path, data_dir):
    # Every problem of a config at once, one line per key (framework/schema.py, from the signatures' annotations).
    # The model generates at data.resolution (its data input): a resolution SDXL cannot take is named once.
    bad = {
        "data.resolution=100": "data.resolution=100: takes a whole number >= 64, a multiple of 8",
        "data.interpolation=cubic": "data.interpolation=cubic: takes one of nearest, nearest_exact, bilinear, "
        "bicubic, box, hamming, lanczos",
        "data.batch_size=0": "data.batch_size=0: takes a whole number >= 1",
        "data.class_batch_size=0": "data.class_batch_size=0: takes a whole number >= 1",
        "data.seeds=[0,-1]": "data.seeds[1]=-1: takes a whole number >= 0 and <= 4294967295",
        "data.validation_prompts=[a dog,3]": "data.validation_prompts=[a dog,3]: takes a list of text values or "
        "text, a readable file or null",
        f"data.prompts={tmp_path / 'missing.txt'}": f"data.prompts={tmp_path / 'missing.txt'}: takes a list of text "
        "values or text, a readable file or null",
        "model.lora.rank=0": "model.lora.rank=0: takes a whole number >= 1",
        "model.lora.dropout=1.0": "model.lora.dropout=1.0: takes a number >= 0 and < 1",
        "model.lora.target_modules=[]": "model.lora.target_modules=[]: takes a list of text values, at least one",
        "model.inference.num_inference_steps=0": "model.inference.num_inference_steps=0: takes a whole number >= 1",
        "model.prediction_type=sample": "model.prediction_type=sample: takes one of epsilon, v_prediction (or null)",
        "model.card.prior_preservation=maybe": "model.card.prior_preservation=maybe: takes true or false",
        f"model.lora_weights={tmp_path / 'no_export'}": f"model.lora_weights={tmp_path / 'no_export'}: takes an "
        "existing file or folder (or null)",
        "callbacks.diffusion_samples.tile=0": "callbacks.diffusion_samples.tile=0: takes a whole number >= 1",
    }
    cfg = compose_config(["task=sdxl_dreambooth", *bad], tmp_path, data_dir)
    with pytest.raises(UserError) as error:
        check_config(cfg)
    lines = str(error.value).splitlines()
    assert set(bad.values()) <= set(lines), sorted(set(bad.values()) - set(lines))
    assert [line for line in lines if "resolution" in line] == [bad["data.resolution=100"]]


@pytest.mark.slow
def test_cli_names_a_resolution_sdxl_cannot_take(workspace):
    result = workspace.run(["task=sdxl_dreambooth", "data.resolution=100", "--cfg", "job"], check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert result.returncode == 1 and errors == [
        "config error: data.resolution=100: takes a whole number >= 64, a multiple of 8"
    ], result.describe()


# ------------------------------------------------------------------------------------------------------------ buckets
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
    """What the model must see of an image (centre crop, no flip), computed here from the geometry alone: the image
    upright (as viewers show a photo: its EXIF orientation applied), scaled with its ratio kept until it covers the
    bucket, then the overhang cut evenly from both sides."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
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
            dreambooth_data(None, resolution=resolution, buckets=True)
    dreambooth_data(None, resolution=1000)  # without buckets any resolution SDXL takes goes


def data_module(folder: Path, **overrides) -> DreamBoothDataModule:
    settings = {"resolution": RESOLUTION, "center_crop": True, "buckets": True, "batch_size": 2, **overrides}
    return dreambooth_data(folder, **settings)


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


def test_a_photo_turned_by_its_exif_orientation_trains_upright(tmp_path):
    # Stored 480 x 270 (16:9) with EXIF Orientation=6 (turn 90 degrees clockwise to view), as phones save portraits:
    # a 270 x 480 portrait as every viewer shows it, and as it trains: its bucket (the portrait one, not 16:9's),
    # crop, pixels and SDXL micro-conditioning (original size) are the upright image's.
    folder = tmp_path / "phone"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient(480, 270).save(folder / "photo.jpg", exif=exif, quality=95)
    assert Image.open(folder / "photo.jpg").size == (480, 270)
    data = data_module(folder, batch_size=1)
    data.setup("fit")
    assert data.instances[0].size == (270, 480)  # width, height
    batch = next(iter(data.train_dataloader()))
    expected = expected_view(folder / "photo.jpg", (320, 192))
    assert expected["original_size"] == [480, 270] and expected["crop_top_left"][1] == 0  # cut top and bottom
    for key in ("original_size", "crop_top_left", "target_size"):
        assert batch[key][0].tolist() == expected[key], key
    assert (batch["pixels"][0] - expected["pixels"]).abs().mean() < 0.01


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
        "+callbacks.record._target_=tests.helpers.callbacks.RecordBatches",
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


# ----------------------------------------------------------------------------------------- caption dropout and masks
def test_caption_dropout_empties_a_binomial_share_of_instance_prompts_drawn_from_the_item_seed(dog, tmp_path):
    classes = save_folder(tmp_path / "classes", [(64, 64)])
    data = dreambooth_data(
        dog,
        resolution=64,
        caption_dropout=0.25,
        random_flip=True,
        center_crop=False,
        prior_preservation=True,
        class_prompt="a photo of a dog",
        class_images=classes,
    )
    dataset = data.training_images()
    items = [dataset[(index % len(dataset), seed)] for seed, index in enumerate(range(400))]
    dropped = sum(item["instance"]["prompt"] == "" for item in items)
    # Binomial(400, 0.25): mean 100, standard deviation 8.7; outside 100 +- 35 (4 standard deviations) 1 in 15,000
    assert 65 <= dropped <= 135, dropped
    assert {item["instance"]["prompt"] for item in items} == {"", "a photo of sks dog"}
    assert {item["class"]["prompt"] for item in items} == {"a photo of a dog"}  # the class prior keeps its prompt
    again = [dataset[(index % len(dataset), seed)]["instance"]["prompt"] for seed, index in enumerate(range(400))]
    assert again == [item["instance"]["prompt"] for item in items]  # the item's seed decides: resume replays it
    assert data.train_prompts() == {"", "a photo of sks dog", "a photo of a dog"}  # "" is encoded and cached too


def masked_folder(folder: Path, sizes) -> tuple[Path, Path]:
    """Images of `sizes` with a red rectangle on grey, and masks (PNG, of a JPEG image too) white on the rectangle."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, (width, height) in enumerate(sizes):
        image = np.full((height, width, 3), 128, np.uint8)
        mask = np.zeros((height, width), np.uint8)
        top, left = height // 5 + 3 * i, width // 3 - 5 * i
        image[top : top + height // 2, left : left + width // 3] = (255, 0, 0)
        mask[top : top + height // 2, left : left + width // 3] = 255
        Image.fromarray(image).save(images / f"img_{i}.{'jpg' if i == 0 else 'png'}", quality=100, subsampling=0)
        Image.fromarray(mask).save(masks / f"img_{i}.png")
    return images, masks


def test_masks_are_resized_cropped_and_flipped_with_their_images_also_from_the_latent_cache(tmp_path):
    images, masks = masked_folder(tmp_path, [(448, 252), (300, 300), (200, 260)])
    data = data_module(
        images, masks=masks, random_flip=True, center_crop=False, interpolation="nearest", cache_latents=False
    )
    dataset = data.training_images()
    for seed in range(12):
        for index in range(len(dataset)):
            example = dataset[(index, seed)]["instance"]
            red = (example["pixels"][0] > 0.5) & (example["pixels"][1] < -0.5)  # the rectangle, wherever it went
            assert example["mask"].shape == (1, *example["pixels"].shape[1:])
            assert torch.equal(example["mask"][0] > 0.5, red)
            assert 0 < red.float().mean() < 1

    cached = data_module(images, masks=masks, random_flip=True, center_crop=False, cache_latents=True)
    cached.set_latent_cache([(views, fake_encode(pixels)) for views, pixels in cached.views_to_encode()])
    batch = next(iter(cached.train_dataloader()))
    assert batch["mask"].shape == (2, 1, *batch["target_size"][0].tolist()) and 0 < batch["mask"].mean() < 1
    assert batch["latent_parameters"].shape[-2:] == tuple(s // 8 for s in batch["target_size"][0].tolist())


def test_missing_or_misfit_masks_are_named_or_skipped(tmp_path, caplog):
    images, masks = masked_folder(tmp_path, [(64, 72), (64, 72), (64, 72)])
    (masks / "img_1.png").unlink()
    Image.new("L", (40, 40)).save(masks / "img_2.png")
    with pytest.raises(UserError, match=rf"data.masks: no mask for .*img_1.png \(expected {masks}/img_1.png"):
        dreambooth_data(images, masks=masks).instances  # noqa: B018
    (masks / "img_1.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"img_1.png: cannot identify image file.*data.skip_bad_images=true"):
        dreambooth_data(images, masks=masks).instances  # noqa: B018
    Image.new("L", (64, 72)).save(masks / "img_1.png")
    with pytest.raises(UserError, match=r"the mask .*img_2.png is 40x40 px, its image .*img_2.png 64x72"):
        dreambooth_data(images, masks=masks).instances  # noqa: B018
    (masks / "img_1.png").unlink()
    kept = dreambooth_data(images, masks=masks, skip_bad_images=True).instances
    assert [e.image.path.name for e in kept] == ["img_0.jpg"] and kept[0].mask.path == masks / "img_0.png"
    assert "skipped 2 unreadable images" in caplog.text
