"""The monitor's decoder of launcher messages (sandbox/launcher.py): anything else is a
ValueError, which marks the launcher broken, never another exception."""

import socket
import subprocess

import pytest

from splitvmm.sandbox.launcher import LaunchedProcess, Launcher, _decode_reply
from splitvmm.sandbox.launcher_start import send


@pytest.mark.parametrize(
    "data",
    [b'{"op": []}', b'{"op": {}}', b'{"op": 1}', b"{}", b"[]"],
    ids=["list-op", "object-op", "int-op", "no-op", "not-an-object"],
)
def test_decode_reply_op_not_a_known_name_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="unknown message"):
        _decode_reply(data, [])


@pytest.mark.parametrize("lingering", [True, False])
def test_launched_process_says_whether_an_orphan_still_ran_at_its_end(lingering: bool) -> None:
    """The launcher's "exited" report carries `lingering`; the process it names says it once
    reaped (DeviceProcess.lingered), which decides whether a disk device may be restarted."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sleeper = subprocess.Popen(["sleep", "30"])  # a pid to hold a pidfd on (the "launcher")
    try:
        launcher = Launcher(ours, sleeper.pid)
        warden = subprocess.Popen(["true"])
        warden.wait()
        launcher._running.add(warden.pid)  # as a "spawned" reply would
        process = LaunchedProcess(launcher, warden.pid, -1)
        msg = {"op": "exited", "pid": warden.pid, "status": 0, "lingering": lingering}
        send(theirs, msg)

        assert (process._reap(), process.lingered()) == (0, lingering)
    finally:
        sleeper.kill()
        sleeper.wait()
        ours.close()
        theirs.close()


def test_decode_reply_exited_without_lingering_is_malformed() -> None:
    with pytest.raises(ValueError, match="malformed exited"):
        _decode_reply(b'{"op": "exited", "pid": 1, "status": 0}', [])
