"""Pretrained encoder weights come from the local torch cache or a file; `finetune` picks what trains."""

import os

import pytest
import torch
from torchvision import models

from framework.checks import check_config
from framework.config import compose, model_settings
from framework.errors import UserError
from lightning_modules.captioning.nets import ImageEncoder


def encoder(name: str, **values) -> ImageEncoder:
    """An ImageEncoder with conf/model/cnn_rnn.yaml's encoder settings, `values` replacing some."""
    return ImageEncoder(**{**model_settings("cnn_rnn", scheduler=None)["encoder"], "name": name, **values})


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A resnet50 state dict with recognisable values, standing in for the ImageNet file."""
    torch.manual_seed(0)
    state = models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_from_a_file(resnet_weights):
    path, state = resnet_weights
    resnet = encoder("resnet50", pretrained=str(path))
    assert torch.equal(resnet.body[0].weight, state["conv1.weight"])


def test_pretrained_from_the_torch_cache(resnet_weights, tmp_path, monkeypatch):
    path, state = resnet_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(path, cache / os.path.basename(models.ResNet50_Weights.DEFAULT.url))
    resnet = encoder("resnet50", pretrained=True)
    assert torch.equal(resnet.body[-1][-1].conv3.weight, state["layer4.2.conv3.weight"])


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"weights file .*nope.pth does not exist \(model.encoder.pretrained\)"):
        encoder("densenet201", pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize(
    "finetune, trainable", [("all", {"conv1", "layer1", "layer4"}), ("last", {"layer4"}), ("none", set())]
)
def test_finetune_picks_the_trainable_stages(finetune, trainable):
    resnet = encoder("resnet50", finetune=finetune)
    names = {"conv1": resnet.body[0], "layer1": resnet.body[4], "layer4": resnet.body[7]}
    assert {n for n, m in names.items() if all(p.requires_grad for p in m.parameters())} == trainable
    resnet.train()
    assert resnet.body.training == (finetune != "none")  # a frozen encoder keeps BatchNorm statistics


def test_unknown_finetune_names_the_key():
    """Checked with the config, before anything is built (the encoder's signature declares the choices)."""
    with pytest.raises(UserError, match=r"model.encoder.finetune=some: takes one of all, last, none"):
        check_config(compose(["model.encoder.finetune=some"]))


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(UserError, match="small_cnn has no pretrained weights: set model.encoder.pretrained=false"):
        encoder("small_cnn", pretrained=True)


def test_encoder_has_its_own_learning_rate():
    from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner

    settings = model_settings("cnn_rnn", scheduler=None)
    model = CNNRNNCaptioner(
        **{
            **settings,
            "vocab": ["<pad>", "<bos>", "<eos>", "<unk>", "a"],
            "encoder": {**settings["encoder"], "width": 8, "lr": 1e-4},
            "decoder": {**settings["decoder"], "hidden_dim": 16, "embed_dim": 8, "attention_dim": 8},
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
            "image_size": 32,
        }
    )
    decoder_group, encoder_group = model.configure_optimizers().param_groups
    assert decoder_group["lr"] == 1e-3 and encoder_group["lr"] == 1e-4
    assert len(encoder_group["params"]) == len(list(model.encoder.parameters()))
