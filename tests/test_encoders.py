"""Pretrained encoder weights come from the local torch cache or a file; `finetune` picks what trains."""

import os

import pytest
import torch
from torchvision import models

from framework.errors import UserError
from lightning_modules.captioning.nets import ImageEncoder


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
    encoder = ImageEncoder("resnet50", pretrained=str(path))
    assert torch.equal(encoder.body[0].weight, state["conv1.weight"])


def test_pretrained_from_the_torch_cache(resnet_weights, tmp_path, monkeypatch):
    path, state = resnet_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(path, cache / os.path.basename(models.ResNet50_Weights.DEFAULT.url))
    encoder = ImageEncoder("resnet50", pretrained=True)
    assert torch.equal(encoder.body[-1][-1].conv3.weight, state["layer4.2.conv3.weight"])


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"weights file .*nope.pth does not exist \(model.encoder.pretrained\)"):
        ImageEncoder("densenet201", pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize(
    "finetune, trainable", [("all", {"conv1", "layer1", "layer4"}), ("last", {"layer4"}), ("none", set())]
)
def test_finetune_picks_the_trainable_stages(finetune, trainable):
    encoder = ImageEncoder("resnet50", finetune=finetune)
    names = {"conv1": encoder.body[0], "layer1": encoder.body[4], "layer4": encoder.body[7]}
    assert {n for n, m in names.items() if all(p.requires_grad for p in m.parameters())} == trainable
    encoder.train()
    assert encoder.body.training == (finetune != "none")  # a frozen encoder keeps BatchNorm statistics


def test_unknown_finetune_names_the_key():
    with pytest.raises(UserError, match=r"model.encoder.finetune must be one of all, last, none"):
        ImageEncoder("small_cnn", finetune="some")


def test_encoder_has_its_own_learning_rate():
    from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner

    model = CNNRNNCaptioner(
        vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a"],
        encoder={"width": 8, "lr": 1e-4},
        decoder={"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    )
    decoder_group, encoder_group = model.configure_optimizers().param_groups
    assert decoder_group["lr"] == 1e-3 and encoder_group["lr"] == 1e-4
    assert len(encoder_group["params"]) == len(list(model.encoder.parameters()))
