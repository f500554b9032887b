"""A new task is its module, its model YAML and its task YAML (and a data module or data YAML where the data is new):
docs/ARCHITECTURE.md, "Add a task". In a copy of the repository, a toy task made of exactly those three files (it
reuses the shapes classification data) trains, evaluates, predicts and exports through `python run.py`, with no
list edited anywhere else."""

from __future__ import annotations

import json

import pytest
import torch

TOY_MODULE = '''"""A toy task: a linear classifier of the shapes' class from their pixels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from framework.config import to_plain
from framework.contracts import Exports
from framework.files import atomic_write
from framework.optim import ConfiguredOptimizers
from framework.schema import PositiveInt


class ToyClassifier(ConfiguredOptimizers, L.LightningModule, Exports):
    data_inputs = ("classes", "image_size")  # from the data module, before the module is built

    def __init__(self, classes: list[str], image_size: PositiveInt, hidden: PositiveInt, optimizer: dict,
                 scheduler: dict | None):
        super().__init__()
        classes, optimizer, scheduler = to_plain(classes), to_plain(optimizer), to_plain(scheduler)
        self.save_hyperparameters(logger=False)
        layers = [torch.nn.Linear(3 * image_size**2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(classes))]
        self.net = torch.nn.Sequential(torch.nn.Flatten(), *layers)

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        loss = F.cross_entropy(self.net(batch["images"]), batch["label"])
        self.log(f"{stage}/loss", loss, batch_size=batch["size"])
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.step(batch, "test")

    def predict_step(self, batch, batch_idx):
        labels = self.net(batch["images"]).argmax(1).tolist()
        return [{"image": path, "label": self.hparams.classes[i]} for path, i in zip(batch["paths"], labels)]

    def export(self, directory) -> Path:
        path = Path(directory) / "toy.pt"
        atomic_write(path, lambda file: torch.save(self.net.state_dict(), file), mode="wb")
        return path
'''

TOY_MODEL = """_target_: lightning_modules.toy.ToyClassifier
_recursive_: false
hidden: 16
optimizer:
  _target_: torch.optim.AdamW
  _partial_: true
  lr: 0.003
scheduler: null
"""

TOY_TASK = """# @package _global_
defaults:
  - override /data: shape_classes
  - override /model: toy
  - override /callbacks: default

task_name: toy
optimized_metric: val/loss
trainer:
  max_epochs: 2
"""

SHRINK = ["data.num_train=64", "data.num_val=16", "data.num_test=16", "data.num_predict=4", "data.image_size=32"]


@pytest.mark.slow
def test_a_task_of_three_files_trains_evaluates_predicts_and_exports(workspace):
    files = {
        "lightning_modules/toy.py": TOY_MODULE,
        "conf/model/toy.yaml": TOY_MODEL,
        "conf/task/toy.yaml": TOY_TASK,
    }
    for name, text in files.items():
        (workspace.root / name).write_text(text)

    trained = workspace.run(["task=toy", *SHRINK]).run_dir
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"train/loss", "val/loss", "test/loss"} <= set(metrics)
    assert (trained / "export" / "toy.pt").is_file() and json.loads((trained / "status.json").read_text())[
        "status"
    ] == "ok"
    checkpoint = trained / "checkpoints" / "last.ckpt"

    evaluated = workspace.run(["task=toy", "mode=eval", f"ckpt_path={checkpoint}", *SHRINK]).run_dir
    assert json.loads((evaluated / "metrics.json").read_text())["test/loss"] > 0

    predicted = workspace.run(["task=toy", "mode=predict", f"ckpt_path={checkpoint}", *SHRINK]).run_dir
    rows = json.loads((predicted / "predictions.json").read_text())
    assert len(rows) == 4 and all(row["label"] in ("circle", "square", "triangle", "diamond") for row in rows)

    exported = workspace.run(["task=toy", "mode=export", f"ckpt_path={checkpoint}", *SHRINK]).run_dir
    weights = torch.load(exported / "export" / "toy.pt", weights_only=True)
    assert weights.keys() == torch.load(trained / "export" / "toy.pt", weights_only=True).keys()
