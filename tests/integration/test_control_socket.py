"""The control socket of a running VM: idle or silent clients delay no one, and the raw
protocol refuses what the CLI would never send (a relative snapshot path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.monitor.control import ControlError, request
from tests.integration.rawclient import connect, unanswered
from tests.integration.vmproc import VmProcess, boot_guest

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def vm(guests, tmp_path_factory) -> Iterator[VmProcess]:
    vm = boot_guest(tmp_path_factory.mktemp("vm"), guests["counter"], "period=1000000")
    vm.wait_for(r"^count=\d+$")
    yield vm
    vm.proc.terminate()
    vm.finish()


def control_socket(vm: VmProcess) -> Path:
    return vm.tmp_path / "run" / "splitvmm" / "test" / "control.sock"


def test_control_socket_silent_client_does_not_delay_ctl_status(vm):
    with connect(control_socket(vm), b'{"op": "stat') as silent:
        status = vm.ctl("status", "--json")
        assert (status.returncode, unanswered(silent)) == (0, True), status.stderr
    assert json.loads(status.stdout)["state"] == "running"


def test_control_socket_twelve_idle_connections_leave_ctl_working(vm):
    idle = [connect(control_socket(vm)) for _ in range(12)]
    status = vm.ctl("status", "--json")
    still_open = [unanswered(s) for s in idle]
    for s in idle:
        s.close()
    assert (status.returncode, still_open) == (0, [True] * 12), status.stderr


def test_control_socket_relative_snapshot_path_is_refused(vm):
    with pytest.raises(ControlError, match="snapshot target snaps/one is not an absolute path"):
        request(control_socket(vm), "snapshot", {"path": "snaps/one"})
    status = vm.ctl("status", "--json")
    assert json.loads(status.stdout)["state"] == "running"  # refused before the pause
