"""Multiruns end with summary.csv (grid and Optuna), a failing job a row of it that fails the sweep; the SLURM
launcher composes."""

import csv
import json
import subprocess

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from framework.sweep_summary import SweepSummary
from tests.helpers.config import CONF, TINY_SHAPES, read_metrics

FAST = [*TINY_SHAPES, "trainer.fast_dev_run=true"]


def read_summary(sweep_dir) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_multirun_writes_summary(workspace):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=workspace.root, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "the code of the sweep")
    result = workspace.run(["-m", "seed=1,2", *FAST])
    [sweep_dir] = result.created
    rows = read_summary(sweep_dir)
    assert sorted(row["job"] for row in rows) == ["0", "1"]
    metric_columns = set(rows[0]) - {"job", "overrides", "status", "error", "commit", "dirty"}
    for row in rows:
        metrics = read_metrics(sweep_dir / row["job"])
        assert row["status"] == "ok" and row["error"] == ""
        assert row["commit"] == git("rev-parse", "HEAD").strip() and row["dirty"] == "False"
        assert f"seed={int(row['job']) + 1}" in row["overrides"].split()
        assert metric_columns == set(metrics)
        assert {name: float(row[name]) for name in metrics} == metrics
    assert f"sweep dir: {sweep_dir}" in result.stdout


@pytest.mark.slow
def test_optuna_sweep_writes_summary_best_first(workspace):
    sweep_dir = workspace.run(["-m", "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=4", *FAST]).run_dir
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    assert all("model.optimizer.lr=" in row["overrides"] for row in rows)
    cider = [float(row["val/CIDEr"]) for row in rows]
    assert cider == sorted(cider, reverse=True)
    # The sweeper got each run's return value: its best is the summary's first row.
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == cider[0]


@pytest.mark.slow
def test_a_failing_job_is_a_row_of_the_summary_and_fails_the_sweep(workspace):
    result = workspace.run(["-m", "model.encoder.name=vgg11,small_cnn", *FAST], check=False, full_error=False)
    [sweep_dir] = result.created
    assert result.returncode == 1, result.describe()
    rows = {row["job"]: row for row in read_summary(sweep_dir)}  # the job after the failed one ran
    assert rows["1"]["status"] == "ok" and (sweep_dir / "1" / "metrics.json").is_file()
    assert rows["0"]["status"] == "failed" and "model.encoder.name=vgg11: takes one of" in rows["0"]["error"]
    # the console has the failed job's line, no traceback; the job's run.log has the traceback
    assert "Traceback" not in result.output and "1 of 2 jobs failed" in result.output
    assert any("model.encoder.name=vgg11" in line and "run failed" in line for line in result.output.splitlines())
    assert "Traceback" in (sweep_dir / "0" / "run.log").read_text()


def test_the_summary_ranks_the_jobs_best_first(tmp_path, capsys):
    """The sweep's end in this process (the multiruns above reach it through Hydra): summary.csv from the job dirs,
    best first by the optimized metric, and the sweep dir printed."""
    for job, (seed, cider) in enumerate([(1, 0.4), (2, 0.9), (3, 0.6)]):
        job_dir = tmp_path / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", "trainer.max_epochs=1"]))
        (job_dir / "status.json").write_text(json.dumps({"status": "ok"}))
        (job_dir / "metrics.json").write_text(json.dumps({"val/CIDEr": cider, "test/CIDEr": cider / 2}))
    sweep = {"sweep": {"dir": str(tmp_path)}, "sweeper": {"direction": "maximize"}}
    SweepSummary().on_multirun_end(OmegaConf.create({"optimized_metric": "val/CIDEr", "hydra": sweep}))
    rows = read_summary(tmp_path)
    assert [row["job"] for row in rows] == ["1", "2", "0"] and {row["status"] for row in rows} == {"ok"}
    assert rows[0]["overrides"] == "seed=2 trainer.max_epochs=1" and float(rows[0]["val/CIDEr"]) == 0.9
    assert f"sweep dir: {tmp_path}" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # see submitit_slurm.yaml
def test_slurm_launcher_composes():
    overrides = [
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
        local = compose("config", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True).hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 4, 4)
    assert launcher.cpus_per_task and launcher.mem_gb and launcher.timeout_min
    assert launcher.additional_parameters.requeue is True
    assert launcher.signal_delay_s > 0 and launcher.setup
    assert get_class(local._target_).__name__ == "LocalLauncher"
