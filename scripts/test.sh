#!/usr/bin/env bash
# Install mcserve with its test dependencies into ./.venv (CPU torch) and run the test suite.
# This is the README's test command; CI (.ci/run) runs exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
python -m pytest -q "$@"
