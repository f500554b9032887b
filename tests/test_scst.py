"""Self-critical training: the CIDEr-D reward, sampling with gradients, the start at a plateau and the guard."""

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from pycocoevalcap.cider.cider import Cider

from framework.runner import run
from lightning_modules.captioning.cider import CiderD
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.decoding import sample_decode
from lightning_modules.captioning.nets import RNNDecoder
from tests.conftest import CONF, TINY_SHAPES, compose_config, read_metrics

REFERENCES = {
    1: ["a red circle", "a small red circle", "there is a red circle"],
    2: ["a blue square left of a green circle", "there is a blue square", "a green circle right of a blue square"],
    3: ["a large yellow diamond", "one yellow diamond"],
}


def cider_d(references=REFERENCES):
    return CiderD([[r.split() for r in refs] for refs in references.values()])


def test_matches_pycocoevalcap_cider_given_the_same_document_frequencies():
    """pycocoevalcap's Cider is coco-caption's CIDEr-D with frequencies from the references it is given:
    scored over the same corpus, the two agree, repetitions (clipped matches) included."""
    candidates = {1: "red red red red", 2: "a blue square", 3: "one large diamond"}
    _, expected = Cider().compute_score(REFERENCES, {i: [c] for i, c in candidates.items()})
    scorer = cider_d()
    ours = [scorer.score(candidates[i].split(), [r.split() for r in REFERENCES[i]]) for i in REFERENCES]
    assert ours == pytest.approx(list(expected), rel=1e-9)


def test_clipping_penalises_repetition():
    scorer = cider_d()
    references = [r.split() for r in REFERENCES[1]]
    assert scorer.score("red red red red".split(), references) < scorer.score("a red circle".split(), references)
    assert scorer.score("a red circle".split(), references) == scorer.score("a red circle".split(), references[::-1])


def test_sample_decode_masks_after_eos_and_has_gradients():
    torch.manual_seed(0)
    decoder = RNNDecoder(vocab_size=10, feature_dim=6, embed_dim=8, hidden_dim=12, attention_dim=8)
    tokens, log_probs, mask = sample_decode(decoder, torch.randn(3, 4, 6), bos=1, eos=2, max_len=6, num_samples=4)
    assert tokens.shape == log_probs.shape == mask.shape and tokens.shape[0] == 12
    assert (log_probs <= 0).all() and log_probs.requires_grad
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        length = row.index(2) + 1 if 2 in row else len(row)
        assert row_mask == [True] * length + [False] * (len(row) - length)
    (log_probs * mask).sum().backward()
    assert decoder.output.weight.grad.abs().sum() > 0


# The schedule and the guard, step by step: a tiny captioner in a stand-in trainer, its weights set to the
# val CIDEr of each validation, so that the weights it holds tell which validation they come from.


def captioner(**scst) -> CNNRNNCaptioner:
    settings = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "cnn_rnn.yaml").scst)  # the defaults
    model = CNNRNNCaptioner(
        vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a"],
        encoder={"width": 4},
        decoder={"hidden_dim": 8, "embed_dim": 4, "attention_dim": 4},
        optimizer={},
        scst={**settings, **scst},
    )
    model._trainer = SimpleNamespace(current_epoch=0, is_global_zero=True, should_stop=False)
    return model


def validate(model: CNNRNNCaptioner, epoch: int, cider: float) -> float:
    """One validation that scored `cider`; returns the val/CIDEr that gets logged."""
    model.trainer.current_epoch = epoch
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(cider)
    return model.after_validation({"val/CIDEr": cider, "val/BLEU-4": cider / 10})["val/CIDEr"]


def held(model: CNNRNNCaptioner) -> set[float]:
    return {round(value, 6) for parameter in model.parameters() for value in parameter.flatten().tolist()}


@pytest.mark.parametrize(("patience", "start_after", "best"), [(1, 2, 0.7), (2, 5, 0.8), (3, 6, 0.8)])
def test_plateau_start_after_patience_validations_without_a_new_best(patience, start_after, best):
    """start=plateau: SCST starts after the `patience`-th validation in a row that is no better than the best
    (equal is no better), from the best cross-entropy weights, which are what that validation logs."""
    model = captioner(start="plateau", patience=patience)
    for epoch, cider in enumerate([0.5, 0.7, 0.6, 0.8, 0.75, 0.8, 0.7]):
        logged = validate(model, epoch, cider)
        if epoch == start_after:
            assert model.self_critical and logged == best and held(model) == {best}
            return
        assert not model.self_critical and logged == cider, epoch
    pytest.fail("SCST never started")


def test_guard_restores_the_best_cross_entropy_weights_and_stops_training():
    model = captioner(start="epoch", start_epoch=2, patience=2)
    assert [validate(model, epoch, cider) for epoch, cider in enumerate([0.5, 0.6])] == [0.5, 0.6]
    model.trainer.current_epoch = 2
    model.on_train_epoch_start()
    assert model.self_critical
    # Below the best cross-entropy value, above it (the count starts again), then below twice in a row.
    assert [validate(model, epoch, cider) for epoch, cider in [(2, 0.55), (3, 0.65), (4, 0.5)]] == [0.55, 0.65, 0.5]
    assert not model.trainer.should_stop
    # The guard state travels in checkpoints (weights_only loads): a resumed run restores the same weights.
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    resumed = captioner(start="epoch", start_epoch=2, patience=2)
    buffer.seek(0)
    resumed.on_load_checkpoint(torch.load(buffer, weights_only=True))
    assert validate(resumed, 5, 0.4) == 0.6  # logged for the weights it now holds
    assert resumed.trainer.should_stop and resumed.scst_state["phase"] == "stopped" and held(resumed) == {0.6}
    stopped = captioner(start="epoch", start_epoch=2, patience=2)  # resumed again (resume=auto): still stopped
    resumed.on_save_checkpoint(checkpoint)
    stopped.on_load_checkpoint(checkpoint)
    stopped.on_fit_start()
    assert stopped.trainer.should_stop


# A real run: SCST at a learning rate far too high, continued from a cross-entropy run into a new run dir, where
# ModelCheckpoint starts afresh and would otherwise file the damaged SCST weights as the best checkpoint.
CE_EPOCHS = 4
FAST = [*TINY_SHAPES, "model.optimizer.lr=0.01", "callbacks=default", "logger=csv"]


@pytest.fixture(scope="module")
def cross_entropy_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("cross_entropy")
    run(compose_config([*FAST, f"trainer.max_epochs={CE_EPOCHS}"], run_dir, data_dir))
    return run_dir


def val_cider(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["epoch"]): float(row["val/CIDEr"]) for row in csv.DictReader(f) if row.get("val/CIDEr")}


def test_guard_gives_the_test_stage_the_cross_entropy_weights(cross_entropy_run, tmp_path, data_dir, caplog):
    run(
        compose_config(
            [
                *FAST,
                f"ckpt_path={cross_entropy_run}/checkpoints/last.ckpt",
                f"trainer.max_epochs={CE_EPOCHS + 4}",
                f"model.scst.start_epoch={CE_EPOCHS}",
                "model.scst.lr=0.05",
                "model.scst.patience=2",
                "model.scst.num_samples=2",
                "trainer.limit_train_batches=1",
            ],
            tmp_path,
            data_dir,
        )
    )
    ce, scst = val_cider(cross_entropy_run), val_cider(tmp_path)
    restore = CE_EPOCHS + 1
    assert scst[CE_EPOCHS] < max(ce.values()), (ce, scst)  # what the learning rate did to the first SCST epoch
    assert scst[restore] == max(ce.values()) and restore + 1 not in scst  # restored, logged as such, stopped
    assert "restored the cross-entropy weights of epoch" in caplog.text
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == restore and last["scst"]["phase"] == "stopped"
    assert [p.name for p in (tmp_path / "checkpoints").glob("epoch_*.ckpt")] == [f"epoch_{restore:03d}.ckpt"]
    assert read_metrics(tmp_path)["test/CIDEr"] == pytest.approx(read_metrics(cross_entropy_run)["test/CIDEr"])
