"""scripts/download_models.py without a network: the listing, and a fast, clear failure that downloads nothing."""

import importlib.util
import socket
import sys
import time

import pytest

from tests.conftest import ROOT


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


def test_list_names_every_model(script, capsys):
    assert script.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("blip-base", "blip-large", "vit-gpt2", "resnet50", "densenet201", "vgg19", "vgg16", "sdxl-base"):
        assert name in listed
    assert "Salesforce/blip-image-captioning-base" in listed


def test_offline_fails_fast_with_one_message(script, capsys, monkeypatch):
    def unreachable(address, timeout):
        assert timeout <= 5
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    assert script.main(["blip-base", "resnet50"]) == 1
    assert time.monotonic() - start < 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot reach download.pytorch.org") and "nothing was downloaded" in error
    assert error.count("\n") == 1  # one line, no traceback


def test_hf_hub_offline_is_honoured(script, capsys, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected although offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main(["vit-gpt2"]) == 1
    assert capsys.readouterr().err.startswith("error: HF_HUB_OFFLINE is set: nothing was downloaded")


def test_unknown_name_lists_the_known_ones(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["blip-huge"])
    assert "unknown model(s) blip-huge; known: blip-base, blip-large" in capsys.readouterr().err
