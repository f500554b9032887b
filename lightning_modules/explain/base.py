"""What the explaining tasks share: the classifier under explanation, targets, image files and the TensorBoard summary.

They run in mode=predict (their task configs set it), built from cfg.model (no checkpoint of their own): the
constructor reads what it explains (the classifier, the captioner) and checks it against the data and the settings,
so that a bad combination stops the run before any image is read; predict_step writes each image's files as it goes
(atomically), and save_predictions(rows, output_dir) writes predictions.json, sheets and metrics at the end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from framework.config import to_plain
from framework.contracts import BuildsFromConfig
from framework.errors import UserError
from framework.files import atomic_write, write_json, write_png
from framework.images import SkippedImages
from framework.schema import PositiveInt, SettingsOf
from lightning_modules.explain.classifier import PixelClassifier, classifier_to_explain, required_classifier

log = logging.getLogger(__name__)


class ExplainBase(L.LightningModule, BuildsFromConfig):
    """What every explaining module does in the predict loop: count skipped images, name and place its files.
    mode=predict builds it from cfg.model, which names the model under explanation (BuildsFromConfig)."""

    def __init__(self):
        super().__init__()
        self.skipped_images = SkippedImages()
        self.image_root: str | None = None  # the folder of the predict images, from the data (data.images)

    def has_images(self, batch: dict) -> bool:
        """Count the unreadable images the loader left out (data.skip_bad_images); False for an empty batch."""
        return self.skipped_images.has_images(batch, "predict")

    def on_predict_epoch_end(self) -> None:
        self.skipped_images.report("predict")

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def image_name(self, path: str) -> str:
        """A file name for an image: its path under the data's folder (data.images), or its stem."""
        root = self.image_root
        relative = Path(path).relative_to(root) if root and Path(path).is_relative_to(root) else Path(Path(path).name)
        return "__".join(relative.with_suffix("").parts)


class ExplainModule(ExplainBase):
    """A LightningModule around a frozen classifier (model.classifier: conf/model/classifier_to_explain.yaml),
    loaded when the module is built, so that its classes are known before any stage. A shapes classifier that
    model.classifier names without a checkpoint is trained by the runner first (`required_runs`)."""

    data_inputs = ("classes", "image_size", "source_size")  # from the data module, before the module is built
    weights_key = "model.classifier.checkpoint"  # the weights it uses: it has no checkpoints of its own

    def __init__(
        self,
        classifier: SettingsOf[classifier_to_explain],
        classes: list[str] | None,
        image_size: PositiveInt | None,
        source_size: list[int] | None,
    ):
        """From the data module: `classes`, the labels of the data, which must be the classifier's; `image_size`, the
        size its images are resized to (None: the data has no images); for a folder of unlabelled images, the size
        they all have (`source_size`, None if they differ). The shapes classifier explains only its own kind of
        image: the synthetic shapes, square and of the size it was trained on, at that size."""
        super().__init__()
        self.classifier_config = to_plain(classifier)
        folder_of_shapes = self.classifier_config["name"] == "shapes" and classes is None and image_size is not None
        if folder_of_shapes:  # checked before the shapes classifier is read: shapes images are square
            self.check_shapes_images(source_size)
        self.classifier: PixelClassifier = classifier_to_explain(**self.classifier_config).requires_grad_(False)
        if classes is not None and list(classes) != self.class_names:
            raise UserError(
                f"the data's classes ({', '.join(classes)}) are not those of the classifier "
                f"({', '.join(self.class_names[:5])}, ...): explain labelled shapes data with "
                "model.classifier.name=shapes, or other images with data=explain_images"
            )
        if folder_of_shapes:
            self.check_shapes_images(source_size, self.classifier.image_size)
        self.check_image_size(image_size, "data.image_size")

    @classmethod
    def required_runs(cls, settings: dict) -> list:
        """The shapes classifier's training run, when model.classifier names no checkpoint of it."""
        return required_classifier(settings["classifier"])

    @staticmethod
    def check_shapes_images(source_size: list[int] | None, trained: int | None = None) -> None:
        """A UserError unless the folder's images are square, of one size, and (where known) the trained size."""
        if source_size is not None and source_size[0] == source_size[1] and trained in (None, source_size[0]):
            return
        found = "of several sizes" if source_size is None else "{}x{} px".format(*source_size)
        wanted = f"{trained}x{trained} px" if trained else "square"
        raise UserError(
            f"the images of data.images are {found}, not the {wanted} synthetic shapes images that "
            "model.classifier.name=shapes (the shapes classifier) was trained on: it would label a photo of a bird "
            "as a circle. Explain photos with an ImageNet classifier: model.classifier.name=resnet50 "
            "data.image_size=224 (its weights in the torch cache: python scripts/download_models.py resnet50), and "
            "shapes with data=shape_classes"
        )

    @property
    def class_names(self) -> list[str]:
        return self.classifier.class_names

    def check_class(self, target: int | None, key: str) -> int | None:
        """`target` if it is one of the classifier's classes (or None); a UserError naming `key` otherwise (the
        config's schema has checked that it is a whole number >= 0)."""
        if target is not None and target >= len(self.class_names):
            raise UserError(
                f"{key}={target} is not a class of the classifier: give an index in "
                f"0..{len(self.class_names) - 1} ({', '.join(self.class_names[:5])}"
                f"{', ...' if len(self.class_names) > 5 else ''})"
            )
        return target

    def check_image_size(self, image_size: int | None, key: str) -> None:
        """A UserError naming `key` when the classifier was trained on images of one size (the shapes classifier)
        and `image_size` is another: its shapes would be drawn at a scale it never saw."""
        trained = self.classifier.image_size
        if image_size is not None and trained is not None and image_size != trained:
            raise UserError(
                f"{key}={image_size}, but the classifier (model.classifier.name=shapes) was trained on "
                f"{trained} px images: set {key}={trained}, or train a shapes classifier at {image_size} "
                f"px (python run.py task=shapes_classifier data.image_size={image_size}) and give it as "
                "model.classifier.checkpoint"
            )


@contextlib.contextmanager
def gradients() -> Iterator[None]:
    """Gradients inside the predict loop, which runs under torch.inference_mode / no_grad."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), mode="wb")


def mean_metrics(rows: list[dict], prefix: str = "predict") -> dict[str, float]:
    """The mean over rows of every numeric (or boolean) field, as `prefix/field`, plus the number of rows."""
    keys = [key for key, value in rows[0].items() if isinstance(value, (bool, int, float))] if rows else []
    metrics = {f"{prefix}/{key}": float(np.mean([row[key] for row in rows])) for key in keys}
    return {f"{prefix}/images": float(len(rows)), **metrics}


def write_summary(output_dir: Path, rows: list[dict], metrics: dict[str, float], images: dict[str, np.ndarray]) -> None:
    """predictions.json, the images as PNG files in `output_dir` and, with the metrics, in TensorBoard."""
    write_json(output_dir / "predictions.json", rows)
    with SummaryWriter(str(output_dir / "tensorboard")) as board:
        for name, value in metrics.items():
            board.add_scalar(name, value, 0)
        for name, image in images.items():
            write_png(output_dir / f"{name}.png", image)
            board.add_image(name, image, 0, dataformats="HWC")
    log.info(
        "wrote %d rows to %s and %s",
        len(rows),
        output_dir / "predictions.json",
        ", ".join(f"{name}.png" for name in images),
    )
