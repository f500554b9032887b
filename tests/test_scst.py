"""Self-critical training: the CIDEr-D reward, sampling with gradients, the controller (lightning_modules/captioning/
scst.py: its state in checkpoints, its loss for any captioner that gives rollouts), the start at a plateau and the
guard."""

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from datamodules.batches import CaptionBatch
from framework.config import model_settings
from framework.errors import UserError
from framework.runner import run
from lightning_modules.captioning.cider import CiderD
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.decoding import sample_decode
from lightning_modules.captioning.nets import RNNDecoder
from lightning_modules.captioning.scst import Rollouts, SCSTSettings, SCSTState, SelfCritical
from tests.helpers.config import TINY_SHAPES, compose_config, read_metrics

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
    settings = {**model_settings("cnn_rnn", scheduler=None)["decoder"], "embed_dim": 8, "hidden_dim": 12}
    decoder = RNNDecoder(vocab_size=10, feature_dim=6, **{**settings, "attention_dim": 8})
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


def scst_defaults() -> dict:
    return model_settings("cnn_rnn", scheduler=None)["scst"]


def captioner_with(**values) -> CNNRNNCaptioner:
    """A tiny CNN-RNN captioner with conf/model/cnn_rnn.yaml's settings, `values` replacing some, in a stand-in
    trainer."""
    settings = model_settings("cnn_rnn", scheduler=None)
    model = CNNRNNCaptioner(
        **{
            **settings,
            "vocab": ["<pad>", "<bos>", "<eos>", "<unk>", "a"],
            "encoder": {**settings["encoder"], "width": 4},
            "decoder": {**settings["decoder"], "hidden_dim": 8, "embed_dim": 4, "attention_dim": 4},
            "image_size": 32,
            **values,
        }
    )
    model._trainer = SimpleNamespace(current_epoch=0, is_global_zero=True, should_stop=False)
    return model


def captioner(**scst) -> CNNRNNCaptioner:
    return captioner_with(scst={**scst_defaults(), **scst})


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
    assert resumed.trainer.should_stop and resumed.scst.state.phase == "stopped" and held(resumed) == {0.6}
    stopped = captioner(start="epoch", start_epoch=2, patience=2)  # resumed again (resume=auto): still stopped
    resumed.on_save_checkpoint(checkpoint)
    stopped.on_load_checkpoint(checkpoint)
    stopped.on_fit_start()
    assert stopped.trainer.should_stop


# -- the controller on its own (lightning_modules/captioning/scst.py) ---------------------------------------------


def test_state_round_trips_through_a_checkpoint():
    """The state is a dataclass; checkpoints hold it as plain values (weights_only loads) and give it back equal."""
    state = SCSTState(
        phase="scst",
        best_scores={"val/CIDEr": 0.7, "val/BLEU-4": 0.07},
        best_epoch=3,
        best_state={"decoder.output.weight": torch.arange(6.0).view(2, 3)},
        stale=1,
        stopped_epoch=None,
    )
    controller = SelfCritical(SCSTSettings(**scst_defaults()))
    controller.state = state
    buffer = io.BytesIO()
    torch.save({"scst": controller.state_dict()}, buffer)
    buffer.seek(0)
    loaded = SelfCritical(SCSTSettings(**scst_defaults()))
    loaded.load_state_dict(torch.load(buffer, weights_only=True)["scst"])
    restored = loaded.state
    assert isinstance(restored, SCSTState)
    assert (restored.phase, restored.best_scores, restored.best_epoch) == ("scst", state.best_scores, 3)
    assert (restored.stale, restored.stopped_epoch) == (1, None)
    assert torch.equal(restored.best_state["decoder.output.weight"], state.best_state["decoder.output.weight"])


def test_a_checkpoint_with_the_older_dict_state_resumes():
    """Checkpoints written before the controller hold the CNN-RNN module's own state dict under "scst": a module
    loading one goes on from it (here: stopped by the guard, so the resumed fit stops at once)."""
    model = captioner(start="epoch", start_epoch=2, patience=2)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    older = {
        "phase": "stopped",
        "best_scores": {"val/CIDEr": 0.6},
        "best_epoch": 1,
        "best_state": weights,
        "stale": 2,
        "stopped_epoch": 4,
    }
    buffer = io.BytesIO()
    torch.save({"state_dict": weights, "scst": older}, buffer)
    buffer.seek(0)
    model.on_load_checkpoint(torch.load(buffer, weights_only=True))
    state = model.scst.state
    assert isinstance(state, SCSTState) and (state.phase, state.best_epoch, state.stopped_epoch) == ("stopped", 1, 4)
    model.on_fit_start()
    assert model.trainer.should_stop


def test_checkpoints_without_the_newer_scst_settings_still_load():
    """model.scst of a checkpoint from before start/patience: the module builds (for eval), without SCST."""
    older = {"start_epoch": None, "num_samples": 5, "baseline": "greedy", "lr": 5e-5}
    assert captioner_with(scst=older).scst is None
    assert captioner_with(scst=None).scst is None and not captioner_with(scst=None).self_critical


def test_mean_baseline_needs_two_samples():
    with pytest.raises(UserError, match="model.scst.num_samples=1: the mean baseline"):
        SCSTSettings(**{**scst_defaults(), "baseline": "mean", "num_samples": 1})


class ConstantRollouts(torch.nn.Module):
    """A captioner of its own kind: one weight per word position, captions it is told. What SCST needs of it is
    rollouts and its trainable state (CaptioningModule's)."""

    def __init__(self, samples, greedy):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.samples, self.greedy, self.logged = samples, greedy, {}

    def rollouts(self, batch, num_samples, greedy):
        log_probs = self.weight.expand(len(self.samples), 3) - 1.0
        mask = torch.ones_like(log_probs, dtype=torch.bool)
        return Rollouts(self.samples, log_probs, mask, self.greedy if greedy else None)

    def log(self, name, value, batch_size):
        self.logged[name] = float(value)


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_the_loss_is_reinforce_with_the_cider_reward_and_its_baseline(baseline):
    """Any captioner that gives rollouts trains with it: reward CIDEr-D, minus the greedy caption's reward or the mean
    of the image's other samples, times the samples' log-probabilities."""
    samples = [["a", "red", "circle"], ["red", "red", "red"]]  # two samples of one image
    module = ConstantRollouts(samples, greedy=[["a", "small", "red", "circle"]])
    settings = {**scst_defaults(), "start": "plateau", "num_samples": 2, "baseline": baseline}
    controller = SelfCritical(SCSTSettings(**settings))
    controller.use_training_captions([[r.split() for r in refs] for refs in REFERENCES.values()])
    batch = CaptionBatch(size=1, references=[REFERENCES[1]])
    loss = controller.loss(module, batch)
    scorer, references = cider_d(), [r.split() for r in REFERENCES[1]]
    rewards = torch.tensor([scorer.score(s, references) for s in samples])
    if baseline == "greedy":
        advantage = rewards - scorer.score(module.greedy[0], references)
    else:
        advantage = rewards - rewards.flip(0)
    expected = -(advantage.view(-1, 1) * torch.full((2, 3), -1.0)).sum() / 6
    assert loss.item() == pytest.approx(expected.item()) and module.logged["train/reward"] == pytest.approx(
        rewards.mean().item()
    )
    loss.backward()
    assert module.weight.grad is not None


def test_without_the_training_captions_the_reward_is_an_error_naming_them():
    controller = SelfCritical(SCSTSettings(**scst_defaults()))
    with pytest.raises(UserError, match="training captions"):
        controller.loss(ConstantRollouts([["a"]] * 5, [["a"]]), CaptionBatch(size=1, references=[["a"]]))


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


@pytest.mark.slow
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
