"""`python run.py ...` as a user types it: in a copy of the repository, from its root, with the run dir where the
command puts it.

A `Workspace` is a copy of the repository's tracked and unignored files (about 2.6 MB) in a temporary folder. Its
`run(args)` runs `python run.py ARGS` there (cwd the copy, PROJECT_ROOT left out of the environment), so the runs go
to the copy's outputs/ and its data to the copy's data/, as they would in a clone. A test adds only what shrinks the
run (epochs, batch limits, data counts and sizes, tiny models: model.pretrained=DIR) and the inputs it is about
(ckpt_path=, data.images=, ...); never hydra.run.dir, hydra.sweep.dir or paths.*. The run dir is the one the command
printed ("run dir: ..." / "sweep dir: ...", or the "...; run dir: ..." ending the error line of a failed run), else
the one run dir the command created (a run stopped by a signal prints none).

The copy's data/ may be a link to the test session's data folder (as tests/conftest.py's `workspace` fixture makes
it): the generated shapes sets and the cached shapes classifier are then shared with the session, as a user's
data/ is shared between their runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.config import ROOT

PRINTED_DIR = re.compile(r"(?:^|; )(?:run|sweep) dir: (\S.*?)\s*$", re.M)
RUN_FOLDERS = ("runs", "multiruns", "debug")


def repository_files() -> list[str]:
    """The repository's tracked and unignored files, relative to its root (those deleted but not yet committed left
    out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [name for name in dict.fromkeys(listed) if (ROOT / name).is_file()]


@dataclass
class Command:
    """What `python run.py ARGS` did: exit code, output, the run (sweep) dirs it created under outputs/ and the last
    run or sweep dir it printed."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    created: list[Path] = field(default_factory=list)
    printed: Path | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def run_dir(self) -> Path:
        """The run (sweep) dir the command printed, else the one it created."""
        if self.printed is not None:
            return self.printed
        assert len(self.created) == 1, (
            f"python run.py {' '.join(self.args)}: no run dir printed, created {self.created}"
        )
        return self.created[0]

    def describe(self) -> str:
        command = f"python run.py {' '.join(self.args)} (exit {self.returncode})"
        return f"{command}:\n{self.stdout[-3000:]}\n{self.stderr[-6000:]}"


class Workspace:
    """A copy of the repository where commands run as typed (see the module's docstring)."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def copy(cls, destination: Path, data: Path | None = None) -> Workspace:
        """The repository copied to `destination`; with `data`, its data/ a link to that folder."""
        for name in repository_files():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(ROOT / name, destination / name)
            except FileNotFoundError:  # deleted since it was listed
                pass
        if data is not None:
            (destination / "data").symlink_to(data, target_is_directory=True)
        return cls(destination)

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def run_dirs(self, task: str, folder: str = "runs") -> list[Path]:
        """The dirs under outputs/<task>/<folder> (runs, multiruns or debug), oldest name first."""
        parent = self.outputs / task / folder
        return sorted(parent.iterdir()) if parent.is_dir() else []

    def _dirs(self) -> set[Path]:
        return {d for task in self.outputs.glob("*") for kind in RUN_FOLDERS for d in (task / kind).glob("*")}

    def run(
        self,
        args: list[str],
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: int = 600,
        full_error: bool = True,
    ) -> Command:
        """`python run.py ARGS` from the copy's root; with `full_error` (HYDRA_FULL_ERROR=1) a failure prints its
        whole traceback, without it the output is what a user sees; `env`: variables to add. With `check` a failure
        is an AssertionError showing the output."""
        environment = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "HYDRA_FULL_ERROR")}
        environment |= {"PYTHONUNBUFFERED": "1", **(env or {})}
        if full_error:
            environment["HYDRA_FULL_ERROR"] = "1"
        before = self._dirs()
        result = subprocess.run(
            [sys.executable, "run.py", *args],
            cwd=self.root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        printed = PRINTED_DIR.findall(result.stdout) or PRINTED_DIR.findall(result.stderr)
        command = Command(
            list(args),
            result.returncode,
            result.stdout,
            result.stderr,
            created=sorted(self._dirs() - before),
            printed=Path(printed[-1]) if printed else None,
        )
        if check and command.returncode != 0:
            raise AssertionError(f"failed: {command.describe()}")
        return command


def one_error_line(result: Command) -> str:
    """What a run stopped by a UserError prints (Workspace.run with full_error=False): exit code 1, no traceback, and
    one line that mentions an error, the message ending with the run dir the command created (besides INFO lines,
    e.g. Lightning's saying that it saved last.ckpt on that error)."""
    output = result.output
    assert result.returncode == 1, output[-3000:]
    info = ("INFO:", "[INFO]")
    errors = [line for line in output.splitlines() if "error" in line.lower() and not any(i in line for i in info)]
    (run_dir,) = result.created or [result.run_dir]  # resume=auto: the dir it continues, which it did not create
    assert len(errors) == 1 and errors[0].endswith(f"; run dir: {run_dir}"), output[-3000:]
    assert "Traceback" not in output
    return errors[0]
