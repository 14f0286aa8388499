"""pyproject.toml's package list names every package of the code folders, so that a wheel (the Docker
image installs one) holds all of them; an editable install would not notice a missing one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "mcserve.server", "kernels": "mcserve.kernels", "clients": "mcserve.clients"}


def listed() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^\[tool\.setuptools\]\s*\npackages = \[(.*?)\]", text, flags=re.S | re.M)
    assert block is not None, "pyproject.toml has no [tool.setuptools] packages list"
    return set(re.findall(r'"([^"]+)"', block.group(1)))


def existing() -> set[str]:
    out = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            out.add(".".join((name, *rel)))
    return out


def test_every_package_is_in_pyproject() -> None:
    assert existing() - listed() == set(), "packages missing from pyproject.toml's [tool.setuptools] packages"
    assert listed() - existing() == set(), "pyproject.toml lists packages that do not exist"
