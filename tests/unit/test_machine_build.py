"""Machine.build's checks that come before anything is started (monitor/machine.py)."""

from __future__ import annotations

import pytest

from splitvmm.config import parse_config
from splitvmm.errors import SplitvmmError
from splitvmm.monitor.control import SOCKET_NAME
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.rundir import MAX_SOCKET_PATH


class UnusedLauncher:
    def configure(self, rundir: object) -> None:
        raise AssertionError("the launcher was asked for the VM")

    def close(self) -> None:
        pass


def test_build_control_socket_path_too_long_fails_before_the_launcher_is_used(tmp_path):
    """The path used to be found too long by ControlServer's bind(), a traceback after every
    device had started; now `up` prints one line, as for a device's channel."""
    cfg = parse_config({"vm": {"name": "vm1"}, "boot": {"kernel": "bzImage"}}, tmp_path, False)
    # ROOT/vm1/control.sock one byte longer than sun_path takes
    root = tmp_path / (
        "r" * (MAX_SOCKET_PATH + 1 - len(f"{tmp_path}/") - len(f"/vm1/{SOCKET_NAME}"))
    )
    machine = Machine(cfg, runtime_root=root, launcher=UnusedLauncher())  # type: ignore[arg-type]
    try:
        with pytest.raises(SplitvmmError, match="control socket .* is longer than a UNIX socket"):
            machine.build()
    finally:
        machine.close()
    assert list(root.iterdir()) == []  # the runtime dir is gone
