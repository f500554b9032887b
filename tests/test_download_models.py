"""scripts/download_models.py without a network: the listing (derived from the configs), the names it takes, the files
it would fetch, and a fast, clear failure that downloads nothing."""

import importlib.util
import socket
import sys
import time

import pytest

from framework.pretrained import Weights, configured_models
from tests.helpers.config import ROOT


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("download_models", ROOT / "scripts" / "download_models.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)

    def must_not_download(weights):
        raise AssertionError(f"tried to download {weights.name}")

    monkeypatch.setattr(module, "fetch_hub", must_not_download)
    monkeypatch.setattr(module, "fetch_torchvision", must_not_download)
    return module


def test_list_names_the_models_the_configs_name_and_where(script, capsys):
    assert script.main(["--list"]) == 0
    listed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
    for name in ("Salesforce/blip-image-captioning-base", "nlpconnect/vit-gpt2-image-captioning", "resnet50", "vgg19"):
        assert name in rows
    for name in ("vgg16", "stabilityai/stable-diffusion-xl-base-1.0", "openai/clip-vit-base-patch32"):
        assert name in rows
    assert "conf/model/blip.yaml: model.pretrained" in rows["Salesforce/blip-image-captioning-base"]
    assert "conf/task/cnn_rnn_coco.yaml: model.encoder.name" in rows["resnet50"]
    assert rows["resnet50"].split()[1] == "torchvision" and "val/CIDEr" not in listed  # a metric is no model


def test_the_list_is_derived_from_the_configs(tmp_path):
    """A model YAML (or a task's model block) that names a hub id or a torchvision model adds it; nothing else does."""
    (tmp_path / "model").mkdir()
    (tmp_path / "task").mkdir()
    (tmp_path / "model" / "new.yaml").write_text("_target_: a.B\npretrained: someone/new-captioner\nprompt: a/b c\n")
    (tmp_path / "task" / "new.yaml").write_text(
        "# @package _global_\noptimized_metric: val/CIDEr\nmodel:\n  encoder:\n    name: densenet201\n"
    )
    (tmp_path / "data.yaml").write_text("folder: other/place\n")
    found = configured_models(tmp_path)
    assert list(found) == ["someone/new-captioner", "densenet201"]
    assert found["someone/new-captioner"].used_by == (f"{tmp_path.name}/model/new.yaml: model.pretrained",)
    assert found["densenet201"] == Weights(
        "torchvision", "densenet201", (f"{tmp_path.name}/task/new.yaml: model.encoder.name",)
    )


def test_any_hub_id_or_torchvision_name_is_taken(script):
    models, unknown = script.resolve(["someone/any-model", "densenet201", "resnet50", "blip-huge"], configured_models())
    assert [(w.source, w.name) for w in models] == [
        ("hub", "someone/any-model"),
        ("torchvision", "densenet201"),
        ("torchvision", "resnet50"),
    ]
    assert unknown == ["blip-huge"]
    every, _ = script.resolve(["all"], configured_models())
    assert [w.name for w in every] == list(configured_models())


def test_a_pipeline_is_fetched_as_its_fp32_parts(script):
    files = [
        "model_index.json",
        "sd_xl_base_1.0.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/model.onnx",
        "text_encoder/model.safetensors",
        "text_encoder/openvino_model.bin",
        "tokenizer/vocab.json",
    ]
    assert script.files_to_fetch(files) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
    ]
    assert script.files_to_fetch(["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]) == [
        "config.json",
        "model.safetensors",
    ]


def test_offline_fails_fast_with_one_message(script, capsys, monkeypatch):
    def unreachable(address, timeout):
        assert timeout <= 5
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    assert script.main(["Salesforce/blip-image-captioning-base", "resnet50"]) == 1
    assert time.monotonic() - start < 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot reach download.pytorch.org") and "nothing was downloaded" in error
    assert error.count("\n") == 1  # one line, no traceback


def test_hf_hub_offline_is_honoured(script, capsys, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected although offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main(["nlpconnect/vit-gpt2-image-captioning"]) == 1
    assert capsys.readouterr().err.startswith("error: HF_HUB_OFFLINE is set: nothing was downloaded")


def test_unknown_name_lists_the_known_ones(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["blip-huge"])
    error = capsys.readouterr().err
    assert "unknown model(s) blip-huge: give a Hugging Face hub id (owner/name) or a torchvision model name" in error
    assert "Salesforce/blip-image-captioning-base" in error.split("the configs name")[1]
