"""The type and range of every setting, declared once where the setting is taken, and the check of a composed config
against them before anything runs.

A setting's default lives in conf/ (its YAML); its type lives in the signature of the class or function whose
`_target_` takes it, as an annotation: `batch_size: PositiveInt`, `skip_bad_images: bool`, `attack: Literal["pgd",
"fgsm"]`, `resolution: Annotated[int, Range(min=64), MultipleOf(8)]`, `folder: ExistingDir`. A block of settings that a
class passes on (`encoder: SettingsOf[ImageEncoder]`) is checked against that class's signature; a block with no class
of its own is a TypedDict. Third-party targets (torch optimizers, Lightning's Trainer and callbacks) are checked against
their own annotations, where those say something checkable.

`check(cfg, top)` walks the composed config: every key of every `_target_` node must be a parameter of the target
(a misspelt `+trainer.max_epoch=2` is named, with the nearest setting), every value must be what its annotation takes
(a boolean is true or false, nothing else; a number is finite), parameters without a default must be given (those the
model takes from its data, `data_inputs`, aside), and the keys outside targets are checked against `top`, a TypedDict.
Paths given with `~` are expanded in the config. Every problem is one line naming the key, what it got and what it
takes; all of a config's problems are raised at once, in one UserError.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import os
import pathlib
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from framework.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
MISSING = object()
REFERENCE = re.compile(r"\$\{[\w.]+\}")  # a value that is another key's


# -- constraints, used inside Annotated[...] ------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """min/max: inclusive bounds; above/below: exclusive ones."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None

    def problem(self, value: Any) -> str | None:
        ok = (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.above is None or value > self.above)
            and (self.below is None or value < self.below)
        )
        return None if ok else self.describe()

    def describe(self) -> str:
        bounds = {">=": self.min, ">": self.above, "<=": self.max, "<": self.below}
        return " and ".join(
            f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}"
            for sign, bound in bounds.items()
            if bound is not None
        )


@dataclass(frozen=True)
class MultipleOf:
    factor: int

    def problem(self, value: Any) -> str | None:
        return None if value % self.factor == 0 else self.describe()

    def describe(self) -> str:
        return f"a multiple of {self.factor}"


@dataclass(frozen=True)
class NonEmpty:
    def problem(self, value: Any) -> str | None:
        return None if len(value) else self.describe()

    def describe(self) -> str:
        return "at least one"


@dataclass(frozen=True)
class PathTo:
    """A path (`~` expanded) that must be: "file" (readable), "dir" (an existing folder), "writable" (a folder that is
    or can be created and written; nothing is created by the check), or "any" (a file or a folder that exists)."""

    kind: Literal["file", "dir", "writable", "any"]

    def problem(self, value: Any) -> str | None:
        path = pathlib.Path(value)
        if self.kind == "file" and not (path.is_file() and os.access(path, os.R_OK)):
            return "an existing, readable file" + (" (this is a folder)" if path.is_dir() else "")
        if self.kind == "dir" and not path.is_dir():
            return "an existing folder" + (" (this is a file)" if path.exists() else "")
        if self.kind == "any" and not path.exists():
            return "an existing file or folder"
        if self.kind == "writable":
            existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
            if existing is None or not existing.is_dir() or not can_create_in(existing):
                return f"a folder that can be written ({existing or path} is {'not' if existing else 'not there,'} one)"
        return None

    def describe(self) -> str:
        return {"file": "a readable file", "dir": "an existing folder", "writable": "a writable folder"}.get(
            self.kind, "an existing file or folder"
        )


def can_create_in(folder: pathlib.Path) -> bool:
    """Whether a file can be made in `folder` (tried with a temporary file, gone at once: permissions alone do not say
    it for root, /proc or a read-only mount)."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


class SettingsOf:
    """`SettingsOf[cls]`: a block of settings passed on as `cls(**block)`, checked against cls's signature;
    `SettingsOf[cls, "a", ...]`: cls's arguments a, ... are given by the class that builds it, not by the block."""

    def __class_getitem__(cls, item):
        target, *given = item if isinstance(item, tuple) else (item,)
        return Annotated[dict, _Settings(target, tuple(given))]


@dataclass(frozen=True)
class _Settings:
    target: Any
    given: tuple[str, ...] = ()


# -- the common types ------------------------------------------------------------------------------------------------
PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(above=0)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Fraction = Annotated[float, Range(min=0, max=1)]  # a probability, a share
Seed = Annotated[int, Range(min=0, max=2**32 - 1)]  # what numpy's and torch's generators take
ExistingFile = Annotated[str, PathTo("file")]
ExistingDir = Annotated[str, PathTo("dir")]
ExistingPath = Annotated[str, PathTo("any")]
WritableDir = Annotated[str, PathTo("writable")]


# -- checking --------------------------------------------------------------------------------------------------------
def check(cfg: DictConfig, top: type, skip: tuple[str, ...] = ("hydra",), partial_paths: bool = False) -> None:
    """Check `cfg` in place (expanding `~` in paths); a UserError with one line per problem. `top`: the TypedDict of
    the keys outside targets (its values may be further TypedDicts or target nodes, `Target`)."""
    values = resolved(cfg)
    checker = Checker(partial_paths)
    checker.check(values, top, "", keep=skip)
    if checker.expanded:
        with open_dict(cfg):
            for key, value in checker.expanded.items():
                OmegaConf.update(cfg, key, value, merge=False)
    if checker.problems:
        raise UserError("\n".join(dict.fromkeys(checker.problems)))


class Target:
    """Annotation of a config node that names a `_target_` (checked against the target); `Target | None` for one
    that may be null, `dict[str, Target | None]` for a group of them (callbacks, loggers)."""


class Unresolvable:
    """Not checked: a value whose interpolation cannot be resolved yet (Hydra's runtime, before the run starts), or
    that is another key's value (checked as that key)."""


def resolved(cfg: DictConfig) -> Any:
    """The config as plain values, each interpolation resolved where it can be (the others: Unresolvable)."""

    def walk(node, key):
        if isinstance(node, DictConfig):
            return {k: walk_child(node, k) for k in node.keys()}
        if isinstance(node, ListConfig):
            return [walk_child(node, i) for i in range(len(node))]
        return node

    def walk_child(node, key):
        try:
            child = node._get_node(key)
            if child._is_missing():
                return MISSING
            if child._is_interpolation() and REFERENCE.fullmatch(str(child._value())):
                return Unresolvable()  # another key's value (`${trainer.max_epochs}`), checked there
            value = node[key]
        except Exception:  # noqa: BLE001 - an interpolation of Hydra's runtime, or a missing key it names
            return Unresolvable()
        return walk(value, key)

    return walk(cfg, "")


class Checker:
    def __init__(self, partial_paths: bool):
        self.problems: list[str] = []
        self.expanded: dict[str, str] = {}
        self.partial_paths = partial_paths  # check the paths of _partial_ targets too (they are read later)
        self.in_partial = False

    def fail(self, key: str, value: Any, wanted: str) -> None:
        self.problems.append(f"{key}={show(value)}: takes {wanted}")

    def check(self, value: Any, hint: Any, key: str, keep: tuple[str, ...] = ()) -> None:
        if isinstance(value, Unresolvable) or hint is Any:
            return
        if value is MISSING:
            self.problems.append(f"{key} is missing (??? in the config): give it a value")
            return
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Annotated:
            self.check_annotated(value, args[0], args[1:], key)
        elif hint is Target:
            self.check_target(value, key)
        elif is_typed_dict(hint):
            self.check_typed_dict(value, hint, key, keep)
        elif origin in (typing.Union, types.UnionType):
            self.check_union(value, args, key)
        else:
            wanted = accepts(value, hint)
            if wanted is not None:
                self.fail(key, value, wanted)
            elif origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) and args:
                item = args[0]
                if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
                    if len(value) != len(args):
                        self.fail(key, value, f"a list of {len(args)} values")
                        return
                    for i, (element, element_hint) in enumerate(zip(value, args)):
                        self.check(element, element_hint, f"{key}[{i}]")
                    return
                for i, element in enumerate(value):
                    self.check(element, item, f"{key}[{i}]")
            elif origin in (dict, collections.abc.Mapping) and len(args) == 2:
                for name, element in value.items():
                    self.check(element, args[1], f"{key}.{name}")

    def check_annotated(self, value: Any, base: Any, constraints: tuple, key: str) -> None:
        settings = next((c for c in constraints if isinstance(c, _Settings)), None)
        if settings is not None:
            if value is not None and accepts(value, dict) is None:
                for name in set(settings.given) & set(value):
                    self.problems.append(f"{key}.{name} is not a setting of {key}: the model gives it")
                self.check_parameters(value, settings.target, key, partial=False, data_inputs=settings.given)
            elif value is not None:
                self.fail(key, value, "a block of settings")
            return
        before = len(self.problems)
        self.check(value, base, key)
        if len(self.problems) > before:  # say all it takes, not only the type
            if len(self.problems) == before + 1 and self.problems[-1].startswith(f"{key}="):
                self.problems[-1] = f"{key}={show(value)}: takes {describe(Annotated[(base, *constraints)])}"
            return
        for constraint in constraints:
            if not hasattr(constraint, "problem"):
                continue
            if isinstance(constraint, PathTo):
                if self.in_partial and not self.partial_paths:
                    continue
                value = self.expand(value, key)
            problem = constraint.problem(value)
            if problem is not None:  # all the type takes; a path, what is wrong with it
                self.fail(
                    key, value, problem if isinstance(constraint, PathTo) else describe(Annotated[(base, *constraints)])
                )
                return

    def expand(self, value: str, key: str) -> str:
        if value.startswith("~"):
            self.expanded[key] = value = os.path.expanduser(value)
        return value

    def check_union(self, value: Any, members: tuple, key: str) -> None:
        if value is None and type(None) in members:
            return
        candidates = [m for m in members if m is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own problem says most
            before = len(self.problems)
            self.check(value, candidates[0], key)
            if len(self.problems) > before and self.problems[-1].startswith(f"{key}="):
                self.problems[-1] += " (or null)"
            return
        for member in candidates:
            trial = Checker(self.partial_paths)
            trial.in_partial = self.in_partial
            trial.check(value, member, key)
            if not trial.problems:
                self.expanded |= trial.expanded
                return
        self.fail(key, value, describe_union(members))

    def check_typed_dict(self, value: Any, hint: type, key: str, keep: tuple[str, ...]) -> None:
        if not isinstance(value, dict):
            self.fail(key, value, "a block of settings")
            return
        hints = typing.get_type_hints(hint, include_extras=True)
        optional = {name for name, h in hints.items() if typing.get_origin(h) is typing.NotRequired}
        prefix = f"{key}." if key else ""
        for name, element in value.items():
            if name in keep:
                continue
            if name not in hints:
                self.unknown(f"{prefix}{name}", name, hints, f"a setting of {key or 'the run'}")
                continue
            element_hint = hints[name]
            self.check(element, typing.get_args(element_hint)[0] if name in optional else element_hint, prefix + name)
        for name in sorted(set(hints) - optional - set(value)):
            self.problems.append(f"{prefix}{name} is missing: give it a value")

    def unknown(self, key: str, name: str, known, what: str) -> None:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?)" if close else ""
        self.problems.append(f"{key} is not {what}{hint}")

    def check_target(self, value: Any, key: str) -> None:
        if value is None:
            self.fail(key, value, "a block of settings with a _target_")
            return
        if not isinstance(value, dict) or "_target_" not in value:
            self.fail(key, value, "a block of settings with a _target_")
            return
        from hydra.utils import get_object

        try:
            target = get_object(value["_target_"])
        except Exception as error:  # noqa: BLE001 - any import failure of the named target
            self.problems.append(f"{key}._target_={value['_target_']}: cannot be imported ({error})")
            return
        partial = bool(value.get("_partial_", False))
        data_inputs = getattr(target, "data_inputs", ()) if inspect.isclass(target) else ()
        outer, self.in_partial = self.in_partial, self.in_partial or partial
        try:
            self.check_parameters(value, target, key, partial, data_inputs)
        finally:
            self.in_partial = outer

    def check_parameters(self, value: dict, target: Any, key: str, partial: bool, data_inputs) -> None:
        parameters, hints, open_ended = signature_of(target)
        name = qualified_name(target)
        for setting, element in value.items():
            if setting in HYDRA_KEYS:
                continue
            full = f"{key}.{setting}"
            if setting not in parameters:
                if not open_ended:
                    self.unknown(full, setting, parameters, f"a setting of {name}")
                continue
            if isinstance(element, dict) and "_target_" in element:
                self.check_target(element, full)
                continue
            hint = TARGET_OVERRIDES.get((name, setting), hints.get(setting, Any))
            if setting == "lr" and is_optimizer(target):  # torch takes 0, inf and a tensor
                hint = PositiveFloat
            self.check(element, hint, full)
        if not partial and is_ours(target):  # a third-party target's bases are not ours to check
            for parameter in parameters.values():
                if (
                    parameter.default is parameter.empty
                    and parameter.name not in value
                    and parameter.name not in data_inputs
                ):
                    self.problems.append(f"{key}.{parameter.name} is missing: {name} needs it")


# Settings whose third-party annotation says less than what a run needs (e.g. Lightning takes 0 or a negative
# interval and fails later).
WholeOrNull = Annotated[int, Range(min=1)] | None
TARGET_OVERRIDES: dict[tuple[str, str], Any] = {
    ("lightning.pytorch.trainer.trainer.Trainer", "max_epochs"): Annotated[int, Range(min=-1)] | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "min_epochs"): Annotated[int, Range(min=0)] | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "max_steps"): Annotated[int, Range(min=-1)],
    ("lightning.pytorch.trainer.trainer.Trainer", "num_nodes"): PositiveInt,
    ("lightning.pytorch.trainer.trainer.Trainer", "accumulate_grad_batches"): PositiveInt,
    ("lightning.pytorch.trainer.trainer.Trainer", "check_val_every_n_epoch"): WholeOrNull,
    ("lightning.pytorch.trainer.trainer.Trainer", "log_every_n_steps"): WholeOrNull,
    ("lightning.pytorch.trainer.trainer.Trainer", "num_sanity_val_steps"): Annotated[int, Range(min=-1)] | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "gradient_clip_val"): NonNegativeFloat | None,
    # a fraction of the training epoch (float) or a number of batches (int), > 0 either way
    ("lightning.pytorch.trainer.trainer.Trainer", "val_check_interval"): Annotated[float, Range(above=0)] | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "limit_train_batches"): NonNegativeFloat | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "limit_val_batches"): NonNegativeFloat | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "limit_test_batches"): NonNegativeFloat | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "limit_predict_batches"): NonNegativeFloat | None,
    ("lightning.pytorch.trainer.trainer.Trainer", "overfit_batches"): NonNegativeFloat,
    # auto: the machine decides (framework/hardware.py) before the Trainer is built
    ("lightning.pytorch.trainer.trainer.Trainer", "accelerator"): Literal["auto", "cpu", "gpu", "cuda", "mps"],
    ("lightning.pytorch.trainer.trainer.Trainer", "precision"): Literal[
        "auto", "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", 64
    ],
}


def signature_of(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The parameters of a class's __init__ (through **kwargs to its bases') or a function, their annotations, and
    whether it takes any keyword (a **kwargs that leads nowhere further)."""
    functions = [target]
    if inspect.isclass(target):
        functions = [vars(klass)["__init__"] for klass in target.__mro__ if "__init__" in vars(klass)]
        functions = [f for f in functions if f is not object.__init__]
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    open_ended = False
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return parameters, hints, True
        try:
            hints = typing.get_type_hints(function, include_extras=True) | hints
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: its values go unchecked
            pass
        passes_on = False
        for parameter in list(signature.parameters.values())[1 if inspect.isclass(target) else 0 :]:
            if parameter.kind is parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is not parameter.VAR_POSITIONAL:
                parameters.setdefault(parameter.name, parameter)
        if not passes_on:
            break
        open_ended = function is functions[-1]  # **kwargs with no base left to take them
    return parameters, hints, open_ended


def is_ours(target: Any) -> bool:
    """Whether `target` is this repository's code (not an installed package's)."""
    try:
        path = pathlib.Path(inspect.getfile(target)).resolve()
    except TypeError:  # a builtin
        return False
    return path.is_relative_to(ROOT) and "site-packages" not in path.parts  # (a virtualenv inside the repository)


def qualified_name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def is_optimizer(target: Any) -> bool:
    import torch

    return inspect.isclass(target) and issubclass(target, torch.optim.Optimizer)


def is_typed_dict(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__annotations__")


def accepts(value: Any, hint: Any) -> str | None:
    """None if `value` is of the plain type `hint` (a bool is no number, an int is a float, a list a tuple, pathlib.Path
    text); else what `hint` takes, in words."""
    origin = typing.get_origin(hint) or hint
    if origin is Literal:
        return None if any(value == c and type(value) is type(c) for c in typing.get_args(hint)) else describe(hint)
    if hint is type(None):
        return None if value is None else "null"
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if origin is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    if origin in (str, pathlib.Path, os.PathLike):
        return None if isinstance(value, str) else "text"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return None if isinstance(value, list) else describe(hint)
    if origin in (dict, collections.abc.Mapping):
        return None if isinstance(value, dict) else "a block of settings"
    if inspect.isclass(origin) and origin.__module__ != "builtins":  # an object: only a node with a _target_ makes one
        return None if isinstance(value, dict) and "_target_" in value else describe(hint)
    return None  # nothing checkable (callables, typing constructs)


def describe(hint: Any) -> str:
    """What `hint` takes, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        words = [describe(args[0])]
        words += [c.describe() for c in args[1:] if hasattr(c, "describe") and not isinstance(c, Range)]
        ranges = [c.describe() for c in args[1:] if isinstance(c, Range)]
        return " ".join([*words[:1], *ranges]) + "".join(f", {w}" for w in words[1:])
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(show(c) for c in args))
    if origin in (typing.Union, types.UnionType):
        return describe_union(args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if args and typing.get_origin(args[0]) is Literal:
            return "a list drawn from " + ", ".join(dict.fromkeys(show(c) for c in typing.get_args(args[0])))
        return f"a list of {describe(args[0])} values" if args and args[0] is not Any else "a list"
    plain = {bool: "true or false", int: "a whole number", float: "a number", str: "text", dict: "a block of settings"}
    if hint in plain:
        return plain[hint]
    if hint is Target:
        return "a block of settings with a _target_"
    if is_typed_dict(hint):
        return "a block of settings"
    if inspect.isclass(hint):
        return f"a {hint.__name__} (a block with a _target_)"
    return str(hint)


def describe_union(members: tuple) -> str:
    return " or ".join(describe(member) for member in members)


def show(value: Any) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)
