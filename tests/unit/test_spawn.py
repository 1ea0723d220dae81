"""start_device (sandbox/spawn.py) refuses what a device could not read, before it spawns."""

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.protocol.spec import MAX_SPEC, DeviceSpec
from splitvmm.sandbox.spawn import start_device


def test_start_device_state_over_spec_cap_raises_device_failure_naming_device():
    state: dict[str, object] = {"model": "serial", "version": 2, "fields": {"rx": "A" * MAX_SPEC}}
    spec = DeviceSpec("serial0", "serial", "ipc:///nowhere/serial0.sock", state=state)
    with pytest.raises(DeviceFailure, match=f"device serial0: .* over the {MAX_SPEC} a device"):
        start_device(("/nonexistent/never-run",), spec)
