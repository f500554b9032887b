"""A fixed VGG16/VGG19 feature extractor whose layers are addressed by name (conv1_1, relu1_1, pool1, ...).

The network stops after the last layer asked for, so deeper layers cost nothing. Weights are torchvision's
ImageNet weights (local torch cache or a file, never downloaded); random features only when allowed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import typing
from typing import Literal, TypedDict

import torch
from torch import nn

from framework.errors import UserError
from framework.images import IMAGENET_MEAN, IMAGENET_STD
from framework.weights import imagenet_state_dict

log = logging.getLogger(__name__)

Arch = Literal["vgg16", "vgg19"]
Pool = Literal["max", "avg"]
DType = Literal["auto", "bfloat16", "float32"]
# Convolutions per block (torchvision's configurations "D" and "E"); every block ends with a 2x2 pooling.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
RANDOM_SEED = 0  # random features are the same on every run and machine
DTYPES = typing.get_args(DType)


class VGGSettings(TypedDict):
    """The `vgg` block of conf/model/gatys.yaml and fast_style.yaml (their comments say what each takes), passed on to
    `VGGFeatures` with the layers the losses use."""

    arch: Arch
    pretrained: bool | str  # a .pth path is checked where it is loaded (fast style's predict does not load it)
    pool: Pool
    dtype: DType


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bfloat16 convolutions natively (elsewhere they are emulated: no faster)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # oneDNN's bf16 kernels need AVX512-BF16 or AMX
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def layer_names(arch: Arch) -> list[str]:
    """Names of the layers of `arch`'s `features`, in torchvision's order: conv1_1, relu1_1, conv1_2, ..., pool5."""
    names = []
    for block, convs in enumerate(BLOCKS[arch], start=1):
        for conv in range(1, convs + 1):
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
        names.append(f"pool{block}")
    return names


def check_layers(arch: Arch, layers, key: str) -> None:
    """A UserError naming `key` for layer names that `arch` does not have (which names exist depends on
    model.vgg.arch: checked here, when the loss is built, before any work)."""
    names = layer_names(arch)
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise UserError(
            f"{key}: unknown {arch} layer(s) {', '.join(map(str, unknown))}; valid names: {', '.join(names)}"
        )


class VGGFeatures(nn.Module):
    """Activations of the named layers (checked with `check_layers`) for RGB images in [0, 1]; the ImageNet
    normalisation is done here.

    `conv*` names are the convolutions' outputs before the ReLU; `relu*` names are after it (what Gatys et al.'s
    Caffe "conv4_2" blob held, as Caffe's ReLU works in place).

    `dtype`: what the convolutions compute in. "bfloat16" runs the network under bfloat16 autocast (the weights
    stay float32) and returns the activations as float32, so Gram matrices and losses are summed in float32;
    "auto" is bfloat16 where the device has native bfloat16 kernels, float32 elsewhere.
    """

    def __init__(
        self,
        layers: list[str],
        arch: Arch,
        pretrained: bool | str,
        pool: Pool,
        dtype: DType,
        allow_random_features: bool,
    ):
        """`arch`, `pretrained`, `pool` and `dtype`: a `VGGSettings` block (checked with the config); `layers`: names
        that `check_layers` accepted."""
        super().__init__()
        self.dtype = dtype
        names = layer_names(arch)
        self.wanted = frozenset(layers)
        self.names = names[: max(names.index(layer) for layer in layers) + 1]
        self.body = nn.Sequential(*self._build(arch, len(self.names), POOLS[pool], self.wanted))
        self.weights = self._load(arch, pretrained, allow_random_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)  # no dropout or batch norm here: train and eval mode are the same
        # NHWC: oneDNN's (CPU) and cuDNN's fastest convolutions; 1.4x faster Gatys iterations on a 2-core CPU.
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _build(arch: str, count: int, pool: type[nn.Module], wanted: frozenset) -> list[nn.Module]:
        layers, channels = [], 3
        for block, convs in enumerate(BLOCKS[arch], start=1):
            width = 64 * 2 ** min(block - 1, 3)
            for conv in range(1, convs + 1):
                # In place (no extra activation to write) unless the conv output is asked for: it must survive.
                inplace = f"conv{block}_{conv}" not in wanted
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=inplace)]
                channels = width
            layers.append(pool(2, 2))
        return layers[:count]

    def _load(self, arch: str, pretrained: bool | str, allow_random_features: bool) -> str:
        """Load ImageNet weights into the kept layers; returns what was used ("imagenet ..." or "random")."""
        if pretrained:
            try:
                state = imagenet_state_dict(arch, pretrained, "model.vgg.pretrained")
            except UserError as error:
                if not allow_random_features:
                    raise UserError(
                        f"{error} (or set model.allow_random_features=true to run with random "
                        "VGG features: texture transfer only, not the published results)"
                    ) from None
                log.warning(
                    "%s model.allow_random_features=true: using RANDOM %s features (seed %d); real "
                    "style transfer needs the ImageNet weights.",
                    error,
                    arch,
                    RANDOM_SEED,
                )
            else:
                kept = {
                    key.removeprefix("features."): value
                    for key, value in state.items()
                    if key.startswith("features.") and int(key.split(".")[1]) < len(self.body)
                }
                self.body.load_state_dict(kept)
                source = pretrained if isinstance(pretrained, str) else "the local torch cache"
                log.info("%s features: ImageNet weights from %s", arch, source)
                return f"imagenet ({source})"
        else:
            log.info("%s features: random weights (model.vgg.pretrained=false, seed %d)", arch, RANDOM_SEED)
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                # fan_in keeps the activations' scale from layer to layer, so every layer's loss counts.
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(layer.bias)
        return "random"

    def deepest(self, layers) -> str:
        return max(layers, key=self.names.index)

    def min_size(self, layers) -> int:
        """The smallest image side that still leaves a pixel at the deepest of `layers`."""
        depth = self.names.index(self.deepest(layers))
        return 2 ** sum(name.startswith("pool") for name in self.names[:depth])

    def bf16(self, device: torch.device) -> bool:
        return self.dtype == "bfloat16" or (self.dtype == "auto" and native_bf16(device.type))

    def forward(self, images: torch.Tensor, layers: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """The activations of `layers` (a subset of those built for; default: all of them), the network run only as
        deep as the deepest of them."""
        wanted = self.wanted if layers is None else layers
        depth = max(self.names.index(layer) for layer in wanted) + 1
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        features = {}
        # float32: no autocast of its own, so that a trainer.precision autocast still applies
        bf16 = self.bf16(images.device)
        with torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            for name, layer in zip(self.names[:depth], self.body):
                x = layer(x)
                if name in wanted:
                    features[name] = x
        return {name: value.float() for name, value in features.items()}
