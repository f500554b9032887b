"""The contracts of framework/contracts.py: which task classes declare each, that a declared contract with a misspelt
member is an error, the captioning batch, and the preparation step before the model is built (runner.model_inputs)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import get_class
from lightning.fabric.utilities.apply_func import move_data_to_device

from callbacks.caption_predictions import CaptionPredictions
from datamodules.captions import CaptionBatch, ShapesDataModule
from framework import contracts
from framework.contracts import (
    Attends,
    BuildsFromConfig,
    CachesFeatures,
    ExplainsCheckpoint,
    Exports,
    HasCaptionPredictions,
    HasGeneratedSamples,
    InferenceOverrides,
    NeedsModelOutputs,
    ProvidesModelInputs,
    SavesPredictions,
    ServesImageFolder,
    ServesReferenceImages,
    ServesValExamples,
    TakesImageTransform,
)
from framework.runner import model_inputs
from tests.conftest import CONF

CAPTIONERS = {"CNNRNNCaptioner", "BLIPCaptioner", "ViTGPT2Captioner"}
EXPLAINERS = {"SaliencyModule", "ClassVisualisationModule", "AdversarialModule", "CaptionExplainModule"}
CAPTION_DATA = {"CaptionDataModule", "ShapesDataModule"}
# Who declares what, by family (docs/ARCHITECTURE.md, Protocols): the classes conf/model and conf/data name.
FAMILIES = {
    "runner -> module": {
        Exports: {"BLIPCaptioner", "ViTGPT2Captioner", "DreamBoothLoRA", "FastStyle"},
        SavesPredictions: EXPLAINERS | {"DreamBoothLoRA"},
        BuildsFromConfig: EXPLAINERS | {"BLIPCaptioner", "ViTGPT2Captioner", "DreamBoothLoRA"},
        ExplainsCheckpoint: {"CaptionExplainModule"},
        InferenceOverrides: CAPTIONERS | {"DreamBoothLoRA"},
    },
    "runner -> data module": {
        ProvidesModelInputs: CAPTION_DATA
        | {"ShapeClassesDataModule", "ShapeObjectsDataModule", "ImageFolderDataModule"}
        | {"StyleImagesDataModule", "ContentFolderDataModule"},
    },
    "module -> data module": {
        CachesFeatures: CAPTION_DATA,
        TakesImageTransform: CAPTION_DATA,
        NeedsModelOutputs: {"DreamBoothDataModule"},
        ServesReferenceImages: {"DreamBoothDataModule"},
        ServesImageFolder: {"ShapeObjectsDataModule", "ImageFolderDataModule"},
    },
    "callbacks -> module, data module": {
        HasCaptionPredictions: CAPTIONERS,
        HasGeneratedSamples: {"DreamBoothLoRA"},
        Attends: {"CNNRNNCaptioner"},
        ServesValExamples: CAPTION_DATA,
    },
}


def config_classes() -> list[type]:
    """Every module and data module class a config of conf/model or conf/data names."""
    configs = [yaml.safe_load(path.read_text()) for group in ("model", "data") for path in CONF.glob(f"{group}/*.yaml")]
    return [get_class(target) for target in sorted({c["_target_"] for c in configs if "_target_" in c})]


def methods(contract: type) -> list[str]:
    return [name for name, value in vars(contract).items() if callable(value) and not name.startswith("_")]


def test_every_contract_is_in_the_table():
    tabled = {contract for family in FAMILIES.values() for contract in family}
    defined = {c for c in vars(contracts).values() if isinstance(c, type) and c.__module__ == contracts.__name__}
    assert tabled == defined - {contracts.Contract}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_classes_that_take_part_declare_their_contracts(family):
    """Each contract is declared (derived from) by the classes of the table and no other, and no class has a
    protocol's methods without declaring it (a declared class is checked when it is created: it has them all)."""
    classes = config_classes()
    for contract, expected in FAMILIES[family].items():
        assert {cls.__name__ for cls in classes if contract in cls.__mro__} == expected, contract.__name__
        if methods(contract):
            has_methods = {cls.__name__ for cls in classes if all(hasattr(cls, m) for m in methods(contract))}
            assert has_methods == expected, f"{contract.__name__}: declare it where its methods are"
    for cls in classes:
        if issubclass(cls, InferenceOverrides):
            assert cls.inference_hparams, cls


def test_a_declared_contract_with_a_misspelt_member_is_an_error():
    with pytest.raises(TypeError, match=r"\.Typo declares a contract but does not define export \(Exports\)"):

        class Typo(L.LightningModule, Exports):
            def exprot(self, directory):
                return directory

    with pytest.raises(TypeError, match=r"does not define set_latent_cache \(NeedsModelOutputs\)"):

        class HalfPrepared(L.LightningDataModule, NeedsModelOutputs):
            def missing_class_images(self):
                return []

            def views_to_encode(self):
                return iter(())

            def set_latents_cache(self, encoded):
                pass

    with pytest.raises(TypeError, match=r"inference_hparams=\('beam_sise',\): give a tuple of __init__ parameters"):

        class Overrides(L.LightningModule, InferenceOverrides):
            inference_hparams = ("beam_sise",)

            def __init__(self, beam_size: int = 3):
                super().__init__()

    # An instance attribute a declared class never sets is an AttributeError where it is read, not a skipped file.
    class NoPredictions(L.LightningModule, HasCaptionPredictions):
        def __init__(self):
            super().__init__()
            self.prediction = {"val": {}, "test": {}}

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(AttributeError, match="predictions"):
        CaptionPredictions("unused").on_test_end(trainer, NoPredictions())
    # Undeclared, a class takes part by having the members (runtime-checkable protocols), or does not take part.
    assert isinstance(type("Undeclared", (), {"attend": lambda self, image: ([], None)})(), Attends)
    assert not isinstance(type("Misspelt", (), {"atend": lambda self, image: ([], None)})(), Attends)


def test_the_captioning_loader_gives_caption_batches_lightning_moves(data_dir):
    data = ShapesDataModule(str(data_dir), num_train=8, num_val=4, num_test=4, image_size=32, batch_size=4)
    data.prepare_data()
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, CaptionBatch) and batch.size == 4 and batch.skipped == 0 and batch.features is None
    assert batch.images.shape == (4, 3, 32, 32) and len(batch.paths) == len(batch.tokens) == len(batch.references) == 4
    moved = move_data_to_device(batch, torch.device("meta"))  # what Lightning's transfer_batch_to_device does
    assert isinstance(moved, CaptionBatch) and moved.images.device.type == "meta" and batch.images.device.type == "cpu"
    assert (moved.tokens, moved.image_ids, moved.size) == (batch.tokens, batch.image_ids, batch.size)


class SlowPreparation(L.LightningDataModule, ProvidesModelInputs):
    """Counts the processes preparing at once; `model_inputs` reads what `prepare_data` wrote."""

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

    def model_inputs(self) -> dict:
        return {"vocab": (self.folder / "prepared").read_text()}


def test_one_process_at_a_time_prepares_before_the_model_is_built(tmp_path):
    """Two ranks (here: threads, each with its own lock file handle, as processes have) call model_inputs at once:
    one prepares while the other waits, then both read what was prepared."""
    state = {"now": 0, "most": 0, "prepared": 0}
    results = []
    ranks = [
        threading.Thread(target=lambda: results.append(model_inputs(SlowPreparation(tmp_path, state))))
        for _ in range(2)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert state == {"now": 0, "most": 1, "prepared": 1}
    assert results == [{"vocab": "vocabulary"}] * 2
    assert model_inputs(L.LightningDataModule()) == {}  # a data module that provides none
