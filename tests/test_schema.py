"""The config check (framework/schema.py, framework/checks.py): every task's config passes as it stands, and a bad
value is one line naming the key, what it got and what it takes, all of a command's bad keys at once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypedDict

import pytest

from framework.checks import check_config, check_hydra
from framework.errors import UserError
from framework.schema import MultipleOf, PositiveInt, Range, SettingsOf, check
from tests.helpers.config import CONF, compose_config

TASKS = sorted(path.stem for path in (CONF / "task").glob("*.yaml"))


def problems(overrides: list[str], tmp_path: Path) -> list[str]:
    cfg = compose_config(overrides, tmp_path, tmp_path / "data")
    try:
        check_config(cfg)
    except UserError as error:
        return str(error).splitlines()
    return []


@pytest.mark.parametrize("task", TASKS)
def test_every_task_passes_as_configured(task, tmp_path):
    """(A task may leave a key for the command line to give: `???` in its config.)"""
    assert [line for line in problems([f"task={task}"], tmp_path) if "(??? in the config)" not in line] == []


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("data.skip_bad_images=no", "data.skip_bad_images=no: takes true or false"),
        ("export_after_train=maybe", "export_after_train=maybe: takes true or false"),
        ("seed=-1", "seed=-1: takes a whole number >= 0 and <= 4294967295 (or null)"),
        ("model.optimizer.lr=abc", "model.optimizer.lr=abc: takes a number > 0"),
        ("model.optimizer.lr=0", "model.optimizer.lr=0: takes a number > 0"),
        ("+trainer.val_check_interval=0", "trainer.val_check_interval=0: takes a number > 0 (or null)"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5: takes a whole number >= -1 (or null)"),
        ("trainer.precision=17", "trainer.precision=17: takes one of auto, 32-true, 32"),
        (
            "+trainer.max_epoch=2",
            "trainer.max_epoch is not a setting of lightning.pytorch.trainer.trainer.Trainer (did you mean "
            "trainer.max_epochs?)",
        ),
        ("paths.root_dir=/nonexistent/where", "paths.root_dir=/nonexistent/where: takes an existing folder"),
        ("ckpt_path=no/such.ckpt", "ckpt_path=no/such.ckpt: takes an existing file or folder (or null)"),
        ("mode=fit", "mode=fit: takes one of train, eval, predict, export"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(override, line, tmp_path):
    found = problems([override], tmp_path)
    assert len(found) == 1 and found[0].startswith(line), found


def test_every_bad_key_of_a_command_is_named_at_once(tmp_path):
    found = problems(["data.skip_bad_images=no", "seed=-1", "model.optimizer.lr=abc"], tmp_path)
    assert [line.split("=", 1)[0] for line in found] == ["seed", "data.skip_bad_images", "model.optimizer.lr"]


def test_a_home_path_is_expanded_in_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.ckpt").write_bytes(b"")
    cfg = compose_config(["ckpt_path='~/x.ckpt'"], tmp_path, tmp_path / "data")
    check_config(cfg)
    assert cfg.ckpt_path == str(tmp_path / "x.ckpt")


def test_sweeper_trials_and_unwritable_run_dirs_are_refused(tmp_path):
    cfg = compose_config([], tmp_path, tmp_path / "data")
    hydra = {"run": {"dir": "/proc/vlx/run"}, "sweep": {"dir": str(tmp_path)}, "sweeper": {"n_trials": 0}}
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        cfg.hydra = OmegaConf.create(hydra)
    with pytest.raises(UserError, match=r"hydra\.run\.dir=/proc/vlx/run: takes a folder that can be written"):
        check_hydra(cfg, multirun=False)
    with pytest.raises(UserError, match=r"^hydra\.sweeper\.n_trials=0: takes a whole number >= 1$"):
        check_hydra(cfg, multirun=True)


# ------------------------------------------------------------------------------------- the checker on its own
class Block(TypedDict):
    kind: Literal["a", "b"]
    size: Annotated[int, Range(min=64), MultipleOf(8)]


def takes(count: PositiveInt, block: Block, nested: SettingsOf[dict] | None, flag: bool, rate: float | None) -> None:
    """A stand-in target."""


def run_check(settings: dict) -> list[str]:
    class Top(TypedDict):
        target: dict

    from omegaconf import OmegaConf

    from framework.schema import Target

    Top.__annotations__["target"] = Target
    try:
        check(OmegaConf.create({"target": {"_target_": f"{__name__}.takes", **settings}}), Top)
    except UserError as error:
        return str(error).splitlines()
    return []


def test_the_checker_reads_types_ranges_choices_and_blocks():
    good = {"count": 1, "block": {"kind": "a", "size": 64}, "nested": None, "flag": True, "rate": None}
    assert run_check(good) == []
    bad = {"count": 0, "block": {"kind": "c", "size": 100}, "nested": None, "flag": "yes", "rate": float("nan")}
    assert run_check(bad) == [
        "target.count=0: takes a whole number >= 1",
        "target.block.kind=c: takes one of a, b",
        "target.block.size=100: takes a whole number >= 64, a multiple of 8",
        "target.flag=yes: takes true or false",
        "target.rate=nan: takes a finite number (or null)",
    ]
    assert run_check({k: v for k, v in good.items() if k != "flag"}) == [
        f"target.flag is missing: {__name__}.takes needs it"
    ]
    assert run_check({**good, "block": {"kind": "a"}}) == ["target.block.size is missing: give it a value"]
