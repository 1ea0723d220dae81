"""The control socket of a running VM: idle or silent clients delay no one, the raw
protocol refuses what the CLI would never send (a relative snapshot path), and a snapshot the
monitor could not write is refused before the VM stops for it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.monitor.control import ControlError, request
from tests.integration.rawclient import connect, reply_of, unanswered
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


def test_control_socket_snapshot_into_a_directory_the_monitor_cannot_write_is_refused(vm):
    """Mode 0555: no write even for a root monitor (it drops CAP_DAC_OVERRIDE). Said before
    the pause, naming the target, not the writer's temporary name once the VM had stopped."""
    locked = vm.tmp_path / "locked"
    locked.mkdir(mode=0o555)
    r = vm.ctl("snapshot", str(locked / "one"))
    status = vm.ctl("status", "--json")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (
        f"Error: snapshot target {locked / 'one'}: cannot write in {locked}: Permission denied"
    )
    assert os.listdir(locked) == []
    assert json.loads(status.stdout)["state"] == "running"


def test_control_socket_request_nested_near_the_parser_limit_gets_a_plain_error(vm):
    """json.loads takes a request nested almost as deep as the recursion limit (Python's
    default, 1000), counted on the control loop's stack; inject-fault quoting the kind in its
    error (repr, on the worker's stack under the schema's frames) went past the limit at some
    of those depths: a traceback in the monitor's log and "inject-fault failed:
    RecursionError(...)" as the reply. Which depths break depends on both stacks: all near
    the limit are tried."""
    lines = [
        b'{"op": "inject-fault", "name": "serial0", "kind": %s}\n' % (b"[" * n + b"]" * n)
        for n in range(900, 1000)
    ]
    errors = {str(reply_of(connect(control_socket(vm), line))["error"]) for line in lines}
    assert [e for e in errors if "failed:" in e] == []
