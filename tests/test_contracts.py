"""The contracts of framework/contracts.py: which task classes declare each, that a declared contract with a misspelt
member is an error, and the captioning batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device

from callbacks.caption_predictions import CaptionPredictions
from datamodules.batches import CaptionBatch
from framework import contracts
from framework.contracts import BuildsFromConfig, Exports, HasCaptionPredictions, InferenceOverrides, SavesPredictions
from tests.helpers.config import CONF, compose_config

CAPTIONERS = {"CNNRNNCaptioner", "HFCaptioner"}
EXPLAINERS = {"SaliencyModule", "ClassVisualisationModule", "AdversarialModule", "CaptionExplainModule"}
# Who declares what (docs/ARCHITECTURE.md, Contracts): the classes conf/model and conf/data name.
FAMILIES = {
    "runner -> module": {
        Exports: {"HFCaptioner", "DreamBoothLoRA", "FastStyle", "AdaINStyle"},
        SavesPredictions: EXPLAINERS | {"DreamBoothLoRA", "CaptionImages"},
        BuildsFromConfig: EXPLAINERS | {"HFCaptioner", "DreamBoothLoRA", "CaptionImages"},
        InferenceOverrides: CAPTIONERS | {"DreamBoothLoRA", "FastStyle", "AdaINStyle"},
    },
    "callbacks -> module": {HasCaptionPredictions: CAPTIONERS},
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

    with pytest.raises(TypeError, match=r"does not define save_predictions \(SavesPredictions\)"):

        class HalfDeclared(L.LightningModule, SavesPredictions):
            def save_prediction(self, rows, output_dir):
                return {}

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
    assert isinstance(type("Undeclared", (), {"export": lambda self, directory: directory})(), Exports)
    assert not isinstance(type("Misspelt", (), {"exprot": lambda self, directory: directory})(), Exports)


def test_the_captioning_loader_gives_caption_batches_lightning_moves(tmp_path, data_dir):
    shrink = ["data.num_train=8", "data.num_val=4", "data.num_test=4", "data.image_size=32", "data.batch_size=4"]
    data = instantiate(compose_config([*shrink, "data.num_workers=0"], tmp_path, data_dir).data)
    data.prepare_data()
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, CaptionBatch) and batch.size == 4 and batch.skipped == 0 and batch.features is None
    assert batch.images.shape == (4, 3, 32, 32) and len(batch.paths) == len(batch.tokens) == len(batch.references) == 4
    moved = move_data_to_device(batch, torch.device("meta"))  # what Lightning's transfer_batch_to_device does
    assert isinstance(moved, CaptionBatch) and moved.images.device.type == "meta" and batch.images.device.type == "cpu"
    assert (moved.tokens, moved.image_ids, moved.size) == (batch.tokens, batch.image_ids, batch.size)
