"""The tests' layout: a test file imports what it shares from tests/helpers/, never from another test file or from
tests/conftest.py (which holds only fixtures and hooks; pytest hands fixtures to the tests that name them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, at any depth of the file: `import a.b` and `from a.b import c` give a.b, and
    `from a import b` gives a.b too when a is the tests package (b may be a module); relative imports are resolved."""
    package = ["tests", *path.parent.relative_to(TESTS).parts] if path.is_relative_to(TESTS) else ["tests"]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            if module in ("tests", "tests.helpers"):
                found += [f"{module}.{alias.name}" for alias in node.names]
            else:
                found.append(module)
    return found


def forbidden(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[1].startswith("test_") or parts[1] == "conftest")


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_a_test_file_imports_no_other_test_file_nor_conftest(path):
    assert [m for m in imported_modules(path) if forbidden(m)] == []


def test_helpers_import_no_test_file_nor_conftest():
    for path in sorted((TESTS / "helpers").glob("*.py")):
        assert [m for m in imported_modules(path) if forbidden(m)] == [], path.name


def test_the_check_sees_the_imports_it_forbids(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import tests.test_blip\nfrom tests.conftest import ROOT\nfrom tests import test_fsdp\n"
        "def f():\n    from tests.test_dreambooth import tiny_args\n"
        "from tests.helpers.config import ROOT\nimport torch\n"
    )
    found = [m for m in imported_modules(sample) if forbidden(m)]
    assert found == ["tests.test_blip", "tests.conftest", "tests.test_fsdp", "tests.test_dreambooth"]
