"""Self-critical sequence training (Rennie et al. 2017) after cross-entropy, with the guard that keeps it from making a
model worse: one controller, `SelfCritical`, for any captioner that can sample captions and decode its test-time one.

SCST: `num_samples` sampled captions per image, rewarded by CIDEr-D against the image's references (document
frequencies from the training captions, as in Rennie et al.), minus a baseline: the reward of the image's greedy
caption (`baseline=greedy`), or the mean reward of its other samples (`mean`); the loss is REINFORCE's,
-(reward - baseline) * log p(sample) over the sampled words, at the constant learning rate `lr`. It starts at epoch
`start_epoch` from the weights training has reached (`start=epoch`), or, once val CIDEr has not improved for
`patience` validations, from the best cross-entropy weights (`start=plateau`).

The guard: the controller keeps the weights of the best cross-entropy validation (in checkpoints too, so that a
resumed or continued run keeps them). When SCST holds val CIDEr below that validation's for `patience` validations in
a row, it puts those weights back and stops training (a resumed run stays stopped): the run ends with the
cross-entropy model, which the runner's test stage then gets as the best checkpoint. Stopping, not more
cross-entropy: cross-entropy had reached its planned epochs or its plateau before SCST started.

What the captioner supplies (`SelfCriticalCaptioner`): `rollouts(batch, num_samples, greedy)` (sampled captions with
their log-probabilities, and its greedy captions for the baseline) and its trainable state
(`trainable_state()`, `load_trainable_state(state)`). CaptioningModule (base.py) calls the controller from its
Lightning hooks when it has one (`self.scst`); the training captions arrive at fit start through the runner's
preparation (`use_training_captions`, framework/preparation.py). Checkpoints hold the state as a plain dict under
"scst" (weights_only loads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import lightning as L
import torch

from datamodules.batches import CaptionBatch
from framework.errors import UserError
from framework.schema import NonNegativeInt, PositiveFloat, PositiveInt
from framework.text import tokenize
from lightning_modules.captioning.cider import CiderD

log = logging.getLogger(__name__)

Words = list[str]


@dataclass(frozen=True)
class SCSTSettings:
    """model.scst (defaults: conf/model/cnn_rnn.yaml)."""

    start: Literal["epoch", "plateau"]  # epoch: from start_epoch on; plateau: when val CIDEr stops improving
    start_epoch: NonNegativeInt | None  # the first SCST epoch with start=epoch; null: cross-entropy only
    patience: PositiveInt  # validations without a new best (plateau start) or below it (the guard)
    num_samples: PositiveInt  # sampled captions per image
    baseline: Literal["greedy", "mean"]
    lr: PositiveFloat  # the constant learning rate of SCST

    def __post_init__(self) -> None:
        if self.baseline == "mean" and self.num_samples < 2:
            raise UserError(
                f"model.scst.num_samples={self.num_samples}: the mean baseline (model.scst.baseline=mean) is the mean "
                "reward of an image's other samples, so it needs at least 2; or set model.scst.baseline=greedy"
            )

    @property
    def planned(self) -> bool:
        """Whether SCST may start in this run."""
        return self.start == "plateau" or self.start_epoch is not None

    @classmethod
    def complete(cls, values: dict[str, Any]) -> bool:
        """Whether `values` names every setting (checkpoints from before model.scst.start and patience do not)."""
        return {f.name for f in fields(cls)} <= set(values)


@dataclass
class SCSTState:
    """Where SCST stands. phase: ce -> scst -> stopped (the guard put the cross-entropy weights back after epoch
    stopped_epoch). best_*: the best cross-entropy validation (its val/* scores, epoch and trainable weights, on the
    CPU); stale: validations in a row without a new best (ce) or below it (scst)."""

    phase: Literal["ce", "scst", "stopped"] = "ce"
    best_scores: dict[str, float] | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint (the tensors as they are, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SCSTState:
        """From `as_dict`'s values (those of older checkpoints too: the same keys)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class Rollouts:
    """What a captioner decodes for one SCST step."""

    samples: list[Words]  # B*S sampled captions, the S of an image adjacent
    log_probs: torch.Tensor  # [B*S, T] log-probability of each sampled token, with gradients
    mask: torch.Tensor  # [B*S, T] true up to and including each sample's end token
    greedy: list[Words] | None  # the test-time caption of each image (without dropout), for the greedy baseline


class SelfCriticalCaptioner(Protocol):
    """A LightningModule that `SelfCritical` can train."""

    def rollouts(self, batch: CaptionBatch, num_samples: int, greedy: bool) -> Rollouts: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...


class SelfCritical:
    """The SCST schedule, loss and guard of one captioner (see the module's docstring)."""

    def __init__(self, settings: SCSTSettings):
        self.settings = settings
        self.state = SCSTState()
        self.cider_d: CiderD | None = None  # the reward, once the training captions are given

    @property
    def active(self) -> bool:
        """Whether training steps are self-critical now."""
        return self.state.phase == "scst"

    def use_training_captions(self, captions: list[list[list[str]]]) -> None:
        """The training references (per image, its captions as words): CIDEr-D's document frequencies."""
        if self.settings.planned:
            self.cider_d = CiderD(captions)

    # -- the loss ------------------------------------------------------------------------------------------------------
    def loss(self, module: L.LightningModule, batch: CaptionBatch) -> torch.Tensor:
        """REINFORCE with a baseline: -(CIDEr-D(sample) - baseline) * log p(sample), over sampled words."""
        samples, greedy = self.settings.num_samples, self.settings.baseline == "greedy"
        rollouts = module.rollouts(batch, samples, greedy)
        references = [[tokenize(r) for r in refs] for refs in batch.references]
        device = rollouts.log_probs.device
        rewards = self.rewards(rollouts.samples, [refs for refs in references for _ in range(samples)], device)
        rewards = rewards.view(-1, samples)
        if greedy:
            baseline = self.rewards(rollouts.greedy, references, device).unsqueeze(1)
        else:  # mean reward of the image's other samples
            baseline = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
        module.log("train/reward", rewards.mean(), batch_size=batch.size)
        advantage = (rewards - baseline).view(-1, 1)
        return -(advantage * rollouts.log_probs * rollouts.mask).sum() / rollouts.mask.sum()

    def rewards(self, captions: list[Words], references: list[list[Words]], device: torch.device) -> torch.Tensor:
        """CIDEr-D of each caption against its references."""
        if self.cider_d is None:
            raise UserError(
                "self-critical training needs the training captions (its CIDEr-D reward): train through the runner, "
                "whose preparation gives them (framework/preparation.py), or call use_training_captions first"
            )
        return torch.tensor([self.cider_d.score(w, refs) for w, refs in zip(captions, references)], device=device)

    # -- the schedule, from the module's hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer) -> None:
        if self.state.phase == "stopped":  # resumed (resume=auto after a preemption): the guard's stop holds
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning(
                    "the SCST guard stopped this run after epoch %d: nothing left to train", self.state.stopped_epoch
                )

    def on_train_epoch_start(self, trainer: L.Trainer, epoch: int) -> None:
        settings = self.settings
        if (
            self.state.phase == "ce"
            and settings.start == "epoch"
            and settings.start_epoch is not None
            and epoch >= settings.start_epoch
        ):
            self.start(trainer, f"epoch {epoch}, model.scst.start_epoch={settings.start_epoch}")

    def on_train_batch_start(self, trainer: L.Trainer) -> None:
        # SCST runs at its own constant learning rate, whatever the cross-entropy schedule says (set per step: a
        # plateau start may come from a validation in the middle of an epoch).
        if self.active:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.settings.lr

    def start(self, trainer: L.Trainer, reason: str) -> None:
        state = self.state
        state.phase, state.stale = "scst", 0
        if not trainer.is_global_zero:
            return
        if state.best_scores is None:
            log.warning(
                "self-critical training starts (%s) without the guard: this run and its checkpoint hold no "
                "cross-entropy validation to fall back on",
                reason,
            )
            return
        log.info(
            "self-critical training starts (%s); the guard restores the cross-entropy weights of epoch %d "
            "(val CIDEr %.4f) if val CIDEr stays below that for %d validation(s)",
            reason,
            state.best_epoch,
            state.best_scores["val/CIDEr"],
            self.settings.patience,
        )

    def after_validation(self, module: L.LightningModule, scores: dict[str, float]) -> dict[str, float]:
        """Keeps the best cross-entropy weights, starts SCST at a plateau, and restores those weights (then stops
        training) when SCST stays below them; returns the scores of the weights the module holds afterwards."""
        state, settings, trainer, epoch = self.state, self.settings, module.trainer, module.current_epoch
        cider = scores["val/CIDEr"]
        best = None if state.best_scores is None else state.best_scores["val/CIDEr"]
        if state.phase == "ce":
            if best is None or cider > best:
                state.best_scores, state.best_epoch, state.best_state = scores, epoch, module.trainable_state()
                state.stale = 0
                return scores
            state.stale += 1
            if settings.start == "plateau" and state.stale >= settings.patience:
                # The validations since the best were no better: SCST starts from the best cross-entropy weights.
                self.start(
                    trainer,
                    f"after epoch {epoch}: val CIDEr {cider:.4f}, no better than epoch {state.best_epoch}'s "
                    f"{best:.4f} for {state.stale} validation(s)",
                )
                return self.restore_best(module)
        elif state.phase == "scst" and best is not None:
            state.stale = state.stale + 1 if cider < best else 0
            if state.stale >= settings.patience:
                if trainer.is_global_zero:
                    log.warning(
                        "SCST guard: val CIDEr %.4f below the best cross-entropy value %.4f (epoch %d) for %d "
                        "validation(s): restored the cross-entropy weights of epoch %d and stopped training",
                        cider,
                        best,
                        state.best_epoch,
                        state.stale,
                        state.best_epoch,
                    )
                state.phase, state.stopped_epoch = "stopped", epoch
                trainer.should_stop = True
                return self.restore_best(module)
        return scores

    def restore_best(self, module: L.LightningModule) -> dict[str, float]:
        """Puts the best cross-entropy weights back; returns their val scores, to be logged for the weights now held."""
        module.load_trainable_state(self.state.best_state)
        return self.state.best_scores

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.state.as_dict()

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.state = SCSTState.from_dict(values)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training can change: the state dict less frozen parameters (a frozen ResNet-50)."""
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    return {
        name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items() if name not in frozen
    }


@torch.no_grad()
def load_trainable_state(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copies `saved` (from `trainable_state`) into the module's tensors in place."""
    for name, tensor in module.state_dict().items():  # the state dict's tensors share the parameters' storage
        if name in saved:
            tensor.copy_(saved[name])
