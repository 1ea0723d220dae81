"""start_device (sandbox/spawn.py) refuses what a device could not read, before it spawns."""

import subprocess

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.protocol.spec import DEVICE_COMMAND, MAX_SPEC, DeviceSpec
from splitvmm.sandbox.spawn import start_device


def test_start_device_state_over_spec_cap_raises_device_failure_naming_device():
    state: dict[str, object] = {"model": "serial", "version": 2, "fields": {"rx": "A" * MAX_SPEC}}
    spec = DeviceSpec("serial0", "serial", "ipc:///nowhere/serial0.sock", state=state)
    with pytest.raises(DeviceFailure, match=f"device serial0: .* over the {MAX_SPEC} a device"):
        start_device(("/nonexistent/never-run",), spec)


# A device started by hand (`python -m splitvmm.devprocs`, as tests and `policy audit` do;
# the launcher checks what it forks) with a spec it cannot use: one line, not a traceback.
@pytest.mark.parametrize(
    "stdin",
    [
        b"garbage\n",
        b'{"name":"x","model":"ser',
        b"[1]\n",
        b'{"name":"x","model":"serial"}\n',
        b'{"name":"x","model":"nosuch","channel":"ipc:///nowhere/x.sock"}\n',
        b'{"name":"x","model":"serial","channel":"ipc:///nowhere/x.sock","fds":"out"}\n',
        b'{"name":"x","model":"serial","channel":"ipc:///nowhere/x.sock","seccomp":"enforce"}\n',
    ],
    ids=[
        "not-json",
        "truncated",
        "not-an-object",
        "no-channel",
        "unknown-model",
        "fds-not-object",
        "unknown-seccomp-mode",
    ],
)
def test_device_spec_on_stdin_that_is_no_spec_is_refused_in_one_line(stdin: bytes) -> None:
    done = subprocess.run(list(DEVICE_COMMAND), input=stdin, capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert err.startswith("splitvmm: device: bad spec on stdin: ") and err.count("\n") == 1, err
