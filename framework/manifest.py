"""manifest.json: what a run ran with, so that a result can be traced back and rerun.

- git: the commit of the repository, whether its tree differed from it (tracked changes or untracked files) and a
  hash of that difference (`git diff HEAD` and the untracked files' names), so two runs with the same hash ran the
  same code;
- environment: Python, the platform, every installed package with its version;
- data and weights: each file or folder the data settings name (or a data module's own `data_paths()`, e.g. a
  generated shapes set), and the checkpoint or folder the model came from, with its size and a SHA-256 of its
  contents; one larger than `HASHED_BYTES` (or a folder with more than `HASHED_FILES` files) gets its size and
  modification time (a folder: a hash of its listing of names, sizes and modification times) instead;
- seeds and determinism: the seed, trainer.deterministic, cuDNN's benchmark and deterministic flags;
- hardware: the resolved accelerator, devices, nodes and precision, the CPU's model and its bf16/AMX/AVX-512 flags,
  the GPUs by name, torch's CUDA version.

The runner writes it when the run ends, whatever the end (framework/runner.py), next to status.json.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
HASHED_BYTES = 256 * 2**20
HASHED_FILES = 2000
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def manifest(cfg: DictConfig, data_paths: list[str] | None = None, weights: list[str] = ()) -> dict[str, Any]:
    """`data_paths`: what the data module read (its `data_paths()`), else the paths its settings name; `weights`: the
    checkpoints or folders the model came from (ckpt_path, an explaining task's model)."""
    trainer = cfg.trainer
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "git": git_state(ROOT),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": packages(),
        },
        "data": {path: describe_path(Path(path)) for path in data_paths or configured_paths(cfg)},
        "weights": {str(path): describe_path(Path(path)) for path in weights if path and Path(path).exists()},
        "seed": cfg.get("seed"),
        "determinism": {
            "trainer.deterministic": trainer.get("deterministic"),
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "torch.use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
        "hardware": {
            "accelerator": trainer.get("accelerator"),
            "devices": OmegaConf.to_container(trainer.devices)
            if OmegaConf.is_list(trainer.devices)
            else trainer.devices,
            "num_nodes": trainer.get("num_nodes"),
            "precision": str(trainer.get("precision")),
            "cpu": cpu(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }


@functools.cache
def git_state(root: Path) -> dict[str, Any]:
    """{"commit", "dirty", "diff_sha256"}; commit None outside a git checkout (an installed copy). Read once per
    process: the code a process runs is what it imported first, whatever changes later."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        untracked = git("ls-files", "--others", "--exclude-standard")
        difference = git("diff", "HEAD", "--binary") + untracked
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "diff_sha256": None}
    dirty = bool(difference)
    return {
        "commit": commit,
        "dirty": dirty,
        "diff_sha256": hashlib.sha256(difference.encode()).hexdigest() if dirty else None,
    }


def packages() -> dict[str, str]:
    found = {
        dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]
    }
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def cpu() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def configured_paths(cfg: DictConfig) -> list[str]:
    """Every existing file or folder named by a data setting (the data folder itself aside: it holds every data set)."""
    data_dir = Path(cfg.paths.data_dir).resolve() if cfg.get("paths") else None
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node and os.path.exists(node) and Path(node).resolve() != data_dir:
            found.append(node)

    walk(OmegaConf.to_container(cfg.data, resolve=True))
    return list(dict.fromkeys(found))


def describe_path(path: Path) -> dict[str, Any]:
    if path.is_file():
        size = path.stat().st_size
        if size > HASHED_BYTES:
            return {"bytes": size, "mtime": path.stat().st_mtime}
        return {"bytes": size, "sha256": file_hash(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(p, p.stat()) for p in files]
    total = sum(stat.st_size for _, stat in stats)
    digest = hashlib.sha256()
    if total <= HASHED_BYTES and len(files) <= HASHED_FILES:
        for file, _ in stats:
            digest.update(f"{file.relative_to(path)}\0{file_hash(file)}\n".encode())
        return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}
    for file, stat in stats:
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "listing_sha256": digest.hexdigest()}


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
