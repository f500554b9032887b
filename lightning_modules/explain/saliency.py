"""task=saliency: attribution maps of a classifier for a batch of images at a time, and how good they are.

Per image and method: an overlay PNG (OpenCV jet colour map over the image) and the raw map (.npy) under
saliency/<method>/ (saliency/input/ holds the image as the classifier saw it). Per method: a contact sheet
(contact_sheet_<method>.png), and contact_sheet.png: a row of inputs, then a row per method; also in TensorBoard.
Measured per image, averaged into metrics.json:

- deletion_auc / insertion_auc (Petsiuk et al. 2018): the target's probability as the most important pixels
  are removed (lower is better) or put back into a blurred image (higher is better);
- pointing_game (Zhang et al. 2016), where object boxes are known (shapes): is the map's peak on the object,
  or within `pointing_tolerance` of the image side of it (Zhang et al.: 15 pixels at 224)? pointing_game_chance
  is the share of the image where a peak counts as a hit;
- spearman_<layer> (Adebayo et al. 2018): rank correlation between the map of the trained classifier and of
  a copy whose layers from the output down to <layer> are re-initialised. A map that explains the model
  should change (correlation well below 1) once the weights it depends on are random.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from torch import nn

from framework.contracts import SavesPredictions
from framework.files import write_png
from framework.images import to_rgb
from framework.rendering import SMALL_TILE, attention_overlay, enlarge, grid, read_rgb
from framework.schema import (
    Fraction,
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Seed,
    SettingsOf,
)
from lightning_modules.explain.attributions import Attributions, Method
from lightning_modules.explain.base import ExplainModule, gradients, mean_metrics, write_npy, write_summary
from lightning_modules.explain.classifier import classifier_to_explain
from lightning_modules.explain.measures import (
    cascading_randomisations,
    deletion_insertion,
    pointing_chance,
    pointing_game,
    spearman,
)


class SaliencyModule(ExplainModule, SavesPredictions):
    """Attribution maps of `methods` for the predicted class (or the class `target`), measured. Settings:
    conf/model/saliency.yaml."""

    def __init__(
        self,
        classifier: SettingsOf[classifier_to_explain],
        methods: Annotated[list[Method], NonEmpty()],
        target: NonNegativeInt | None,
        gradcam_layer: str | None,
        smoothgrad_samples: PositiveInt,
        smoothgrad_noise: NonNegativeFloat,
        ig_steps: PositiveInt,
        internal_batch_size: PositiveInt,
        deletion_steps: PositiveInt,
        pointing_tolerance: Fraction,
        randomisation: bool,
        seed: Seed,
        contact_sheet_images: PositiveInt,
        contact_sheet_columns: PositiveInt,
        classes: list[str] | None,
        image_size: PositiveInt | None,
        source_size: list[int] | None,
    ):
        super().__init__(classifier, classes, image_size, source_size)
        self.save_hyperparameters(logger=False)
        self.methods = list(methods)
        self.target = self.check_class(target, "model.target")
        settings = dict(
            gradcam_layer=gradcam_layer or self.classifier.last_spatial_layer(),
            smoothgrad_samples=smoothgrad_samples,
            smoothgrad_noise=smoothgrad_noise,
            ig_steps=ig_steps,
            internal_batch_size=internal_batch_size,
        )
        self.attributions = Attributions(self.classifier, **settings)
        randomised = cascading_randomisations(self.classifier, seed) if randomisation else []
        self.randomised_layers = [name for name, _ in randomised]
        self.randomised = nn.ModuleList(model for _, model in randomised)  # moved to the device with the module
        self.randomised_attributions = [Attributions(model, **settings) for model in self.randomised]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        if not self.has_images(batch):
            return []
        with gradients():
            pixels = batch["images"].clone().requires_grad_()  # a normal tensor: the loop made it under inference_mode
            with torch.no_grad():
                predicted = self.classifier(pixels).argmax(1)
            targets = predicted if self.target is None else torch.full_like(predicted, self.target)
            rows = [
                {"image": path, "predicted": self.class_names[p], "target": self.class_names[t]}
                for path, p, t in zip(batch["paths"], predicted.tolist(), targets.tolist())
            ]
            if "label" in batch:
                for row, label, correct in zip(rows, batch["label"].tolist(), (predicted == batch["label"]).tolist()):
                    row.update(label=self.class_names[label], correct=correct)
            if "box" in batch:
                chance = pointing_chance(batch["box"], *pixels.shape[-2:], self._tolerance(pixels))
                for row, value in zip(rows, chance.tolist()):
                    row["pointing_game_chance"] = value
            for row, image in zip(rows, pixels):  # the image as the classifier saw it, for the contact sheets
                name = self.image_name(row["image"])
                write_png(self.output_dir / "saliency" / "input" / f"{name}.png", to_rgb(image))
            for method in self.methods:
                self._measure(method, pixels, targets, batch, rows)
        return rows

    def _tolerance(self, pixels: torch.Tensor) -> float:
        """The pointing game's tolerance in pixels: a fraction of the image side."""
        return self.hparams.pointing_tolerance * max(pixels.shape[-2:])

    def _measure(self, method: str, pixels: torch.Tensor, targets: torch.Tensor, batch: dict, rows: list[dict]) -> None:
        maps = self.attributions.maps(method, pixels, targets)
        measured = dict(
            zip(
                ("deletion_auc", "insertion_auc"),
                deletion_insertion(self.classifier, pixels, maps, targets, self.hparams.deletion_steps),
            )
        )
        if "box" in batch:
            measured["pointing_game"] = pointing_game(maps, batch["box"], self._tolerance(pixels))
        for layer, attributions in zip(self.randomised_layers, self.randomised_attributions):
            measured[f"spearman_{layer}"] = spearman(maps, attributions.maps(method, pixels, targets))
        folder = self.output_dir / "saliency" / method
        for i, row in enumerate(rows):
            name = self.image_name(row["image"])
            write_png(folder / f"{name}.png", attention_overlay(to_rgb(pixels[i]), maps[i].cpu().numpy()))
            write_npy(folder / f"{name}.npy", maps[i].cpu().numpy())
            row.update({f"{method}/{key}": value[i].item() for key, value in measured.items()})

    def save_predictions(self, rows: list[dict], output_dir) -> dict[str, float]:
        """predictions.json (every image's figures), the contact sheets and metrics, also in TensorBoard."""
        shown = rows[: self.hparams.contact_sheet_images]
        panels = {
            folder: [enlarge(self._tile(output_dir, folder, row), SMALL_TILE) for row in shown]
            for folder in ("input", *self.methods)
        }
        columns = min(self.hparams.contact_sheet_columns, len(shown))
        sheets = {f"contact_sheet_{method}": grid(panels[method], columns) for method in self.methods}
        sheets["contact_sheet"] = grid([tile for tiles in panels.values() for tile in tiles], len(shown))
        metrics = mean_metrics(rows)
        write_summary(output_dir, rows, metrics, sheets)
        return metrics

    def _tile(self, output_dir, folder: str, row: dict) -> np.ndarray:
        return read_rgb(output_dir / "saliency" / folder / f"{self.image_name(row['image'])}.png")
