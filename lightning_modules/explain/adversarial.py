"""task=adversarial: fooling images, FGSM and PGD against a classifier, all in pixel space ([0, 1]).

- fooling: normalised gradient ascent on the target class's score, x += step_size * g / ||g||_2, until the
  classifier's argmax is the target (at most `steps` steps; each image stops as soon as it is fooled);
- fgsm: one signed-gradient step of size `epsilon` (Goodfellow et al. 2015), through captum.robust.FGSM;
- pgd: `steps` signed-gradient steps of `step_size` from a random start, projected onto the L-inf ball of radius
  `epsilon` and onto [0, 1] (Madry et al. 2018), through captum.robust.PGD.

With `target` set (or for fooling, which always has one: by default the class after the predicted one) the attack
is targeted and succeeds when the classifier predicts the target; otherwise it pushes away from the predicted
class and succeeds when the prediction changes.
Per image: adversarial/<name>.png, original | adversarial | difference (magnified to the full range) side by
side, with the classes underneath; predictions.json; metrics: success rate, iterations, L2 and L-inf size.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD

from framework.contracts import SavesPredictions
from framework.files import write_png
from framework.images import to_rgb
from framework.rendering import TILE, enlarge, grid, read_rgb, stack, with_caption
from framework.schema import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, SettingsOf
from lightning_modules.explain.base import ExplainModule, gradients, mean_metrics, write_summary
from lightning_modules.explain.classifier import classifier_to_explain

Attack = Literal["fooling", "fgsm", "pgd"]  # model.attack takes these
ATTACKS: tuple[str, ...] = get_args(Attack)
# Each attack's step_size and steps, where model.step_size / model.steps are null (conf/model/adversarial.yaml says
# so): fooling takes L2 steps, pgd L-inf ones of 2/255, fgsm one step of epsilon.
STEP_SIZE = {"fooling": 0.5, "fgsm": None, "pgd": 2 / 255}
STEPS = {"fooling": 100, "fgsm": 1, "pgd": 10}


def fooling_images(
    classifier, pixels: torch.Tensor, targets: torch.Tensor, step_size: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised gradient ascent on the target scores; returns the images and the steps each one took."""
    images, iterations = pixels.detach().clone(), torch.zeros(len(pixels), dtype=torch.long, device=pixels.device)
    for _ in range(steps):
        images.requires_grad_(True)
        logits = classifier(images)
        active = logits.argmax(1) != targets
        if not active.any():
            break
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), images)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        step = step_size * grad / norm * active.view(-1, 1, 1, 1)
        images = (images.detach() + step).clamp(0, 1)
        iterations += active
    return images.detach(), iterations


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


class AdversarialModule(ExplainModule, SavesPredictions):
    """Adversarial examples of `attack` for each image; see the module docstring. Settings:
    conf/model/adversarial.yaml."""

    def __init__(
        self,
        classifier: SettingsOf[classifier_to_explain],
        attack: Attack,
        target: NonNegativeInt | None,
        epsilon: Fraction,
        step_size: PositiveFloat | None,
        steps: PositiveInt | None,
        classes: list[str] | None,
        image_size: PositiveInt | None,
        source_size: list[int] | None,
    ):
        """`epsilon`: a pixel-space L-inf radius (pixels are in [0, 1]; 8/255 = 0.031 is usual). `step_size`, `steps`:
        null takes the attack's own (STEP_SIZE, STEPS)."""
        super().__init__(classifier, classes, image_size, source_size)
        step_size = STEP_SIZE[attack] if step_size is None else step_size
        steps = STEPS[attack] if steps is None else steps
        self.save_hyperparameters(logger=False)
        self.targeted = attack == "fooling" or target is not None
        self.target = self.check_class(target, "model.target")
        self.fgsm = FGSM(self.classifier, cross_entropy, lower_bound=0.0, upper_bound=1.0)
        self.pgd = PGD(self.classifier, cross_entropy, lower_bound=0.0, upper_bound=1.0)

    def attack(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adversarial images of a batch, with the predictions before and after, the targets and the steps taken."""
        hp = self.hparams
        with gradients():
            pixels = pixels.clone()  # a normal tensor: the predict loop made the batch under inference_mode
            with torch.no_grad():
                predicted = self.classifier(pixels).argmax(1)
            if self.target is not None:
                targets = torch.full_like(predicted, self.target)
            else:  # fooling is always targeted; untargeted attacks push away from the prediction
                targets = (predicted + 1) % len(self.class_names) if hp.attack == "fooling" else predicted
            if hp.attack == "fooling":
                adversarial, iterations = fooling_images(self.classifier, pixels, targets, hp.step_size, hp.steps)
            elif hp.attack == "fgsm":
                adversarial = self.fgsm.perturb(pixels, hp.epsilon, targets, targeted=self.targeted)
                iterations = torch.ones_like(predicted)
            else:
                adversarial = self.pgd.perturb(
                    pixels, hp.epsilon, hp.step_size, hp.steps, targets, targeted=self.targeted, random_start=True
                )
                iterations = torch.full_like(predicted, hp.steps)
        with torch.no_grad():
            fooled = self.classifier(adversarial).argmax(1)
        success = fooled == targets if self.targeted else fooled != predicted
        return {
            "images": adversarial.detach(),
            "predicted": predicted,
            "fooled": fooled,
            "targets": targets,
            "success": success,
            "iterations": iterations,
        }

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        if not self.has_images(batch):
            return []
        pixels, names = batch["images"], self.class_names
        result = self.attack(pixels)
        difference = (result["images"] - pixels).flatten(1)
        rows = []
        for i, path in enumerate(batch["paths"]):
            row = {
                "image": path,
                "predicted": names[result["predicted"][i]],
                "adversarial": names[result["fooled"][i]],
                "target": names[result["targets"][i]] if self.targeted else None,
                "success": bool(result["success"][i]),
                "iterations": int(result["iterations"][i]),
                "l2": difference[i].norm().item(),
                "linf": difference[i].abs().max().item(),
            }
            rows.append(row)
            write_png(
                self.output_dir / "adversarial" / f"{self.image_name(path)}.png",
                self._side_by_side(pixels[i], result["images"][i], row),
            )
        return rows

    def _side_by_side(self, original: torch.Tensor, adversarial: torch.Tensor, row: dict) -> np.ndarray:
        difference = adversarial - original
        scale = 0.5 / max(difference.abs().max().item(), 1e-12)  # the largest change maps to black or white
        panels = [
            (original, row["predicted"]),
            (adversarial, row["adversarial"]),
            (0.5 + scale * difference, f"difference x{scale:.0f}"),
        ]
        return grid([with_caption(enlarge(to_rgb(image), TILE), text) for image, text in panels], 3)

    def save_predictions(self, rows: list[dict], output_dir) -> dict[str, float]:
        """predictions.json, metrics (success rate, iterations, L2, L-inf) and a sheet of the first examples."""
        metrics = mean_metrics(rows)
        folder = output_dir / "adversarial"
        sheet = stack([read_rgb(folder / f"{self.image_name(row['image'])}.png") for row in rows[:8]])
        write_summary(output_dir, rows, metrics, {f"adversarial_{self.hparams.attack}": sheet})
        return metrics
