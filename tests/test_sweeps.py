"""Multiruns end with summary.csv (grid and Optuna); a failing job fails the multirun; the SLURM launcher composes."""

import csv

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from tests.conftest import CONF, TINY_SHAPES, read_metrics, run_cli

FAST = [*TINY_SHAPES, "trainer.fast_dev_run=true"]


def read_summary(sweep_dir) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_grid_multirun_writes_summary(tmp_path, data_dir):
    result = run_cli(["seed=1,2", *FAST], tmp_path, data_dir, multirun=True)
    rows = read_summary(tmp_path)
    assert sorted(row["job"] for row in rows) == ["0", "1"]
    metric_columns = set(rows[0]) - {"job", "overrides", "status"}
    for row in rows:
        metrics = read_metrics(tmp_path / row["job"])
        assert row["status"] == "ok"
        assert f"seed={int(row['job']) + 1}" in row["overrides"].split()
        assert metric_columns == set(metrics)
        assert {name: float(row[name]) for name in metrics} == metrics
    assert f"sweep dir: {tmp_path}" in result.stdout


def test_optuna_sweep_writes_summary_best_first(tmp_path, data_dir):
    run_cli(["hparams_search=shapes_optuna", "hydra.sweeper.n_trials=4", *FAST], tmp_path, data_dir, multirun=True)
    rows = read_summary(tmp_path)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    assert all("model.optimizer.lr=" in row["overrides"] for row in rows)
    cider = [float(row["val/CIDEr"]) for row in rows]
    assert cider == sorted(cider, reverse=True)
    # The sweeper got each run's return value: its best is the summary's first row.
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == cider[0]


def test_a_failing_job_fails_the_multirun(tmp_path, data_dir):
    result = run_cli(["model.encoder.name=vgg11,small_cnn", *FAST], tmp_path, data_dir, multirun=True, check=False)
    assert result.returncode != 0
    assert "unknown encoder 'vgg11' (model.encoder.name)" in result.stdout + result.stderr
    # Hydra's grid sweep runs every job, then raises the first failure before on_multirun_end: no summary.
    assert (tmp_path / "1" / "metrics.json").is_file()
    assert not (tmp_path / "summary.csv").exists()


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
