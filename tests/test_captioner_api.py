"""Captioner.from_pretrained(...).generate_caption(s): BLIP and ViT-GPT2 exports and checkpoints, CNN-RNN ones."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning import BLIPCaptioner, Captioner, CNNRNNCaptioner
from tests.conftest import TINY_SHAPES, compose_config
from tests.test_blip import blip_run, train_items  # noqa: F401 (a fixture; its training run is shared with test_blip)
from tests.test_vit_gpt2 import vit_gpt2_run  # noqa: F401


@pytest.mark.parametrize("run_fixture", ["blip_run", "vit_gpt2_run"])
@pytest.mark.parametrize("source", ["export", "checkpoints/last.ckpt"])
def test_overfitted_hf_captioners_caption_their_training_images(run_fixture, source, request, data_dir):
    captioner = Captioner.from_pretrained(request.getfixturevalue(run_fixture) / source)
    paths, captions = zip(*train_items(data_dir))
    assert captioner.generate_captions(list(paths), batch_size=3) == list(captions)  # two batches
    assert captioner.generate_caption(Image.open(paths[0])) == captions[0]  # a PIL image (palette/RGBA converted)


def test_generation_settings_come_from_the_export_or_overrides(blip_run, data_dir):
    assert Captioner.from_pretrained(blip_run / "export").module.model.generation_config.num_beams == 3
    captioner = Captioner.from_pretrained(blip_run / "export", generation={"num_beams": 1, "max_length": 6})
    assert isinstance(captioner.module, BLIPCaptioner) and captioner.module.hparams.generation["max_length"] == 6
    (path, _), *_ = train_items(data_dir)
    assert len(captioner.generate_caption(path).split()) <= 6 - 4  # 6 tokens, 4 of them BOS and the prompt


@pytest.fixture(scope="module")
def cnn_rnn_checkpoint(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("cnn_rnn")
    run(
        compose_config(
            [
                *TINY_SHAPES,
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "logger=csv",
            ],
            run_dir,
            data_dir,
        )
    )
    return run_dir / "checkpoints" / "last.ckpt"


def test_cnn_rnn_checkpoint_captions_as_its_module_does(cnn_rnn_checkpoint, tmp_path):
    captioner = Captioner.from_pretrained(cnn_rnn_checkpoint, beam_size=2)
    module = CNNRNNCaptioner.load_from_checkpoint(cnn_rnn_checkpoint, map_location="cpu", weights_only=True).eval()
    assert module.hparams.image_size == 32 and captioner.module.hparams.beam_size == 2
    images = [Image.new("RGB", (50, 40), colour) for colour in ("red", "blue", "green")]
    expected = module.generate(torch.stack([module.image_transform()(image) for image in images]), beam_size=2)
    assert captioner.generate_captions(images, batch_size=2) == expected


def test_bad_sources_name_the_file(tmp_path):
    with pytest.raises(UserError, match="is not a Hugging Face export of a captioner"):
        Captioner.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="is not a captioner checkpoint of this project"):
        Captioner.from_pretrained(tmp_path / "other.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a checkpoint"):
        Captioner.from_pretrained(tmp_path / "text.ckpt")
