"""The fixtures the test files share (the builders they call are in tests/helpers/) and the session's hooks."""

from __future__ import annotations

import importlib
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers.captioning import blip_run_dir, vit_gpt2_run_dir
from tests.helpers.cli import Workspace
from tests.helpers.dreambooth import RESOLUTION, save_images
from tests.helpers.explain import trained_shapes_classifier
from tests.helpers.tiny_models import save_tiny_clip, save_tiny_vit, tiny_blip_dir

# `make test` runs two pytest-xdist workers on two cores: each, and the commands it starts, computes on one thread, as
# two thread pools of two threads would contend for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the whole session: generated shapes sets are reused between tests."""
    return tmp_path_factory.mktemp("data")


# ------------------------------------------------------------------------------------------------------ commands
@pytest.fixture(scope="session")
def make_workspace(tmp_path_factory, data_dir):
    """make_workspace(): a new copy of the repository to run commands in (tests.helpers.cli.Workspace), its data/
    the session's data folder; for fixtures of a wider scope than a test's."""

    def make() -> Workspace:
        return Workspace.copy(tmp_path_factory.mktemp("repository"), data=data_dir)

    return make


@pytest.fixture
def workspace(make_workspace) -> Workspace:
    """A copy of the repository of this test's own (its outputs/ empty), its data/ the session's data folder."""
    return make_workspace()


# ------------------------------------------------------------------------------------------ trained once a session
@pytest.fixture(scope="session")
def shapes_checkpoint(data_dir) -> Path:
    """The shapes classifier the explaining tasks explain by default: their required run (framework/prerequisites.py)
    trained once a session, in this process, into the cache they look in (data_dir/shapes_classifier, their
    model.classifier.cache_dir) with fewer epochs (tests.helpers.tasks.CLASSIFIER_TRAINING); later runs, in this
    process or a workspace's, find it there."""
    return trained_shapes_classifier(data_dir)


@pytest.fixture(scope="session")
def tiny_blip(data_dir) -> Path:
    return tiny_blip_dir(data_dir)


@pytest.fixture(scope="session")
def blip_run(data_dir) -> Path:
    """The tiny BLIP overfitted on four images (40 epochs), tested and exported."""
    return blip_run_dir(data_dir)


@pytest.fixture(scope="session")
def vit_gpt2_run(data_dir) -> Path:
    """The tiny ViT-GPT2 overfitted on four images (40 epochs), tested and exported."""
    return vit_gpt2_run_dir(data_dir)


# ------------------------------------------------------------------------------------------------ SDXL DreamBooth
@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from lightning_modules.generation.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipeline", RESOLUTION)


@pytest.fixture(scope="session")
def dog(tmp_path_factory) -> Path:
    """Two instance images of the subject."""
    return save_images(tmp_path_factory.mktemp("instance") / "dog", 2)


@pytest.fixture(scope="session")
def fidelity_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CLIP and a tiny ViT (DINO): model.fidelity.clip and model.fidelity.dino."""
    root = tmp_path_factory.mktemp("fidelity")
    return save_tiny_clip(root / "clip"), save_tiny_vit(root / "dino")


# --------------------------------------------------------------------------------------------------------- hooks
# Tests that -m left out (make test-fast: those marked slow), counted where the tests are collected: in this process,
# or in each pytest-xdist worker, which hands its count to this process (xdist's workeroutput).
deselected = 0


def pytest_collection_modifyitems(items) -> None:
    """The files with the most `slow` tests first (each file's tests in their order): pytest-xdist hands out whole files
    in this order (--dist loadfile), so the longest start first and the two workers finish together, rather than one
    waiting while the other runs a long file it was given last."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def pytest_deselected(items) -> None:
    global deselected
    deselected += len(items)


def pytest_sessionfinish(session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker
        session.config.workeroutput["deselected"] = deselected


def pytest_testnodedown(node, error) -> None:  # in the xdist controller: every worker collected the same tests
    global deselected
    deselected = max(deselected, getattr(node, "workeroutput", {}).get("deselected", 0))


def pytest_terminal_summary(terminalreporter) -> None:
    """How many tests -m left out, and how many README commands tests/test_readme_commands.py ran as typed and how
    many it only composed (where it ran: under pytest-xdist the workers ran it, and this process reads the module)."""
    if deselected:
        terminalreporter.write_line(f"left out by -m {terminalreporter.config.option.markexpr!r}: {deselected} tests")
    reports = (report for reports in terminalreporter.stats.values() for report in reports)
    if any(getattr(report, "nodeid", "").startswith("tests/test_readme_commands.py") for report in reports):
        terminalreporter.write_line(importlib.import_module("tests.test_readme_commands").coverage_line())
