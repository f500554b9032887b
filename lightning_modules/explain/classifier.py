"""Classifiers to explain: the shapes classifier we train (task=shapes_classifier) and torchvision's ImageNet models.

Every classifier under explanation is a `PixelClassifier`: it takes pixels in [0, 1] and normalises inside,
so attributions, attacks and their epsilons are all in pixel space, whatever normalisation the network needs.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision import models

from framework.checkpoints import check_checkpoint
from framework.config import to_plain
from framework.errors import UserError
from framework.images import IMAGENET_MEAN, IMAGENET_STD
from framework.optim import ConfiguredOptimizers
from framework.prerequisites import RequiredRun
from framework.schema import ExistingFile, PositiveInt, Range, WritableDir
from framework.weights import imagenet_state_dict
from lightning_modules.captioning.nets import SmallCNN

log = logging.getLogger(__name__)


@functools.cache
def torchvision_classifiers() -> frozenset[str]:
    return frozenset(models.list_models(module=models))


@dataclass(frozen=True)
class ClassifierName:
    """A constraint (framework/schema.py) on model.classifier.name: shapes, or a torchvision classifier's name."""

    def problem(self, value: Any) -> str | None:
        return None if value == "shapes" or value in torchvision_classifiers() else self.describe()

    def describe(self) -> str:
        return "shapes or the name of a torchvision classifier (e.g. resnet50, vgg16, densenet121)"


class PixelClassifier(nn.Module):
    """`net` behind its input normalisation: pixels [B, 3, H, W] in [0, 1] -> logits [B, len(class_names)]."""

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size: int | None = None,
    ):
        """`image_size`: the only input size the classifier knows (the shapes classifier); None: any size."""
        super().__init__()
        self.net, self.class_names, self.image_size = net, list(class_names), image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)

    def layer(self, name: str, key: str = "model.gradcam_layer") -> nn.Module:
        """The submodule of `net` called `name` (a dotted path such as layer4 or layer4.2.conv3)."""
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in self.net.named_children())
            raise UserError(
                f"the classifier has no layer '{name}' ({key}); its top-level layers are: {children} "
                "(dotted paths reach inside them)"
            ) from None

    def last_spatial_layer(self) -> str:
        """The last top-level layer whose output is still a feature map larger than 1x1 (Grad-CAM's default)."""
        shapes = {}
        hooks = [
            child.register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, out.shape))
            for name, child in self.net.named_children()
        ]
        try:
            with torch.no_grad():
                self(torch.zeros(1, 3, 64, 64, device=self.mean.device))
        finally:
            for hook in hooks:
                hook.remove()
        spatial = [name for name, shape in shapes.items() if len(shape) == 4 and shape[-1] * shape[-2] > 1]
        if not spatial:
            raise UserError("the classifier has no convolutional layer for Grad-CAM: set model.gradcam_layer")
        return spatial[-1]

    def parameterised_layers(self) -> list[str]:
        """Top-level layers of `net` that have weights, from the input to the output."""
        return [name for name, child in self.net.named_children() if any(True for _ in child.parameters())]


def required_classifier(classifier: dict) -> list[RequiredRun]:
    """The shapes classifier, when model.classifier names it without a checkpoint: the run of task=shapes_classifier
    kept in model.classifier.cache_dir, which the runner trains first if needed (framework/prerequisites.py)."""
    if classifier["name"] != "shapes" or classifier["checkpoint"] is not None:
        return []
    return [
        RequiredRun(
            "model.classifier.checkpoint", "shapes_classifier", classifier["cache_dir"], "model.classifier.cache_dir"
        )
    ]


def shapes_net(num_classes: int, width: int) -> nn.Sequential:
    """SmallCNN's four blocks, global average pooling and a linear layer, with names that read well in configs."""
    blocks = [(f"block{i}", block) for i, block in enumerate(SmallCNN(width))]
    head = [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * width, num_classes))]
    return nn.Sequential(OrderedDict(blocks + head))


class ShapesClassifier(ConfiguredOptimizers, L.LightningModule):
    """A small CNN telling the shape of a shapes image (task=shapes_classifier); `classifier` is what is explained."""

    data_inputs = ("classes", "image_size")  # from the data module, before the model is built

    def __init__(
        self,
        classes: list[str],
        optimizer: dict,
        scheduler: dict | None,
        width: PositiveInt,
        label_smoothing: Annotated[float, Range(min=0, below=1)],
        image_size: PositiveInt | None = None,
    ):
        """Settings: conf/model/shapes_classifier.yaml. From the data: `classes`, and `image_size`, of the training
        images (None in checkpoints written before it was kept: framework.config.SIGNATURE_DEFAULTS)."""
        super().__init__()
        classes, optimizer, scheduler = to_plain(classes), to_plain(optimizer), to_plain(scheduler)
        self.save_hyperparameters(logger=False)
        self.classifier = PixelClassifier(shapes_net(len(classes), width), classes, image_size=image_size)
        self.accuracy = nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(len(classes), average="micro") for stage in ("train", "val", "test")}
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["images"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.accuracy[f"{stage}_acc"](logits, batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=batch["size"], sync_dist=stage != "train")
        self.log(f"{stage}/acc", self.accuracy[f"{stage}_acc"], prog_bar=True, batch_size=batch["size"])
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")


def classifier_to_explain(
    name: Annotated[str, ClassifierName()],
    checkpoint: ExistingFile | None,
    pretrained: bool | ExistingFile,
    cache_dir: WritableDir,
) -> PixelClassifier:
    """The classifier named by model.classifier (conf/model/classifier_to_explain.yaml): `shapes` (a ShapesClassifier
    checkpoint: the runner names the one in `cache_dir`, trained there first if needed, when none is given:
    `required_classifier`) or a torchvision classifier such as resnet50 (ImageNet weights from the local torch cache,
    or from the file `pretrained` names; pretrained=false: random weights)."""
    if name == "shapes":
        if checkpoint is None:
            raise UserError(
                "model.classifier.checkpoint is not set: give a task=shapes_classifier checkpoint (python run.py "
                "fills it in, training the classifier into model.classifier.cache_dir first if it is not there)"
            )
        check_checkpoint(checkpoint, ShapesClassifier, "shapes_classifier", "model.classifier.checkpoint")
        module = ShapesClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        return module.classifier.eval()
    net = models.get_model(name, weights=None)
    if pretrained:
        net.load_state_dict(imagenet_state_dict(name, pretrained, "model.classifier.pretrained"))
    categories = models.get_model_weights(name).DEFAULT.meta["categories"]
    return PixelClassifier(net, categories).eval()
