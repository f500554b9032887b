"""Files of a captioner's test predictions, next to metrics.json in the run dir.

- test_predictions.json: COCO results format, `[{"image_id": ..., "caption": ...}]`, which
  pycocoevalcap's COCOEvalCap (with COCO.loadRes) scores directly;
- test_predictions.csv: image path, prediction and references (joined with " | ").
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

from framework.contracts import HasCaptionPredictions
from framework.files import atomic_write, write_json
from framework.schema import WritableDir


class CaptionPredictions(L.Callback):
    def __init__(self, output_dir: WritableDir):
        self.output_dir = Path(output_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end runs after the module has gathered every rank's predictions (on_test_epoch_end).
        predictions = pl_module.predictions["test"] if isinstance(pl_module, HasCaptionPredictions) else None
        if not trainer.is_global_zero or not predictions:
            return
        write_json(
            self.output_dir / "test_predictions.json",
            [{"image_id": image_id, "caption": p["caption"]} for image_id, p in predictions.items()],
        )

        def write_rows(file):
            writer = csv.writer(file)
            writer.writerow(["image", "prediction", "references"])
            writer.writerows([p["path"], p["caption"], " | ".join(p["references"])] for p in predictions.values())

        atomic_write(self.output_dir / "test_predictions.csv", write_rows)
