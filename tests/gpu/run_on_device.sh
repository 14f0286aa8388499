#!/usr/bin/env bash
# Run on the lent GPU machine from the repo root (carry .whl): installs the carried wheels, maps the
# repo's folders to the mcserve package without pip, and runs the given command.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/mcpkg/mcserve
for d in server kernels clients; do ln -sfn "$PWD/$d" "/tmp/mcpkg/mcserve/$d"; done
export PYTHONPATH=/tmp/mcpkg:/tmp/site:$PWD
exec "$@"
