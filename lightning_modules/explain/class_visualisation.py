"""task=class_visualisation: an image per class that the classifier scores highly (Simonyan et al. 2014; Yosinski
et al. 2015 for the regularisers).

Gradient ascent from noise on the class score minus an L2 penalty on the (normalised) image, with a random
jitter (a roll of up to `jitter` pixels) at every step, a Gaussian blur every `blur_every` steps, and pixels
clamped to [0, 1]. Per class: class_visualisation/<index>_<class>.png; all classes in one sheet, also in
TensorBoard; metrics: the classifier's mean probability for the visualised classes.
"""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur

from framework.contracts import SavesPredictions
from framework.files import write_png
from framework.images import to_rgb
from framework.rendering import TILE, enlarge, grid, read_rgb, with_caption
from framework.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Seed, SettingsOf
from lightning_modules.explain.base import ExplainModule, gradients, mean_metrics, write_summary
from lightning_modules.explain.classifier import classifier_to_explain


class ClassVisualisationModule(ExplainModule, SavesPredictions):
    """Visualises the classes the data module lists (data.targets; all by default: the classifier's classes reach the
    data module through the runner's preparation, `use_class_names`). Settings: conf/model/class_visualisation.yaml."""

    data_inputs = ()  # the images it shows are its own

    def __init__(
        self,
        classifier: SettingsOf[classifier_to_explain],
        image_size: PositiveInt,
        steps: PositiveInt,
        learning_rate: PositiveFloat,
        l2: NonNegativeFloat,
        jitter: NonNegativeInt,
        blur_every: NonNegativeInt,
        blur_sigma: PositiveFloat,
        seed: Seed,
        columns: PositiveInt,
    ):
        super().__init__(classifier, classes=None, image_size=None, source_size=None)
        self.save_hyperparameters(logger=False)
        self.check_image_size(image_size, "model.image_size")

    def visualise(self, targets: torch.Tensor) -> torch.Tensor:
        """Images [len(targets), 3, S, S] in [0, 1] maximising each target's score."""
        hp = self.hparams
        generator = torch.Generator(device=targets.device).manual_seed(hp.seed)
        size = (len(targets), 3, hp.image_size, hp.image_size)
        images = (0.5 + 0.1 * torch.randn(size, generator=generator, device=targets.device)).clamp(0, 1)
        images.requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=hp.learning_rate)
        for step in range(1, hp.steps + 1):
            dx, dy = torch.randint(-hp.jitter, hp.jitter + 1, (2,), generator=generator, device=targets.device).tolist()
            shifted = images.roll((dy, dx), dims=(2, 3))
            scores = self.classifier(shifted).gather(1, targets[:, None]).sum()
            normalised = (images - self.classifier.mean) / self.classifier.std
            loss = -scores + hp.l2 * normalised.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if hp.blur_every and step % hp.blur_every == 0:
                    images.copy_(gaussian_blur(images, [3, 3], [hp.blur_sigma] * 2))
                images.clamp_(0, 1)
        return images.detach()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        with gradients():
            targets = batch["target"].clone()
            images = self.visualise(targets)
        with torch.no_grad():
            probabilities = self.classifier(images).softmax(1).gather(1, targets[:, None])[:, 0]
        rows = []
        for image, target, probability in zip(images, targets.tolist(), probabilities.tolist()):
            name = f"{target:04d}_{self.class_names[target]}".replace(" ", "_").replace("/", "_")
            write_png(self.output_dir / "class_visualisation" / f"{name}.png", to_rgb(image))
            rows.append({"image": name, "class": self.class_names[target], "probability": probability})
        return rows

    def save_predictions(self, rows: list[dict], output_dir) -> dict[str, float]:
        panels = [
            with_caption(
                enlarge(read_rgb(output_dir / "class_visualisation" / f"{row['image']}.png"), TILE),
                f"{row['class']} p={row['probability']:.2f}",
            )
            for row in rows
        ]
        metrics = mean_metrics(rows)
        sheet = grid(panels, min(self.hparams.columns, len(panels)))
        write_summary(output_dir, rows, metrics, {"class_visualisation": sheet})
        return metrics
