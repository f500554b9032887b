"""Johnson et al. (2016), "Perceptual Losses for Real-Time Style Transfer and Super-Resolution": a feed-forward
image transformation network trained for one style on content images, scored by VGG perceptual losses.

The network is in nets.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from framework.config import to_plain
from framework.contracts import Exports, InferenceOverrides
from framework.errors import UserError
from framework.images import SkippedImages
from framework.loggers import tensorboard
from framework.optim import ConfiguredOptimizers
from framework.schema import NonNegativeFloat, PositiveFloat, PositiveInt, SettingsOf, Target
from lightning_modules.style.feedforward import FeedForwardStyle, export_network
from lightning_modules.style.images import ColorMode, content_colored
from lightning_modules.style.losses import Layers, LayerWeights, build_perceptual_loss
from lightning_modules.style.nets import TransformerNet
from lightning_modules.style.vgg import VGGSettings

log = logging.getLogger(__name__)


class FastStyle(ConfiguredOptimizers, FeedForwardStyle, L.LightningModule, Exports, InferenceOverrides):
    """Trains `TransformerNet` for the `style` image ([3, H, W] in [0, 1]) on square crops of `crop_size` px, both
    from the data module and only given to train: a checkpoint loaded for predict or export is built without them
    (framework.config.SIGNATURE_DEFAULTS). The VGG loss network is not saved in checkpoints: stylising needs the
    transformation net only. Validation scores the held-out content images (`val/content_loss`, `val/style_loss`,
    `val/ssim`: losses.style_scores). `preserve_color` applies when stylising (predict): the network's style is fixed,
    so the content's colours are given back afterwards (images.content_colored). The other arguments and their
    defaults: conf/model/fast_style.yaml."""

    data_inputs = ("style", "crop_size")  # from the data module, before the model is built to train
    inference_hparams = ("preserve_color",)

    def __init__(
        self,
        net: SettingsOf[TransformerNet],
        vgg: VGGSettings,
        optimizer: Target,
        allow_random_features: bool,
        content_layers: Layers,
        style_layers: LayerWeights,
        content_weight: NonNegativeFloat,
        style_weight: PositiveFloat,
        tv_weight: NonNegativeFloat,
        image_every_n_steps: PositiveInt,
        preserve_color: ColorMode | None,
        style: torch.Tensor | None = None,
        crop_size: PositiveInt | None = None,
    ):
        super().__init__()
        net, vgg, optimizer = to_plain(net), to_plain(vgg), to_plain(optimizer)
        content_layers, style_layers = list(to_plain(content_layers)), to_plain(style_layers)
        self.save_hyperparameters(ignore=["style", "crop_size"], logger=False)
        self.net = TransformerNet(**net)
        self.skipped_images = SkippedImages()
        self.loss = None
        if style is not None:  # training
            self.loss = build_perceptual_loss(
                vgg, allow_random_features, content_layers, style_layers, content_weight, style_weight, tv_weight
            )
            self.check_sizes(style, crop_size)
            self.register_buffer("style", style.unsqueeze(0), persistent=False)
            self.strict_loading = False  # resuming: the checkpoint has no loss network, this module has one

    def check_sizes(self, style: torch.Tensor, crop_size: int | None) -> None:
        """The style image and the training crops against the loss network's deepest layer and the transformation
        net's smallest input: one error naming the data key, before training starts."""
        need, layer = self.loss.min_size, self.loss.deepest
        height, width = style.shape[-2:]
        if min(height, width) < need:
            raise UserError(
                f"data.style: the style image is {width}x{height} px as resized (its longer side data.style_size, or "
                f"data.image_size where that is null): layer {layer} needs at least {need} px a side; raise "
                "data.style_size or use a less elongated style image"
            )
        smallest = max(need, TransformerNet.min_size)
        if crop_size is not None and crop_size < smallest:
            raise UserError(
                f"data.image_size={crop_size}: the training crops must be at least {smallest} px (layer {layer} of "
                f"the loss network needs {need} px, the transformation net {TransformerNet.min_size} px)"
            )

    def state_dict(self, *args, **kwargs):
        # Checkpoints hold the transformation net only (the loss network is fixed ImageNet VGG).
        state = super().state_dict(*args, **kwargs)
        return {key: value for key, value in state.items() if not key.startswith("loss.")}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        self.loss.set_style([self.style], [1.0])
        log.info("fast style: VGG features %s", self.loss.features.weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if not self.skipped_images.has_images(batch, "train"):
            return None
        content = batch["images"]
        output = self.net(content)
        parts = self.loss(output, self.loss.content_targets(content))
        self.log_dict(
            {f"train/{name}": value for name, value in parts.items() if name != "loss"}, batch_size=len(content)
        )
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=len(content))
        board = tensorboard(self.trainer)
        if board is not None and self.global_step % self.hparams.image_every_n_steps == 0:
            board.add_images("train/stylized", torch.cat([content[:4], output[:4].detach()]), self.global_step)
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.skipped_images.has_images(batch, "val"):
            return
        scores = self.loss.scores(self.net(batch["images"]), batch["images"])
        self.log_dict({f"val/{name}": value for name, value in scores.items()}, batch_size=len(batch["images"]))

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Stylises a batch and writes each result as PNG (atomically) under <run dir>/stylized/."""
        if not self.skipped_images.has_images(batch, "predict"):
            return []
        images = batch["images"]
        return self.write_stylised(batch, content_colored(self(images), images, self.hparams.preserve_color))

    def export(self, directory: str | Path) -> Path:
        """TorchScript (`fast_style.pt`, `torch.jit.load(path)(images)`; scripted, so any image size works), and
        ONNX when `onnx` is installed."""
        net = TransformerNet(**self.hparams.net)
        net.load_state_dict(self.net.state_dict())
        info = {
            "input": "RGB float [B, 3, H, W] in [0, 1]",
            "output": "stylised RGB float [B, 3, H, W] in [0, 1]",
            "net": self.hparams.net,
        }
        axes = {0: "batch", 2: "height", 3: "width"}
        return export_network(
            directory, net, "fast_style", (torch.rand(1, 3, 64, 64),), {"images": axes, "stylized": axes}, info
        )

    def optimizer_params(self):
        # Every parameter, the frozen loss network's too, as before: resumed checkpoints hold groups of that size.
        return self.trainer.model.parameters()
