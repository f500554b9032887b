"""Writing outputs atomically (a temporary name in the same folder, then a rename), and into folders checked first."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from framework.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "w") -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`.

    Readers never see a half-written file and a crash leaves nothing behind.
    """
    path = Path(path)
    with cannot_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
                write(f)
            os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


@contextmanager
def cannot_write(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a read-only mount, no permission) as one UserError naming it."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"cannot write {path}: {error.strerror or error} (free space or permissions where it goes; nothing "
            "half-written was left there)"
        ) from None


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """`path`, created if missing, once a file could be written there; a UserError naming `key` otherwise (a path
    under /proc, a read-only mount, a file in the way)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise UserError(
            f"{key}: {path} must be a writable folder (writing there failed: {error.strerror or error})"
        ) from None
    return path


@contextmanager
def locked_run_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold `path`/.lock while a run writes `path`; a second run into it stops at once with a UserError naming the
    process that holds it. The file goes when the run ends, however it ends; the lock (flock) goes with the process,
    so a killed run's leftover .lock does not stop the next one."""
    path = Path(path)
    with cannot_write(path):
        path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+", encoding="utf-8") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise UserError(
                f"run dir {path} is in use: the run of process {holder} is writing it (two runs in one dir would mix "
                "their checkpoints and logs); wait for that run to end or stop it, or run in another dir"
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        try:
            yield path
        finally:
            (path / ".lock").unlink(missing_ok=True)
            # Explicitly: data-loader workers forked from this process share the lock until they exit.
            fcntl.flock(file, fcntl.LOCK_UN)


@contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock of this node's processes (flock: a process that dies releases it)."""
    with open(Path(tempfile.gettempdir()) / f"framework-{name}-{os.getuid()}.lock", "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def write_png(path: str | os.PathLike, image: Image.Image | np.ndarray) -> Path:
    """A PIL image, or a uint8 [H, W, 3] RGB array (datamodules.images.to_rgb), as a PNG file."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return atomic_write(path, lambda f: picture.save(f, format="PNG"), mode="wb")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` (an older one is removed).

    Readers see the old folder or the complete new one, and a crash leaves no partial folder behind.
    """
    path = Path(path)
    with cannot_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            tmp.chmod(0o755)  # mkdtemp creates folders readable by their owner only
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
