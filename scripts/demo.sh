#!/usr/bin/env bash
# Boots the demo VM: a small test guest greets you through the 8250 serial device,
# which runs in its own process, then resets the VM (exit status 0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python tests/guests/build.py >/dev/null
exec .venv/bin/splitvmm up examples/hello.toml
