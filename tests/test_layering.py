"""Imports go down the layers of docs/ARCHITECTURE.md, never up or sideways; checked over the source
tree (every import statement, also those inside functions), without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder (relative to the repo) -> mcserve modules it must never import (prefix match)
FORBIDDEN = {
    "kernels": ("mcserve.server", "mcserve.clients"),
    "server/text": ("mcserve.server.engine", "mcserve.server.api", "mcserve.server.model", "mcserve.server.metrics",
                    "mcserve.server.cli", "mcserve.server.settings", "mcserve.clients"),
    "server/model": ("mcserve.server.engine", "mcserve.server.api", "mcserve.server.metrics", "mcserve.server.cli",
                     "mcserve.server.settings", "mcserve.clients"),
    "server/engine": ("mcserve.server.api", "mcserve.server.cli", "mcserve.server.settings", "mcserve.clients"),
    "server/metrics.py": ("mcserve.server.api", "mcserve.server.cli", "mcserve.clients"),
    "server/api": ("mcserve.server.cli", "mcserve.clients"),
    "clients": ("mcserve.server", "mcserve.kernels"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _files(where: str) -> list[Path]:
    p = ROOT / where
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_import_goes_up_a_layer(where: str) -> None:
    files = _files(where)
    assert files, f"{where} has no Python files: update FORBIDDEN"
    bad = []
    for f in files:
        for line, mod in imported_modules(f):
            if any(mod == p or mod.startswith(p + ".") for p in FORBIDDEN[where]):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "imports against the layering of docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from mcserve.server.api.app import build_app\n")
    assert (2, "mcserve.server.api.app") in imported_modules(f)
