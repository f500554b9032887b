"""CNN encoder + RNN decoder captioner (Show and Tell / Show, Attend and Tell)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.batches import CaptionBatch
from framework.config import to_plain
from framework.contracts import InferenceOverrides
from framework.distributed import global_token_mean
from framework.images import image_transform
from framework.schema import Fraction, NonNegativeFloat, PositiveInt, SettingsOf
from framework.text import Vocabulary
from lightning_modules.captioning.base import CaptioningModule, CaptionMetricSettings
from lightning_modules.captioning.decoding import beam_search, greedy_decode, sample_decode
from lightning_modules.captioning.nets import ImageEncoder, RNNDecoder
from lightning_modules.captioning.scst import Rollouts, SCSTSettings, SelfCritical

DecoderSettings = SettingsOf[RNNDecoder, "vocab_size", "feature_dim"]  # the vocabulary's and the encoder's sizes: ours


class CNNRNNCaptioner(CaptioningModule, InferenceOverrides):
    """Everything needed to rebuild the model (vocabulary included) is in its hyperparameters,
    so `CNNRNNCaptioner.load_from_checkpoint(path)` needs no config and no data.

    Training is cross-entropy with teacher forcing, then self-critical sequence training (Rennie et al. 2017) with the
    guard that keeps it from making the model worse: `scst`, run by lightning_modules/captioning/scst.py, to which this
    module gives sampled and greedy captions (`rollouts`).
    """

    # Hyperparameters that may change between training and evaluation (mode=eval passes them on).
    inference_hparams = ("beam_size", "max_len", "spice", "metrics")
    data_inputs = ("vocab", "image_size")  # from the data module, before the model is built (framework/preparation.py)

    def __init__(
        self,
        vocab: list[str],
        encoder: SettingsOf[ImageEncoder],
        decoder: DecoderSettings,
        optimizer: dict,
        scheduler: dict | None,
        max_len: PositiveInt,
        beam_size: PositiveInt,
        attention_penalty: NonNegativeFloat,
        label_smoothing: Fraction,
        spice: bool,
        scst: SettingsOf[SCSTSettings] | None = None,
        image_size: PositiveInt | None = None,
        metrics: CaptionMetricSettings | None = None,
    ):
        """`max_len`: the longest caption in words (training targets are truncated, decoding stops); `beam_size`: 1 is
        greedy decoding; `attention_penalty`: the doubly stochastic attention regulariser; `scst`: self-critical
        training's settings (null: cross-entropy only, without the guard); `image_size`: the training images' size,
        from the data; `metrics`: model.metrics (CLIPScore). scst, image_size and metrics default to None for
        checkpoints written before them."""
        super().__init__(spice=spice, metrics=metrics)
        vocab, encoder, decoder = to_plain(vocab), to_plain(encoder), to_plain(decoder)
        optimizer, scheduler, scst, metrics = (
            to_plain(optimizer),
            to_plain(scheduler),
            to_plain(scst),
            to_plain(metrics),
        )
        self.save_hyperparameters(logger=False)
        self.vocab = Vocabulary(vocab)
        self.encoder = ImageEncoder(**encoder)
        self.decoder = RNNDecoder(len(self.vocab), self.encoder.out_channels, **decoder)
        # A checkpoint from before model.scst.start/patience holds fewer settings: it is only evaluated, never trained.
        if scst is not None and SCSTSettings.complete(scst):
            self.scst = SelfCritical(SCSTSettings(**scst))

    def frozen_encoder(self) -> torch.nn.Module | None:
        """The encoder when it is frozen: it gives the same features every epoch, which the data may cache."""
        return self.encoder if self.encoder.finetune == "none" else None

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

    def rollouts(self, batch: CaptionBatch, num_samples: int, greedy: bool) -> Rollouts:
        """SCST's captions (scst.py): `num_samples` sampled per image, with gradients, and with `greedy` the greedy
        caption of each image without dropout, all from one encoding of the batch."""
        features = self.batch_features(batch)
        tokens, log_probs, mask = sample_decode(
            self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len, num_samples
        )
        best = None
        if greedy:
            self.eval()  # the test-time caption: no dropout
            best = greedy_decode(self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len)[0]
            self.train()
        return Rollouts(self.words(tokens), log_probs, mask, None if best is None else self.words(best))

    def words(self, tokens: torch.Tensor) -> list[list[str]]:
        return [self.vocab.decode(row).split() for row in tokens.tolist()]

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
