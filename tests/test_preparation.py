"""What a model and its data take from each other goes through the runner (framework/preparation.py): the inputs a
module class names in `data_inputs`, prepared once per node before it is built, and the links of `Preparation`."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from framework.errors import UserError
from framework.preparation import Preparation, given, model_inputs


class SlowPreparation(L.LightningDataModule):
    """Counts the processes preparing at once; its `vocab` input reads what `prepare_data` wrote."""

    def __init__(self, folder: Path, state: dict):
        super().__init__()
        self.folder, self.state = folder, state

    def prepare_data(self) -> None:
        self.state["now"] += 1
        self.state["most"] = max(self.state["most"], self.state["now"])
        if not (self.folder / "prepared").exists():
            time.sleep(0.3)
            (self.folder / "prepared").write_text("vocabulary")
            self.state["prepared"] += 1
        self.state["now"] -= 1

    def model_inputs(self, names: tuple[str, ...]) -> dict:
        self.state["asked"] = names
        return given(self, names, vocab=lambda: (self.folder / "prepared").read_text(), size=lambda: 1 / 0)


class TakesVocab:
    data_inputs = ("vocab",)


def test_one_process_at_a_time_prepares_before_the_model_is_built(tmp_path):
    """Two ranks (here: threads, each with its own lock file handle, as processes have) ask at once: one prepares
    while the other waits, then both read what was prepared; only what the module names is computed."""
    state = {"now": 0, "most": 0, "prepared": 0}
    results = []
    ranks = [
        threading.Thread(target=lambda: results.append(model_inputs(TakesVocab, SlowPreparation(tmp_path, state))))
        for _ in range(2)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert {k: state[k] for k in ("now", "most", "prepared")} == {"now": 0, "most": 1, "prepared": 1}
    assert results == [{"vocab": "vocabulary"}] * 2 and state["asked"] == ("vocab",)


def test_a_module_that_takes_nothing_from_its_data_leaves_it_unprepared(tmp_path):
    state = {"now": 0, "most": 0, "prepared": 0}
    assert model_inputs(type("TakesNothing", (), {}), SlowPreparation(tmp_path, state)) == {}
    assert state["prepared"] == 0


def test_an_input_the_data_does_not_give_is_one_error(tmp_path):
    class TakesClasses:
        data_inputs = ("classes",)

    with pytest.raises(UserError, match=r"takes classes from its data, which SlowPreparation does not give"):
        model_inputs(TakesClasses, SlowPreparation(tmp_path, {"now": 0, "most": 0, "prepared": 0}))


class Module:
    """A module offering every link of the preparation table."""

    class_names = ["circle", "square"]

    def __init__(self):
        self.image_root, self.captions, self.read = None, None, None

    def image_transform(self):
        return "the model's transform"

    def frozen_encoder(self):
        return "encoder"

    def use_training_captions(self, captions):
        self.captions = captions

    def use_reference_images(self, read):
        self.read = read


class Data:
    images = "photos/"

    def __init__(self):
        self.transform, self.cached, self.classes = None, None, None

    def set_image_transform(self, transform):
        self.transform = transform

    def enable_feature_cache(self, encoder):
        self.cached = encoder

    def training_captions(self):
        return [["a", "circle"]]

    def reference_images(self):
        return ["an image"]

    def use_class_names(self, names):
        self.classes = names


@pytest.mark.parametrize("stage", ["fit", "predict"])
def test_preparation_links_what_each_side_offers(stage):
    module, data = Module(), Data()
    Preparation().setup(SimpleNamespace(datamodule=data), module, stage)
    assert (data.transform, data.cached, data.classes) == ("the model's transform", "encoder", ["circle", "square"])
    assert module.image_root == "photos/" and module.read() == ["an image"]
    assert module.captions == ([["a", "circle"]] if stage == "fit" else None)  # SCST trains only in fit


def test_preparation_leaves_alone_what_one_side_does_not_offer():
    data = Data()
    Preparation().setup(SimpleNamespace(datamodule=data), L.LightningModule(), "fit")
    assert (data.transform, data.cached, data.classes) == (None, None, None)
    Preparation().setup(SimpleNamespace(datamodule=None), Module(), "fit")  # a trainer without a data module
