"""CNN encoder + RNN decoder captioner (Show and Tell / Show, Attend and Tell)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.images import image_transform
from datamodules.vocabulary import Vocabulary, tokenize
from framework.config import positive, to_plain
from framework.distributed import global_token_mean
from framework.errors import UserError
from lightning_modules.captioning.base import CaptioningModule
from lightning_modules.captioning.cider import CiderD
from lightning_modules.captioning.decoding import beam_search, greedy_decode, sample_decode
from lightning_modules.captioning.nets import ImageEncoder, RNNDecoder


SCST_DEFAULTS = {"start_epoch": None, "num_samples": 5, "baseline": "greedy", "lr": 5e-5}
SCST_BASELINES = ("greedy", "mean")


class CNNRNNCaptioner(CaptioningModule):
    """Everything needed to rebuild the model (vocabulary included) is in its hyperparameters,
    so `CNNRNNCaptioner.load_from_checkpoint(path)` needs no config and no data.

    Training is cross-entropy with teacher forcing, then, from epoch `scst.start_epoch` on,
    self-critical sequence training (Rennie et al. 2017): `scst.num_samples` sampled captions per
    image, rewarded by CIDEr-D against the training references, minus a baseline (the greedy
    caption's reward, or the mean reward of the image's other samples), at learning rate `scst.lr`.
    """

    # Hyperparameters that may change between training and evaluation (mode=eval passes them on).
    inference_hparams = ("beam_size", "max_len", "spice")

    def __init__(self, vocab: list[str], encoder: dict, decoder: dict, optimizer: dict,
                 scheduler: dict | None = None, max_len: int = 20, beam_size: int = 1,
                 attention_penalty: float = 1.0, label_smoothing: float = 0.0, spice: bool = False,
                 scst: dict | None = None, image_size: int | None = None):
        super().__init__(spice=spice)
        vocab, encoder, decoder = to_plain(vocab), to_plain(encoder), to_plain(decoder)
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)
        scst = {**SCST_DEFAULTS, **(to_plain(scst) or {})}
        if scst["baseline"] not in SCST_BASELINES or scst["num_samples"] < (2 if scst["baseline"] == "mean" else 1):
            raise UserError(f"model.scst.baseline must be one of {', '.join(SCST_BASELINES)} (got {scst['baseline']}) "
                            "and model.scst.num_samples at least 1 (2 for the mean baseline)")
        positive(max_len, "model.max_len", integer=True)
        positive(beam_size, "model.beam_size", integer=True)
        self.save_hyperparameters(logger=False)
        self.cider_d: CiderD | None = None
        self.vocab = Vocabulary(vocab)
        self.encoder = ImageEncoder(**encoder)
        self.decoder = RNNDecoder(len(self.vocab), self.encoder.out_channels, **decoder)

    def setup(self, stage: str) -> None:
        # A frozen encoder gives the same features every epoch: let the data module cache them.
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.encoder.finetune == "none" and hasattr(datamodule, "enable_feature_cache"):
            datamodule.enable_feature_cache(self.encoder)
        if stage == "fit" and self.hparams.scst["start_epoch"] is not None:
            # CIDEr-D document frequencies come from the training references, as in Rennie et al.
            self.cider_d = CiderD(item.tokens for item in datamodule.splits["train"])

    @property
    def self_critical(self) -> bool:
        start = self.hparams.scst["start_epoch"]
        return start is not None and self.current_epoch >= start

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder grid as a sequence [B, h*w, C], and (h, w)."""
        return self.flatten_grid(self.encoder(images))

    @staticmethod
    def flatten_grid(feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return feature_map.flatten(2).transpose(1, 2), tuple(feature_map.shape[-2:])

    def batch_features(self, batch: dict) -> torch.Tensor:
        """Encoder features [B, h*w, C] of a batch: cached feature maps when the loader serves them."""
        if "features" in batch:
            return self.flatten_grid(batch["features"].to(self.dtype))[0]
        return self.encode(batch["images"])[0]

    def targets(self, token_lists: list[list[str]]) -> torch.Tensor:
        """<bos> words <eos> ids, right-padded: [B, T]."""
        encoded = [torch.tensor(self.vocab.encode(tokens, self.hparams.max_len)) for tokens in token_lists]
        return torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=self.vocab.pad).to(self.device)

    def loss(self, batch: dict) -> torch.Tensor:
        ids = self.targets(batch["tokens"])
        logits, alphas = self.decoder(self.batch_features(batch), ids[:, :-1])
        targets = ids[:, 1:]
        token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.vocab.pad,
                                       label_smoothing=self.hparams.label_smoothing, reduction="sum")
        loss = global_token_mean(token_losses, (targets != self.vocab.pad).sum())
        if alphas is not None and self.hparams.attention_penalty:
            # Doubly stochastic attention: over the caption, every location should get about one unit of attention.
            mask = (targets != self.vocab.pad).unsqueeze(-1).to(alphas.dtype)
            loss = loss + self.hparams.attention_penalty * ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
        return loss

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.self_critical_loss(batch) if self.self_critical else self.loss(batch)

    def self_critical_loss(self, batch: dict) -> torch.Tensor:
        """REINFORCE with a baseline: -(CIDEr-D(sample) - baseline) * log p(sample), over sampled words."""
        features, samples = self.batch_features(batch), self.hparams.scst["num_samples"]
        tokens, log_probs, mask = sample_decode(self.decoder, features, self.vocab.bos, self.vocab.eos,
                                                self.hparams.max_len, samples)
        per_image = [[tokenize(r) for r in refs] for refs in batch["references"]]
        rewards = self._rewards(tokens, [refs for refs in per_image for _ in range(samples)]).view(-1, samples)
        if self.hparams.scst["baseline"] == "greedy":
            self.eval()  # the test-time caption: no dropout
            greedy = greedy_decode(self.decoder, features, self.vocab.bos, self.vocab.eos, self.hparams.max_len)[0]
            self.train()
            baseline = self._rewards(greedy, per_image).unsqueeze(1)
        else:  # mean reward of the image's other samples
            baseline = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
        self.log("train/reward", rewards.mean(), batch_size=batch["size"])
        advantage = (rewards - baseline).view(-1, 1)
        return -(advantage * log_probs * mask).sum() / mask.sum()

    def _rewards(self, tokens: torch.Tensor, references: list[list[list[str]]]) -> torch.Tensor:
        words = [self.vocab.decode(row).split() for row in tokens.tolist()]
        return torch.tensor([self.cider_d.score(w, refs) for w, refs in zip(words, references)], device=self.device)

    def on_train_epoch_start(self) -> None:
        if self.self_critical:  # SCST runs at its own constant learning rate, whatever the CE schedule says
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.hparams.scst["lr"]

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
        """Square resize to the training images' size (`image_size`, from the data) and ImageNet normalisation."""
        if self.hparams.image_size is None:
            raise UserError("this checkpoint does not record its image size (image_size): retrain it, "
                            "or build the transform with datamodules.images.image_transform(size)")
        return image_transform(self.hparams.image_size)

    def captions(self, tokens: torch.Tensor) -> list[str]:
        return [self.vocab.decode(row.tolist()) for row in tokens]

    @torch.no_grad()
    def caption_batch(self, batch: dict) -> list[str]:
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

    def configure_optimizers(self):
        encoder_params = [p for p in self.encoder.parameters() if p.requires_grad]
        groups = [{"params": list(self.decoder.parameters())}]
        if encoder_params:
            groups.append({"params": encoder_params, **({"lr": self.encoder.lr} if self.encoder.lr else {})})
        return self.optimizers_from_config(groups)
