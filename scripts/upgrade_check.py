"""The packages whose versions differ between constraints.txt and a `pip freeze` on stdin (make upgrade-check).

.venv-upgrade/bin/python -m pip freeze --exclude-editable | python scripts/upgrade_check.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def pins(lines) -> dict[str, str]:
    """name -> version of the `name==version` lines; names normalised as pip compares them."""
    found = {}
    for line in lines:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def main() -> None:
    pinned = pins(Path(__file__).resolve().parent.parent.joinpath("constraints.txt").read_text().splitlines())
    newest = pins(sys.stdin)
    changed = {
        name: (pinned.get(name, "-"), newest.get(name, "-"))
        for name in sorted(pinned.keys() | newest.keys())
        if pinned.get(name) != newest.get(name)
    }
    print(f"{len(changed)} packages differ from constraints.txt (pinned -> newest allowed; - = absent):")
    for name, (old, new) in changed.items():
        print(f"  {name:32} {old:>16} -> {new}")


if __name__ == "__main__":
    main()
