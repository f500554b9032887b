"""The house rules that keep the framework growable, checked on the tree:

- one home for every default: a class or function that a `_target_` in conf/ names has no default in its signature,
  except the few that checkpoints need (framework.config.SIGNATURE_DEFAULTS, each with its reason);
- models and data do not call each other: no module in lightning_modules/ imports from datamodules/ other than the
  batch types (datamodules/batches.py), no data module imports a LightningModule or reaches for the trainer's model;
  what they take from each other goes through the runner (framework/preparation.py).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import yaml
from hydra.utils import get_object

from framework.config import SIGNATURE_DEFAULTS
from framework.schema import is_ours

ROOT = Path(__file__).resolve().parents[1]


def project_targets() -> dict[str, list[str]]:
    """Every `_target_` in conf/ of this project's packages, with the config files that name it."""
    found: dict[str, list[str]] = {}

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and is_ours(get_object(target)):
                found.setdefault(target, []).append(where)
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()), str(path.relative_to(ROOT)))
    return found


def signature_defaults(target: str) -> dict[str, object]:
    """`module.Class.argument` -> default (the class that defines the argument), of the target's own signature and of
    its project base classes' that its **kwargs pass on to (a third-party base's defaults are its own business)."""
    owner = get_object(target)
    functions = [vars(c)["__init__"] for c in owner.__mro__ if "__init__" in vars(c)] if inspect.isclass(owner) else []
    found = {}
    for function in functions or [owner]:
        if not is_ours(function):
            break
        name = f"{function.__module__}.{function.__qualname__.removesuffix('.__init__')}"
        parameters = inspect.signature(function).parameters.values()
        found |= {f"{name}.{p.name}": p.default for p in parameters if p.default is not inspect.Parameter.empty}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return found


def test_targets_take_their_defaults_from_the_config_only():
    targets = project_targets()
    assert len(targets) > 20, sorted(targets)  # the walk finds the tree's targets
    found = {key: default for target in targets for key, default in signature_defaults(target).items()}
    print("\nsignature defaults of _target_ classes:", *(f"  {k} = {v!r}" for k, v in sorted(found.items())), sep="\n")
    outside = {key: default for key, default in found.items() if key not in SIGNATURE_DEFAULTS}
    assert not outside, f"defaults belong in conf/ (or, for checkpoints, in SIGNATURE_DEFAULTS): {outside}"


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each import statement of a Python file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_models_import_only_the_batch_types_of_the_data():
    wrong = [
        f"{path.relative_to(ROOT)}: {module} {names}"
        for path in sorted((ROOT / "lightning_modules").rglob("*.py"))
        for module, names in imports_of(path)
        if module.startswith("datamodules") and module != "datamodules.batches"
    ]
    assert not wrong, "lightning_modules/ takes only batch types from datamodules/:\n" + "\n".join(wrong)


def test_data_modules_do_not_reach_for_the_model():
    wrong = []
    for path in sorted((ROOT / "datamodules").rglob("*.py")):
        wrong += [f"{path.name}: imports {m}" for m, _ in imports_of(path) if m.startswith("lightning_modules")]
        text = path.read_text()
        wrong += [f"{path.name}: {s}" for s in (".lightning_module", "trainer.model") if s in text]
    assert not wrong, wrong
