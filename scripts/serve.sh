#!/usr/bin/env bash
# Install mcserve into ./.venv (first run, or after pyproject.toml changed) and serve the default model
# (or MODEL_DIR given as first argument; any `mcserve serve` flags follow).
# On a CUDA machine, install the matching CUDA build of torch into .venv first; CPU torch 2.13.0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# What is installed is stamped with pyproject.toml's hash: a later start skips pip entirely.
stamp=.venv/.mcserve-serve-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
    python -m pip install -q -e '.[clients]'
    echo "$want" > "$stamp"
fi
exec mcserve serve "$@"
