"""run.py as a user runs it: train, then eval / DDP eval / resume / predict from what training left behind."""

import csv
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from framework.loggers import REVIEW_FLAGS
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from tests.helpers.cli import Workspace
from tests.helpers.config import read_metrics

pytestmark = pytest.mark.slow  # every test reads the run a module fixture trains, or runs run.py itself

EPOCHS, TRAIN_IMAGES, BATCH = 5, 320, 32
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
SMALL_DATA = [
    f"data.num_train={TRAIN_IMAGES}",
    "data.num_val=40",
    "data.num_test=40",
    f"data.batch_size={BATCH}",
    "data.num_workers=0",
]
# Training only: eval and predict with ckpt_path take the model the checkpoint holds (a model.* setting they would
# not use is an error, framework/runner.py refuse_ignored_overrides).
SMALL_SHAPES = [*SMALL_DATA, "model.decoder.hidden_dim=128"]
TEST_KEYS = ["test/BLEU-1", "test/BLEU-2", "test/BLEU-3", "test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr"]


@pytest.fixture(scope="module")
def repository(make_workspace) -> Workspace:
    """The workspace of this file's commands: the training run, and the runs that start from what it left."""
    return make_workspace()


@pytest.fixture(scope="module")
def trained(repository) -> Path:
    return repository.run([*SMALL_SHAPES, f"trainer.max_epochs={EPOCHS}", "logger=many"]).run_dir


def best_checkpoint(run_dir: Path) -> Path:
    (best,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    return best


def epoch_metrics(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_training_lowers_the_loss_and_raises_cider(trained):
    cider, loss = epoch_metrics(trained, "val/CIDEr"), epoch_metrics(trained, "val/loss")
    assert len(cider) == EPOCHS
    assert loss[-1] < loss[0] - 0.5, loss
    assert max(cider) > cider[0] + 0.5 and max(cider) > 1.0, cider  # a constant caption scores about 0.3


def test_run_dir_holds_config_metrics_checkpoints_and_media(trained):
    assert (trained / "config.yaml").is_file() and (trained / "checkpoints" / "last.ckpt").is_file()
    metrics = read_metrics(trained)
    assert set(TEST_KEYS) <= set(metrics) and "val/CIDEr" in metrics
    board = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    board.Reload()
    captions = [tag for tag in board.Tags()["images"] if tag.startswith("val/captions/")]
    assert len(captions) == 8 and "val/attention" in board.Tags()["images"]  # one card per sample image
    assert "val/predictions/text_summary" in board.Tags()["tensors"]
    assert {"train/loss", "val/CIDEr", "test/CIDEr"} <= set(board.Tags()["scalars"])
    # The run's log: our lines, Lightning's, the summary with the run dir.
    log = (trained / "run.log").read_text()
    assert "[framework.hardware][INFO] - trainer: accelerator=cpu" in log and "`Trainer.fit` stopped" in log
    assert f"test/CIDEr   │ {metrics['test/CIDEr']:.4f}" in log and f"run dir: {trained}" in log
    pinned = re.search(r"then: +http://localhost:6006/\?pinnedCards=(\S+)#timeseries", log)[1]
    assert [card["tag"] for card in json.loads(urllib.parse.unquote(pinned))] == [
        "train/loss",
        "val/loss",
        "val/CIDEr",
        "test/CIDEr",
    ]


def test_metrics_provenance_names_the_checkpoint_of_each_figure(trained):
    provenance = json.loads((trained / "metrics_provenance.json").read_text())
    last = {"checkpoint": "checkpoints/last.ckpt", "epoch": EPOCHS - 1, "global_step": EPOCHS * STEPS_PER_EPOCH}
    assert provenance["train"] == provenance["val"] == last
    cider = epoch_metrics(trained, "val/CIDEr")
    best = cider.index(max(cider))
    assert provenance["test"] == {
        "checkpoint": f"checkpoints/{best_checkpoint(trained).name}",
        "epoch": best,
        "global_step": (best + 1) * STEPS_PER_EPOCH,
        "monitor": "val/CIDEr",
        "score": pytest.approx(max(cider)),
    }
    assert read_metrics(trained)["val/CIDEr"] == pytest.approx(cider[-1])  # val/*: the last epoch, not the best


@contextmanager
def tensorboard_server(logdir: Path):
    """`tensorboard --logdir LOGDIR` with the flags the run's summary prints; its URL."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen([*command, *REVIEW_FLAGS.split()], stderr=subprocess.PIPE, text=True)
    try:
        url = next(match[1] for line in server.stderr if (match := re.search(r"(http://127\.0\.0\.1:\d+/)", line)))
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_shows_final_metrics_with_hparams_loss_first_and_every_validation(trained):
    """What a person sees in TensorBoard, read back from a TensorBoard server through the HTTP API its pages use."""
    with tensorboard_server(trained) as url:
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        query = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 9}
        deadline = time.monotonic() + 60
        while not (groups := get(f"{url}data/plugin/hparams/session_groups", query)["sessionGroups"]):
            assert time.monotonic() < deadline, "TensorBoard found no HPARAMS session"
            time.sleep(0.5)
        # HPARAMS: the run is one session, with its hyperparameters and the final metrics of metrics.json.
        (session,) = groups
        assert (
            session["hparams"]["trainer.max_epochs"] == EPOCHS and session["hparams"]["model.decoder.hidden_dim"] == 128
        )
        shown = {value["name"]["tag"]: value["value"] for value in session["metricValues"]}
        assert {name: shown[name] for name in read_metrics(trained)} == pytest.approx(read_metrics(trained))
        # CUSTOM SCALARS: loss, then the optimised metric, of every stage.
        (category,) = get(f"{url}data/plugin/custom_scalars/layout")["category"]
        assert category["title"] == "loss and val/CIDEr"
        assert [chart["title"] for chart in category["chart"]] == ["loss", "CIDEr"]
        # IMAGES and TEXT: every validation, at its step.
        validations = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
        scalars = get(f"{url}data/plugin/scalars/tags")["tensorboard"]
        assert {"lr-AdamW/decoder", "lr-AdamW/encoder"} <= set(scalars)  # named learning rates, not pg1 and pg2
        tags = get(f"{url}data/plugin/images/tags")["tensorboard"]
        cards = sorted(tag for tag in tags if tag.startswith("val/captions/"))
        assert len(cards) == 8
        for tag in [cards[0], "val/attention"]:
            images = get(f"{url}data/plugin/images/images?run=tensorboard&tag={tag}")
            assert [image["step"] for image in images] == validations
        tables = get(f"{url}data/plugin/text/text?run=tensorboard&tag=val/predictions/text_summary")
        assert [table["step"] for table in tables] == validations
        assert f"<li><strong>{cards[0].removeprefix('val/captions/')}</strong>: " in tables[-1]["text"]  # short name


class NoSpice:
    """COCOEvalCap always runs SPICE, which downloads Stanford CoreNLP: stand in for it offline."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(res)

    def method(self):
        return "SPICE"


def test_test_predictions_are_scored_by_cocoevalcap_directly(trained, tmp_path, monkeypatch):
    """test_predictions.json is a COCO results file: COCOEvalCap gives the run's own test/CIDEr."""
    from pycocoevalcap import eval as cocoeval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    monkeypatch.setattr(cocoeval, "Spice", NoSpice)

    with open(trained / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    results = json.loads((trained / "test_predictions.json").read_text())
    assert len(rows) == len(results) == 40 and [r["caption"] for r in results] == [r["prediction"] for r in rows]
    ground_truth = {
        "images": [{"id": r["image_id"]} for r in results],
        "annotations": [
            {"id": i * 100 + j, "image_id": result["image_id"], "caption": ref}
            for i, (result, row) in enumerate(zip(results, rows))
            for j, ref in enumerate(row["references"].split(" | "))
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    coco = COCO(str(tmp_path / "gt.json"))
    evaluation = COCOEvalCap(coco, coco.loadRes(str(trained / "test_predictions.json")))
    evaluation.evaluate()
    assert evaluation.eval["CIDEr"] == pytest.approx(read_metrics(trained)["test/CIDEr"], rel=1e-6)


def test_self_critical_training_raises_test_cider(trained, repository):
    """Two SCST epochs from the cross-entropy checkpoint beat it on the test split (fixed seed)."""
    run_dir = repository.run(
        [
            *SMALL_SHAPES,
            f"ckpt_path={trained}/checkpoints/last.ckpt",
            f"trainer.max_epochs={EPOCHS + 2}",
            f"model.scst.start_epoch={EPOCHS}",
            "model.scst.lr=0.0005",
            "logger=csv",
        ]
    ).run_dir
    with open(run_dir / "csv" / "metrics.csv") as f:
        rewards = [float(row["train/reward"]) for row in csv.DictReader(f) if row.get("train/reward")]
    assert rewards, "SCST never ran"
    assert read_metrics(run_dir)["test/CIDEr"] > read_metrics(trained)["test/CIDEr"]


def test_eval_reproduces_the_train_runs_test_metrics(trained, repository):
    run_dir = repository.run([*SMALL_DATA, "mode=eval", f"ckpt_path={best_checkpoint(trained)}"]).run_dir
    evaluated, during_training = read_metrics(run_dir), read_metrics(trained)
    assert {k: evaluated[k] for k in TEST_KEYS} == {k: during_training[k] for k in TEST_KEYS}
    provenance = json.loads((run_dir / "metrics_provenance.json").read_text())
    assert list(provenance) == ["test"] and provenance["test"]["checkpoint"] == str(best_checkpoint(trained))


def test_ddp_sim_eval_gives_the_single_process_metrics(trained, repository):
    run_dir = repository.run(
        [
            *SMALL_DATA,
            "mode=eval",
            "trainer=ddp_sim",
            "data.eval_batch_size=16",
            f"ckpt_path={best_checkpoint(trained)}",
        ]
    ).run_dir
    distributed, single = read_metrics(run_dir), read_metrics(trained)
    assert {k: distributed[k] for k in TEST_KEYS} == {k: single[k] for k in TEST_KEYS}


def test_last_checkpoint_is_the_last_epoch_and_best_is_kept(trained):
    last = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == EPOCHS * STEPS_PER_EPOCH
    cider = epoch_metrics(trained, "val/CIDEr")
    assert best_checkpoint(trained).name == f"epoch_{cider.index(max(cider)):03d}.ckpt"


def test_resume_from_last_continues_at_the_right_step(trained, repository):
    run_dir = repository.run(
        [*SMALL_SHAPES, f"trainer.max_epochs={EPOCHS + 1}", f"ckpt_path={trained}/checkpoints/last.ckpt"]
    ).run_dir
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == EPOCHS and resumed["global_step"] == (EPOCHS + 1) * STEPS_PER_EPOCH
    before = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert before["global_step"] == EPOCHS * STEPS_PER_EPOCH


def test_checkpoint_loads_without_config_or_data(trained):
    model = CNNRNNCaptioner.load_from_checkpoint(
        trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    ).eval()
    assert model.vocab.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "circle" in model.vocab.words
    caption = model.generate(torch.zeros(2, 3, 64, 64))
    assert len(caption) == 2 and all(isinstance(c, str) for c in caption)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(220, 30, 30), (30, 70, 225), (30, 170, 40)]):
        array = np.full((64, 64, 3), 128, np.uint8)
        array[20:44, 20:44] = colour
        Image.fromarray(array).save(images / f"square_{i}.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(images / "gray.jpg")  # grayscale is converted
    return images


def predict(repository, trained, images, *args) -> tuple[Path, list[dict]]:
    """mode=predict of the best checkpoint on the images: (its run dir, its predictions)."""
    run_dir = repository.run(
        [
            *SMALL_DATA,
            "mode=predict",
            f"ckpt_path={best_checkpoint(trained)}",
            f"data.images={images}",
            "model.beam_size=3",
            *args,
        ]
    ).run_dir
    return run_dir, json.loads((run_dir / "predictions.json").read_text())


def test_predict_with_ddp_sim_gives_every_image_once(trained, image_folder, repository):
    _, single = predict(repository, trained, image_folder)
    _, distributed = predict(repository, trained, image_folder, "trainer=ddp_sim", "data.eval_batch_size=1")
    assert distributed == single


def test_predict_captions_a_folder(trained, image_folder, repository):
    run_dir, rows = predict(repository, trained, image_folder)
    assert [Path(r["image"]).name for r in rows] == ["gray.jpg", "square_0.png", "square_1.png", "square_2.png"]
    assert all(r["caption"] for r in rows)
    with open(run_dir / "predictions.csv") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == [r["caption"] for r in rows]


def test_a_failing_run_exits_non_zero_and_names_the_run_dir(workspace):
    result = workspace.run(["mode=eval"], check=False)
    [run_dir] = result.created
    assert result.returncode != 0
    assert "mode=eval needs ckpt_path=" in result.stderr + result.stdout
    assert f"run dir: {run_dir}" in result.stderr + result.stdout
