"""What the feed-forward style modules (fast style, AdaIN) share: the stylised images written as PNG, the counts of
skipped images reported per stage, and the export (TorchScript, ONNX where `onnx` is installed, and model.json
saying what goes in and comes out; written to a temporary folder and renamed: framework.files)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from framework.files import atomic_dir, write_json, write_png
from framework.images import SkippedImages, to_rgb

log = logging.getLogger(__name__)


class FeedForwardStyle:
    """Mix into a style LightningModule (before `L.LightningModule`): `skipped_images` (the unreadable images left out
    of its batches) reported at each stage's end, and `write_stylised`."""

    skipped_images: SkippedImages

    def write_stylised(self, batch: dict, images: torch.Tensor) -> list[dict]:
        """Each stylised image of a predict batch as PNG (atomically) under <run dir>/stylized/<its name>; the rows."""
        folder = Path(self.trainer.default_root_dir) / "stylized"
        return [
            {"image": path, "stylized": str(write_png(folder / name, to_rgb(image)))}
            for image, path, name in zip(images, batch["paths"], batch["name"])
        ]

    def on_train_epoch_end(self) -> None:
        self.skipped_images.report("train")

    def on_validation_epoch_end(self) -> None:
        self.skipped_images.report("val")

    def on_predict_epoch_end(self) -> None:
        self.skipped_images.report("predict")


def export_network(
    directory: str | Path, net: nn.Module, stem: str, example: tuple, names: dict[str, dict[int, str]], info: dict
) -> Path:
    """`<stem>.pt` (scripted, so any image size works) and `<stem>.onnx` (`names`: each input's and then the output's
    name and dynamic axes; `example`: inputs to trace the ONNX graph with) of `net` in eval mode, and model.json
    (`info`)."""
    net = net.eval()
    with atomic_dir(directory) as folder:
        torch.jit.script(net).save(str(folder / f"{stem}.pt"))
        if importlib.util.find_spec("onnx") is not None:
            torch.onnx.export(
                net,
                example,
                str(folder / f"{stem}.onnx"),
                input_names=list(names)[: len(example)],
                output_names=list(names)[len(example) :],
                dynamic_axes={name: axes for name, axes in names.items() if axes},
            )
        else:
            log.info("onnx is not installed: exported TorchScript only (pip install onnx for %s.onnx too)", stem)
        write_json(folder / "model.json", info)
    return Path(directory)
