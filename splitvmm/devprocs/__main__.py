"""`python -m splitvmm.devprocs SPEC_JSON`: one device process, spawned by the monitor."""

import sys

from splitvmm.devprocs import serial  # noqa: F401  (registers the model)
from splitvmm.devprocs.runtime import run
from splitvmm.devprocs.spec import DeviceSpec

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m splitvmm.devprocs SPEC_JSON (spawned by the monitor)")
    run(DeviceSpec.from_json(sys.argv[1]))
