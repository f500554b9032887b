"""Captioner.from_pretrained(...).generate_caption(s): BLIP and ViT-GPT2 exports and checkpoints, CNN-RNN ones."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from framework.checkpoints import read_checkpoint
from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning import Captioner, CNNRNNCaptioner, HFCaptioner, inference
from lightning_modules.captioning.hf import family_settings
from lightning_modules.captioning.inference import configured_captioners, settings_for
from tests.helpers.captioning import train_items
from tests.helpers.config import TINY_SHAPES, compose_config


@pytest.mark.slow
@pytest.mark.parametrize("run_fixture", ["blip_run", "vit_gpt2_run"])
@pytest.mark.parametrize("source", ["export", "checkpoints/last.ckpt"])
def test_overfitted_hf_captioners_caption_their_training_images(run_fixture, source, request, data_dir):
    captioner = Captioner.from_pretrained(request.getfixturevalue(run_fixture) / source)
    paths, captions = zip(*train_items(data_dir))
    assert captioner.generate_captions(list(paths), batch_size=3) == list(captions)  # two batches
    assert captioner.generate_caption(Image.open(paths[0])) == captions[0]  # a PIL image (palette/RGBA converted)


@pytest.mark.slow
def test_generation_settings_come_from_the_export_or_overrides(blip_run, data_dir):
    assert Captioner.from_pretrained(blip_run / "export").module.model.generation_config.num_beams == 3
    captioner = Captioner.from_pretrained(blip_run / "export", generation={"num_beams": 1, "max_length": 6})
    assert isinstance(captioner.module, HFCaptioner) and captioner.module.hparams.generation["max_length"] == 6
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


# -- the registries: derived from the classes and conf/model/, no list to keep -------------------------------------
def test_checkpoints_name_the_class_that_loads_them(cnn_rnn_checkpoint, tmp_path):
    checkpoint = read_checkpoint(cnn_rnn_checkpoint, key=None)
    assert checkpoint["captioner"] == "lightning_modules.captioning.cnn_rnn.CNNRNNCaptioner"
    older = {**checkpoint, "captioner": "CNNRNNCaptioner"}  # before the full path: the class name
    torch.save(older, tmp_path / "older.ckpt")
    assert isinstance(Captioner.from_pretrained(tmp_path / "older.ckpt").module, CNNRNNCaptioner)
    for name in ("os.system", "tests.helpers.captioning.Evil", "framework.runner.Run", "NoSuchCaptioner"):
        torch.save({**checkpoint, "captioner": name}, tmp_path / "other.ckpt")
        with pytest.raises(UserError, match="is not a captioner checkpoint of this project"):
            Captioner.from_pretrained(tmp_path / "other.ckpt")


def test_the_captioners_are_those_conf_model_builds(tmp_path, monkeypatch):
    """A captioner is known (its checkpoints) once a conf/model YAML builds it; blip.yaml and vit_gpt2.yaml are
    settings of hf_captioner.yaml's class, which every family's export loads with."""
    assert {cls.__name__: name for cls, name in configured_captioners().items()} == {
        "CNNRNNCaptioner": "cnn_rnn",
        "HFCaptioner": "hf_captioner",
    }
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_captioner.yaml").write_text("_target_: lightning_modules.captioning.hf.HFCaptioner\n")
    (tmp_path / "model" / "style.yaml").write_text("_target_: lightning_modules.style.fast_style.FastStyle\n")
    monkeypatch.setattr(inference, "CONF", tmp_path)
    assert {cls.__name__: name for cls, name in configured_captioners.__wrapped__().items()} == {
        "HFCaptioner": "my_captioner"
    }


def test_a_checkpoint_of_a_retired_class_is_one_error_saying_what_to_do(tmp_path):
    torch.save(
        {"captioner": "lightning_modules.captioning.blip.BLIPCaptioner", "state_dict": {}}, tmp_path / "old.ckpt"
    )
    with pytest.raises(UserError, match=r"old.ckpt cannot be loaded: it was written by BLIPCaptioner.*mode=export"):
        Captioner.from_pretrained(tmp_path / "old.ckpt")


def test_every_class_of_the_package_by_name():
    import lightning_modules.captioning as captioning

    assert captioning.HFCaptioner is HFCaptioner and captioning.Captioner is Captioner
    with pytest.raises(AttributeError):
        captioning.NoSuchCaptioner  # noqa: B018


def test_an_export_gets_its_yaml_settings_and_keeps_its_generation_settings(tiny_blip, tmp_path):
    module = HFCaptioner(**settings_for(HFCaptioner, pretrained=str(tiny_blip), generation={"num_beams": 2}))
    module.export(tmp_path / "export")
    captioner = Captioner.from_pretrained(tmp_path / "export")
    assert captioner.module.prompt == family_settings("blip")["prompt"]
    assert captioner.module.model.generation_config.num_beams == 2  # the export's, not the YAML's 3
    overridden = Captioner.from_pretrained(tmp_path / "export", generation={"max_length": 6})
    assert overridden.module.model.generation_config.max_length == 6
    assert overridden.module.model.generation_config.num_beams == 2
    with pytest.raises(UserError, match=r"model.generation.num_beams=0: takes a whole number >= 1"):
        Captioner.from_pretrained(tmp_path / "export", generation={"num_beams": 0})
