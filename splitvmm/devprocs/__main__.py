"""`python -m splitvmm.devprocs SPEC_JSON`: one device process, spawned by the monitor."""

import sys

from splitvmm.devprocs import serial  # noqa: F401  (registers the model)
from splitvmm.devprocs.runtime import run
from splitvmm.devprocs.spec import DeviceSpec

MAX_SPEC = 2 << 20  # options plus at most 1 MiB of saved state

if __name__ == "__main__":
    if len(sys.argv) != 1 or sys.stdin.isatty():
        sys.exit("usage: python -m splitvmm.devprocs < SPEC_JSON (spawned by the monitor)")
    run(DeviceSpec.from_json(sys.stdin.buffer.read(MAX_SPEC).decode()))
