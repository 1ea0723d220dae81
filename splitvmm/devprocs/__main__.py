"""`python -m splitvmm.devprocs < SPEC_JSON`: one device process, spawned by the monitor."""

import os
import sys

from splitvmm.devprocs.runtime import run
from splitvmm.protocol.spec import MAX_SPEC, DeviceSpec


def read_spec() -> DeviceSpec:
    """The spec from stdin; then stdin becomes /dev/null: the device holds no pipe it does
    not need (sandbox/spawn.py start_device says what fds 0-2 are)."""
    data = sys.stdin.buffer.read(MAX_SPEC + 1)
    if len(data) > MAX_SPEC:
        sys.exit(f"splitvmm: device: the spec is over {MAX_SPEC} bytes")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return DeviceSpec.from_json(data.decode())


if __name__ == "__main__":
    if len(sys.argv) != 1 or sys.stdin.isatty():
        sys.exit("usage: python -m splitvmm.devprocs < SPEC_JSON (spawned by the monitor)")
    run(read_spec())
