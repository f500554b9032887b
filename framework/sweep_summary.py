"""At the end of a multirun (grid or Optuna): summary.csv in the sweep dir, one row per job, best first, failed jobs
with their error; the code's commit of each job. A sweep with a failed job exits non-zero once the summary is
written (the jobs after it still ran: run.py records a failed job instead of stopping the sweep)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework.files import atomic_write


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): writes and prints the sweep's summary."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = config.get("optimized_metric")
        rows = read_jobs(sweep_dir)
        rows.sort(key=lambda row: rank(row, metric, config.hydra.sweeper.get("direction") == "minimize"))
        path = write_summary(sweep_dir / "summary.csv", rows)
        print_summary(rows, metric, sweep_dir, path)
        failed = [row for row in rows if row["status"] != "ok"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed (their run.log has the traceback)", file=sys.stderr)
            sys.exit(1)


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir (named by job number): job, overrides, status (its status.json; a job that left none was
    killed), error, the commit it ran and the job's metrics."""
    rows = []
    for job_dir in sorted(
        (d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)
    ):
        overrides = read(job_dir / ".hydra" / "overrides.yaml", yaml.safe_load) or []
        status = read(job_dir / "status.json", json.loads) or {"status": "failed", "error": "killed (no status.json)"}
        git = (read(job_dir / "manifest.json", json.loads) or {}).get("git", {})
        rows.append(
            {
                "job": int(job_dir.name),
                "overrides": " ".join(overrides),
                "status": status["status"],
                "error": status.get("error", ""),
                "commit": git.get("commit") or "",
                "dirty": git.get("dirty", ""),
                **(read(job_dir / "metrics.json", json.loads) or {}),
            }
        )
    return rows


def read(path: Path, parse) -> Any:
    return parse(path.read_text()) if path.is_file() else None


def rank(row: dict[str, Any], metric: str | None, minimize: bool) -> tuple[int, float]:
    """Sort key: ok jobs by the metric (best first), then ok jobs without it, then failed jobs."""
    if row["status"] != "ok":
        return 2, 0.0
    value = row.get(metric) if metric else None
    if value is None or math.isnan(value):
        return 1, 0.0
    return 0, value if minimize else -value


def write_summary(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = ["job", "overrides", "status", "error", "commit", "dirty"]
    metrics = sorted({key for row in rows for key in row} - set(columns))

    def write(file) -> None:
        writer = csv.DictWriter(file, fieldnames=[*columns, *metrics])
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write)


def print_summary(rows: list[dict[str, Any]], metric: str | None, sweep_dir: Path, path: Path) -> None:
    """The jobs with the optimized metric and the overrides that differ between them; summary.csv has all."""
    from rich.console import Console
    from rich.table import Table

    shown = [metric] if metric else []
    shared = set.intersection(*(set(row["overrides"].split()) for row in rows)) if len(rows) > 1 else set()
    table = Table(title=f"sweep: {len(rows)} jobs")
    for column in ["job", "status", *shown, "overrides"]:
        table.add_column(column, justify="right" if column in shown else "left")
    for row in rows:
        values = [f"{row[name]:.4f}" if name in row else "" for name in shown]
        own = " ".join(o for o in row["overrides"].split() if o not in shared)
        table.add_row(str(row["job"]), row["status"], *values, own)
    console = Console(soft_wrap=True)  # long paths stay on one line, ready to copy
    console.print(table)
    if shared:
        console.print("in every job: " + " ".join(o for o in rows[0]["overrides"].split() if o in shared))
    console.print(f"sweep dir: {sweep_dir}")
    console.print(f"summary:   {path}")
