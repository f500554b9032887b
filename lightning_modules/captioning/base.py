"""What every captioner shares: the evaluation loop (generate, gather from all ranks, score once), predict, the
checkpoint's record of its class, and self-critical training for those that can sample (scst.py)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, TypedDict

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from datamodules.batches import CaptionBatch
from framework.contracts import HasCaptionPredictions
from framework.distributed import gather_objects
from framework.images import SkippedImages, load_rgb
from framework.optim import ConfiguredOptimizers
from lightning_modules.captioning.metrics import CaptionMetrics
from lightning_modules.captioning.scst import Rollouts, SelfCritical, load_trainable_state, trainable_state

if TYPE_CHECKING:
    from lightning_modules.captioning.clip_score import CLIPScorer

CLASS_KEY = "captioner"  # checkpoint[CLASS_KEY]: the module's class, "package.module.Class" (older ones: "Class")


class CaptionMetricSettings(TypedDict):
    """model.metrics (conf/model/metrics/default.yaml)."""

    clip: str | None  # a CLIP model: CLIPScore and RefCLIPScore


@cache
def shared_metrics(spice: bool) -> CaptionMetrics:
    """One scorer per process: METEOR's Java server takes seconds to start, so fit, test and later runs reuse it."""
    return CaptionMetrics(spice=spice)


@cache
def shared_clip_scorer(pretrained: str, device: str) -> CLIPScorer:
    """One CLIP per process and device (loading it takes a while)."""
    from lightning_modules.captioning.clip_score import CLIPScorer

    return CLIPScorer(pretrained, device)


class CaptioningModule(ConfiguredOptimizers, L.LightningModule, HasCaptionPredictions):
    """Subclasses implement `loss(batch)` and `caption_batch(batch) -> list[str]` (batches: CaptionBatch); those that
    train self-critically set `self.scst` (a SelfCritical controller) and implement `rollouts`.

    Corpus metrics are computed once per val/test epoch on rank zero, over the predictions of every
    rank deduplicated by image id (DistributedSampler pads by repeating samples), then broadcast so
    every rank logs the same `val/CIDEr`, `test/BLEU-4`, ...
    """

    def __init__(self, spice: bool, metrics: CaptionMetricSettings | None):
        """`spice`: SPICE among the metrics; `metrics`: model.metrics (conf/model/metrics/default.yaml)."""
        super().__init__()
        self.spice = spice
        self.clip_model = (metrics or {}).get("clip")  # CLIPScore and RefCLIPScore with this CLIP
        self.predictions: dict[str, dict] = {"val": {}, "test": {}}  # image_id -> caption, references, path
        self.skipped_images = SkippedImages()
        self.scst: SelfCritical | None = None  # self-critical training after cross-entropy, where the module has it

    def loss(self, batch: CaptionBatch) -> torch.Tensor:
        """Cross-entropy of the batch's captions (also logged as val/loss and test/loss)."""
        raise NotImplementedError

    def training_loss(self, batch: CaptionBatch) -> torch.Tensor:
        """What training minimises: cross-entropy, or the self-critical loss once SCST has started."""
        return self.scst.loss(self, batch) if self.self_critical else self.loss(batch)

    @property
    def self_critical(self) -> bool:
        """Whether training is self-critical now."""
        return self.scst is not None and self.scst.active

    def caption_batch(self, batch: CaptionBatch) -> list[str]:
        """Captions for a batch from the data loader (images, or cached encoder features)."""
        raise NotImplementedError

    def image_transform(self):
        """PIL image -> the image tensor `caption_batch` expects in batch.images (captioning new images)."""
        raise NotImplementedError

    # -- self-critical training (scst.py): what the controller needs of the module, and its hooks -----------------
    def rollouts(self, batch: CaptionBatch, num_samples: int, greedy: bool) -> Rollouts:
        """`num_samples` sampled captions per image with their log-probabilities (with gradients), and with `greedy`
        the test-time caption of each image: a captioner that trains self-critically implements it."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample captions for self-critical training")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what training can change (the state dict less frozen parameters)."""
        return trainable_state(self)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self, state)

    def use_training_captions(self, captions: list[list[list[str]]]) -> None:
        """The training references (per image, its captions as words), given at fit start by the runner's preparation:
        SCST's CIDEr-D document frequencies come from them."""
        if self.scst is not None:
            self.scst.use_training_captions(captions)

    def on_fit_start(self) -> None:
        if self.scst is not None:
            self.scst.on_fit_start(self.trainer)

    def on_train_epoch_start(self) -> None:
        if self.scst is not None:
            self.scst.on_train_epoch_start(self.trainer, self.current_epoch)

    def on_train_batch_start(self, batch: CaptionBatch, batch_idx: int) -> None:
        if self.scst is not None:
            self.scst.on_train_batch_start(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The class lets Captioner.from_pretrained load a checkpoint with the class that wrote it.
        checkpoint[CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.scst is not None:
            checkpoint["scst"] = self.scst.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.scst is not None and "scst" in checkpoint:  # absent from checkpoints written before the guard
            self.scst.load_state_dict(checkpoint["scst"])

    def training_step(self, batch: CaptionBatch, batch_idx: int):
        if not self.skipped_images.count("train", batch.skipped, batch.size):
            return None
        loss = self.training_loss(batch)
        # Averaged over ranks: each rank's share of the global-batch loss (global_token_mean) makes the mean the loss
        # of the whole batch, as one process logs it.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size, sync_dist=True)
        return loss

    def _evaluation_step(self, batch: CaptionBatch, stage: str) -> None:
        if not self.skipped_images.count(stage, batch.skipped, batch.size):
            return
        self.log(f"{stage}/loss", self.loss(batch), batch_size=batch.size, sync_dist=True)
        captions = self.caption_batch(batch)
        for image_id, caption, references, path in zip(batch.image_ids, captions, batch.references, batch.paths):
            self.predictions[stage][image_id] = {"caption": caption, "references": references, "path": path}

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.predictions["val"] = {}

    def on_test_epoch_start(self) -> None:
        self.predictions["test"] = {}

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def on_train_epoch_end(self) -> None:
        self.skipped_images.report("train")

    def on_predict_epoch_end(self) -> None:
        self.skipped_images.report("predict")

    def _score(self, stage: str) -> None:
        self.skipped_images.report(stage)
        merged = {}
        for part in gather_objects(self.predictions[stage]):
            merged.update(part)
        self.predictions[stage] = dict(sorted(merged.items(), key=lambda item: str(item[0])))
        scores = None
        if self.trainer.is_global_zero and merged:
            scores = shared_metrics(self.spice)(
                {i: p["references"] for i, p in merged.items()}, {i: p["caption"] for i, p in merged.items()}
            )
            if self.clip_model:
                scores |= self.clip_scores(list(merged.values()))
        scores = self.trainer.strategy.broadcast(scores)
        if not scores:
            return
        scores = {f"{stage}/{name}": float(value) for name, value in scores.items()}
        if stage == "val" and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            scores = self.after_validation(scores)
        self.log_dict(scores)

    def clip_scores(self, predictions: list[dict]) -> dict[str, float]:
        """CLIPScore and RefCLIPScore of the predictions (their images read from their paths)."""
        scorer = shared_clip_scorer(self.clip_model, str(self.device))
        images = [load_rgb(p["path"]) for p in predictions]
        return scorer(images, [p["caption"] for p in predictions], [p["references"] for p in predictions])

    def after_validation(self, scores: dict[str, float]) -> dict[str, float]:
        """Each validation of fit, with its corpus scores (`val/CIDEr`, ...) before they are logged: returns what
        to log. SCST's guard may replace the weights here: then the scores are those of the weights held afterwards,
        so that ModelCheckpoint files those weights under their own score."""
        return scores if self.scst is None else self.scst.after_validation(self, scores)

    def predict_step(self, batch: CaptionBatch, batch_idx: int) -> list[dict]:
        if not self.skipped_images.count("predict", batch.skipped, batch.size):
            return []
        return [{"image": path, "caption": caption} for path, caption in zip(batch.paths, self.caption_batch(batch))]
