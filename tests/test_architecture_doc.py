"""docs/ARCHITECTURE.md names every module of the code folders, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
FOLDERS = ("kernels", "server", "clients", "scripts", "benchmarks")


def documented() -> set[str]:
    """Paths in the first column of the doc's module tables."""
    rows = re.findall(r"^\| `([^`]+\.py)` \|", DOC.read_text(encoding="utf-8"), flags=re.M)
    return set(rows)


def existing() -> set[str]:
    out = set()
    for folder in FOLDERS:
        for p in (ROOT / folder).rglob("*.py"):
            if p.name != "__init__.py" and ".venv" not in p.parts:
                out.add(p.relative_to(ROOT).as_posix())
    return out


def test_every_module_is_documented() -> None:
    missing = sorted(existing() - documented())
    assert not missing, f"modules missing from docs/ARCHITECTURE.md: {missing}"


def test_no_documented_module_is_missing() -> None:
    gone = sorted(documented() - existing())
    assert not gone, f"docs/ARCHITECTURE.md names modules that do not exist: {gone}"
