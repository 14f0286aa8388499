"""scripts/serve.sh installs only when needed: on the first run and after pyproject.toml changed (a
stamp of its hash in .venv), never on a plain restart; and it installs the clients extra."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _fake_checkout(tmp: Path) -> Path:
    """A copy of serve.sh and pyproject.toml with a .venv whose python and mcserve only log their calls."""
    (tmp / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "serve.sh", tmp / "scripts" / "serve.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    for name in ("python", "mcserve"):
        tool = bin_dir / name
        tool.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{tmp}/calls.log"\n')
        tool.chmod(0o755)
    return tmp


def _run(checkout: Path) -> list[str]:
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(["bash", "scripts/serve.sh", "--port", "9"], cwd=checkout, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines()


def test_serve_sh_installs_once_then_only_after_pyproject_changes(tmp_path: Path) -> None:
    checkout = _fake_checkout(tmp_path)
    first = _run(checkout)
    assert "python -m pip install -q -e .[clients]" in first and first[-1] == "mcserve serve --port 9"
    assert _run(checkout) == ["mcserve serve --port 9"]  # a restart: no pip at all
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert any("pip install" in c for c in _run(checkout))
    assert _run(checkout) == ["mcserve serve --port 9"]
