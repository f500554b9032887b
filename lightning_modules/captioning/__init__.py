"""Image captioners: `from lightning_modules.captioning import Captioner` (the Python API, inference.py), or any class
of the package by its name (`BLIPCaptioner`, `CNNRNNCaptioner`, ...): found in the module that defines it and imported
on first use, so that importing one captioner (or nets.py) does not import the others (transformers).
"""

import re
from importlib import import_module
from pathlib import Path

__all__ = ["Captioner"]


def __getattr__(name: str):
    definition = re.compile(rf"^class {re.escape(name)}\b", re.MULTILINE)
    for source in sorted(Path(__file__).parent.glob("*.py")):
        if definition.search(source.read_text(encoding="utf-8")):
            return getattr(import_module(f"{__name__}.{source.stem}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
