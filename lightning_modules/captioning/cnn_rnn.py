"""CNN encoder + RNN decoder captioner (Show and Tell / Show, Attend and Tell)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from datamodules.captions import CaptionBatch
from framework.config import positive, to_plain
from framework.contracts import Attends, InferenceOverrides
from framework.distributed import global_token_mean
from framework.errors import UserError
from framework.images import image_transform
from framework.text import Vocabulary, tokenize
from lightning_modules.captioning.base import CaptioningModule
from lightning_modules.captioning.cider import CiderD
from lightning_modules.captioning.decoding import beam_search, greedy_decode, sample_decode
from lightning_modules.captioning.nets import ImageEncoder, RNNDecoder

log = logging.getLogger(__name__)

SCST_KEYS = ("start", "start_epoch", "patience", "num_samples", "baseline", "lr")  # defaults: conf/model/cnn_rnn.yaml
SCST_STARTS = ("epoch", "plateau")
SCST_BASELINES = ("greedy", "mean")


class CNNRNNCaptioner(CaptioningModule, InferenceOverrides, Attends):
    """Everything needed to rebuild the model (vocabulary included) is in its hyperparameters,
    so `CNNRNNCaptioner.load_from_checkpoint(path)` needs no config and no data.

    Training is cross-entropy with teacher forcing, then self-critical sequence training (Rennie et al. 2017):
    `scst.num_samples` sampled captions per image, rewarded by CIDEr-D against the training references, minus a
    baseline (the greedy caption's reward, or the mean reward of the image's other samples), at learning rate
    `scst.lr`. SCST starts at epoch `scst.start_epoch` from the weights training has reached (`scst.start=epoch`),
    or, once val CIDEr has not improved for `scst.patience` validations, from the best cross-entropy weights
    (`scst.start=plateau`).

    The guard: the module keeps the weights of the best cross-entropy validation (in checkpoints too, so that a
    resumed or continued run keeps them). When SCST holds val CIDEr below that validation's for `scst.patience`
    validations in a row, it puts those weights back and stops training (a resumed run stays stopped): the run ends
    with the cross-entropy model, which the runner's test stage then gets as the best checkpoint. Stopping, not
    more cross-entropy: cross-entropy had reached its planned epochs or its plateau before SCST started.
    """

    # Hyperparameters that may change between training and evaluation (mode=eval passes them on).
    inference_hparams = ("beam_size", "max_len", "spice")
    data_inputs = ("vocab", "image_size")  # from the data module, before the model is built (framework/preparation.py)

    def __init__(
        self,
        vocab: list[str],
        encoder: dict,
        decoder: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        max_len: int = 20,
        beam_size: int = 1,
        attention_penalty: float = 1.0,
        label_smoothing: float = 0.0,
        spice: bool = False,
        scst: dict | None = None,
        image_size: int | None = None,
    ):
        super().__init__(spice=spice)
        vocab, encoder, decoder = to_plain(vocab), to_plain(encoder), to_plain(decoder)
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)
        scst = to_plain(scst)  # None: cross-entropy only; checked when training starts (setup)
        positive(max_len, "model.max_len", integer=True)
        positive(beam_size, "model.beam_size", integer=True)
        self.save_hyperparameters(logger=False)
        self.cider_d: CiderD | None = None
        self.vocab = Vocabulary(vocab)
        self.encoder = ImageEncoder(**encoder)
        self.decoder = RNNDecoder(len(self.vocab), self.encoder.out_channels, **decoder)
        # phase: ce -> scst -> stopped (the guard put the cross-entropy weights back after epoch stopped_epoch).
        # best_*: the best cross-entropy validation (its val/* scores, epoch and trainable weights); stale: validations
        # in a row without a new best (ce) or below it (scst).
        self.scst_state = {
            "phase": "ce",
            "best_scores": None,
            "best_epoch": None,
            "best_state": None,
            "stale": 0,
            "stopped_epoch": None,
        }

    def frozen_encoder(self) -> torch.nn.Module | None:
        """The encoder when it is frozen: it gives the same features every epoch, which the data may cache."""
        return self.encoder if self.encoder.finetune == "none" else None

    def use_training_captions(self, captions: list[list[list[str]]]) -> None:
        """The training references (per image, its captions as words), given at fit start: with SCST, CIDEr-D's
        document frequencies come from them, as in Rennie et al."""
        if self.scst_planned():
            self.cider_d = CiderD(captions)

    def scst_planned(self) -> bool:
        """Whether this run's config asks for SCST (checked here: only training reads model.scst)."""
        scst = self.hparams.scst
        if scst is None:
            return False
        if missing := [key for key in SCST_KEYS if key not in scst]:
            raise UserError(f"model.scst lacks {', '.join(missing)} (see conf/model/cnn_rnn.yaml)")
        if scst["start"] not in SCST_STARTS:
            raise UserError(f"model.scst.start must be one of {', '.join(SCST_STARTS)} (got {scst['start']})")
        if scst["baseline"] not in SCST_BASELINES or scst["num_samples"] < (2 if scst["baseline"] == "mean" else 1):
            raise UserError(
                f"model.scst.baseline must be one of {', '.join(SCST_BASELINES)} (got {scst['baseline']}) "
                "and model.scst.num_samples at least 1 (2 for the mean baseline)"
            )
        positive(scst["patience"], "model.scst.patience", integer=True)
        return scst["start"] == "plateau" or scst["start_epoch"] is not None

    @property
    def self_critical(self) -> bool:
        return self.scst_state["phase"] == "scst"

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder grid as a sequence [B, h*w, C], and (h, w)."""
        return self.flatten_grid(self.encoder(images))

    @staticmethod
    def flatten_grid(feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return feature_map.flatten(2).transpose(1, 2), tuple(feature_map.shape[-2:])

    def batch_features(self, batch: CaptionBatch) -> torch.Tensor:
        """Encoder features [B, h*w, C] of a batch: cached feature maps when the loader serves them."""
        if batch.features is not None:
            return self.flatten_grid(batch.features.to(self.dtype))[0]
        return self.encode(batch.images)[0]

    def targets(self, token_lists: list[list[str]]) -> torch.Tensor:
        """<bos> words <eos> ids, right-padded: [B, T]."""
        encoded = [torch.tensor(self.vocab.encode(tokens, self.hparams.max_len)) for tokens in token_lists]
        return torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=self.vocab.pad).to(self.device)

    def loss(self, batch: CaptionBatch) -> torch.Tensor:
        ids = self.targets(batch.tokens)
        logits, alphas = self.decoder(self.batch_features(batch), ids[:, :-1])
        targets = ids[:, 1:]
        token_losses = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=self.vocab.pad,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        )
        loss = global_token_mean(token_losses, (targets != self.vocab.pad).sum())
        if alphas is not None and self.hparams.attention_penalty:
            # Doubly stochastic attention: over the caption, every location should get about one unit of attention.
            mask = (targets != self.vocab.pad).unsqueeze(-1).to(alphas.dtype)
            loss = loss + self.hparams.attention_penalty * ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
        return loss

    def training_loss(self, batch: CaptionBatch) -> torch.Tensor:
        return self.self_critical_loss(batch) if self.self_critical else self.loss(batch)

    def self_critical_loss(self, batch: CaptionBatch) -> torch.Tensor:
        """REINFORCE with a baseline: -(CIDEr-D(sample) - baseline) * log p(sample), over sampled words."""
        features, samples = self.batch_features(batch), self.hparams.scst["num_samples"]
        tokens, log_probs, mask = sample_decode(
            self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len, samples
        )
        per_image = [[tokenize(r) for r in refs] for refs in batch.references]
        rewards = self._rewards(tokens, [refs for refs in per_image for _ in range(samples)]).view(-1, samples)
        if self.hparams.scst["baseline"] == "greedy":
            self.eval()  # the test-time caption: no dropout
            greedy = greedy_decode(self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len)[0]
            self.train()
            baseline = self._rewards(greedy, per_image).unsqueeze(1)
        else:  # mean reward of the image's other samples
            baseline = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
        self.log("train/reward", rewards.mean(), batch_size=batch.size)
        advantage = (rewards - baseline).view(-1, 1)
        return -(advantage * log_probs * mask).sum() / mask.sum()

    def _rewards(self, tokens: torch.Tensor, references: list[list[list[str]]]) -> torch.Tensor:
        words = [self.vocab.decode(row).split() for row in tokens.tolist()]
        return torch.tensor([self.cider_d.score(w, refs) for w, refs in zip(words, references)], device=self.device)

    def on_fit_start(self) -> None:
        if self.scst_state["phase"] == "stopped":  # resumed (resume=auto after a preemption): the guard's stop holds
            self.trainer.should_stop = True
            if self.trainer.is_global_zero:
                log.warning(
                    "the SCST guard stopped this run after epoch %d: nothing left to train",
                    self.scst_state["stopped_epoch"],
                )

    def on_train_epoch_start(self) -> None:
        scst = self.hparams.scst
        if (
            self.scst_state["phase"] == "ce"
            and scst
            and scst["start"] == "epoch"
            and scst["start_epoch"] is not None
            and self.current_epoch >= scst["start_epoch"]
        ):
            self.start_self_critical(f"epoch {self.current_epoch}, model.scst.start_epoch={scst['start_epoch']}")

    def on_train_batch_start(self, batch: CaptionBatch, batch_idx: int) -> None:
        # SCST runs at its own constant learning rate, whatever the CE schedule says (set per step: a plateau
        # start may come from a validation in the middle of an epoch).
        if self.self_critical:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.hparams.scst["lr"]

    def start_self_critical(self, reason: str) -> None:
        state = self.scst_state
        state.update(phase="scst", stale=0)
        if not self.trainer.is_global_zero:
            return
        if state["best_scores"] is None:
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
            state["best_epoch"],
            state["best_scores"]["val/CIDEr"],
            self.hparams.scst["patience"],
        )

    def after_validation(self, scores: dict[str, float]) -> dict[str, float]:
        """Keeps the best cross-entropy weights, starts SCST at a plateau, and restores those weights (then stops
        training) when SCST stays below them: see the class docstring."""
        state, scst = self.scst_state, self.hparams.scst
        if scst is None:
            return scores
        cider = scores["val/CIDEr"]
        best = None if state["best_scores"] is None else state["best_scores"]["val/CIDEr"]
        if state["phase"] == "ce":
            if best is None or cider > best:
                state.update(
                    best_scores=scores, best_epoch=self.current_epoch, best_state=self.trainable_state(), stale=0
                )
                return scores
            state["stale"] += 1
            if scst["start"] == "plateau" and state["stale"] >= scst["patience"]:
                # The validations since the best were no better: SCST starts from the best cross-entropy weights.
                self.start_self_critical(
                    f"after epoch {self.current_epoch}: val CIDEr {cider:.4f}, no better than "
                    f"epoch {state['best_epoch']}'s {best:.4f} for {state['stale']} validation(s)"
                )
                return self.restore_best_cross_entropy()
        elif state["phase"] == "scst" and best is not None:
            state["stale"] = state["stale"] + 1 if cider < best else 0
            if state["stale"] >= scst["patience"]:
                if self.trainer.is_global_zero:
                    log.warning(
                        "SCST guard: val CIDEr %.4f below the best cross-entropy value %.4f (epoch %d) for %d "
                        "validation(s): restored the cross-entropy weights of epoch %d and stopped training",
                        cider,
                        best,
                        state["best_epoch"],
                        state["stale"],
                        state["best_epoch"],
                    )
                state.update(phase="stopped", stopped_epoch=self.current_epoch)
                self.trainer.should_stop = True
                return self.restore_best_cross_entropy()
        return scores

    @torch.no_grad()
    def restore_best_cross_entropy(self) -> dict[str, float]:
        """Puts the best cross-entropy weights back; returns their val scores, to be logged for the weights now held."""
        saved = self.scst_state["best_state"]
        for name, tensor in self.state_dict().items():  # the state dict's tensors share the parameters' storage
            if name in saved:
                tensor.copy_(saved[name])
        return self.scst_state["best_scores"]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what training can change: the state dict less frozen parameters (a frozen ResNet-50)."""
        frozen = {name for name, parameter in self.named_parameters() if not parameter.requires_grad}
        return {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.state_dict().items()
            if name not in frozen
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["scst"] = self.scst_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "scst" in checkpoint:  # absent from checkpoints written before the guard
            self.scst_state = checkpoint["scst"]

    def decode_tokens(self, features: torch.Tensor, beam_size: int | None = None) -> torch.Tensor:
        """Best captions [B, T] for encoder features [B, h*w, C] (greedy for beam size 1)."""
        beam_size = beam_size or self.hparams.beam_size
        bos, eos, max_len = self.vocab.bos, self.vocab.eos, self.hparams.max_len
        if beam_size == 1:
            return greedy_decode(self.decoder, features, bos, eos, max_len)[0]
        return beam_search(self.decoder, features, bos, eos, max_len, beam_size)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, beam_size: int | None = None) -> list[str]:
        """Captions for normalised images [B, 3, H, W]."""
        return self.captions(self.decode_tokens(self.encode(images)[0], beam_size))

    def image_transform(self):
        """Square resize to the training images' size (`image_size`, from the data) and ImageNet normalisation; None
        for a checkpoint that does not record its size."""
        return None if self.hparams.image_size is None else image_transform(self.hparams.image_size)

    def captions(self, tokens: torch.Tensor) -> list[str]:
        return [self.vocab.decode(row.tolist()) for row in tokens]

    @torch.no_grad()
    def caption_batch(self, batch: CaptionBatch) -> list[str]:
        return self.captions(self.decode_tokens(self.batch_features(batch)))

    @torch.no_grad()
    def attend(self, image: torch.Tensor) -> tuple[list[str], torch.Tensor | None]:
        """Greedy caption of one image [3, H, W] with its attention maps [words, h, w] (None without attention)."""
        features, grid = self.encode(image.unsqueeze(0))
        tokens, alphas = greedy_decode(self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len)
        words = self.vocab.decode(tokens[0].tolist()).split()
        if alphas is None:
            return words, None
        return words, alphas[0, : len(words)].reshape(len(words), *grid)

    def optimizer_params(self) -> list[dict]:
        encoder_params = [p for p in self.encoder.parameters() if p.requires_grad]
        # Named groups: LearningRateMonitor logs lr-<optimizer>/decoder and /encoder (not pg1, pg2).
        groups = [{"name": "decoder", "params": list(self.decoder.parameters())}]
        if encoder_params:
            groups.append(
                {"name": "encoder", "params": encoder_params, **({"lr": self.encoder.lr} if self.encoder.lr else {})}
            )
        return groups
