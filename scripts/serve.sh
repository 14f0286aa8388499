#!/usr/bin/env bash
# Install mcserve into ./.venv and serve the default model (or MODEL_DIR given as first argument).
# On a CUDA machine, install the matching CUDA build of torch first; CPU torch 2.13.0 is used here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
exec mcserve serve "$@"
