"""The monitor's decoder of launcher messages (sandbox/launcher.py): anything else is a
ValueError, which marks the launcher broken, never another exception."""

import select
import socket
import subprocess

import pytest

from splitvmm.sandbox.launcher import LaunchedProcess, Launcher, _decode_reply
from splitvmm.sandbox.launcher_start import LauncherError, send


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


def test_a_request_cut_off_by_a_send_timeout_ends_requests_for_good(monkeypatch) -> None:
    """A launcher that stops reading mid-request (stopped, or hung) times the send out after
    part of the request went: its next bytes would be read as that request's rest. So no
    request is sent after it; each says why. What the launcher still says is read: the end
    of a device it started is still reported and reaped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sleeper = subprocess.Popen(["sleep", "30"])  # a pid to hold a pidfd on (the "launcher")
    try:
        launcher = Launcher(ours, sleeper.pid)
        ours.settimeout(0.2)  # SEND_TIMEOUT_S, shortened
        send(theirs, {"op": "ready"})
        launcher._await(lambda: launcher._ready or None, 5)
        spec_bytes = b"x" * (4 << 20)  # more chunks than the socket's buffer holds unread
        with pytest.raises(LauncherError, match="takes no request"):
            launcher._request({"op": "spawn"}, spec_bytes, [])
        while select.select([theirs], [], [], 0)[0]:  # what came: a header, then chunks
            theirs.recv(1 << 20)
        with pytest.raises(LauncherError, match="takes no request"):
            launcher.rest()
        assert not select.select([theirs], [], [], 0.1)[0]  # nothing more was sent
        device = subprocess.Popen(["true"])
        device.wait()
        launcher._running.add(device.pid)  # as a "spawned" reply would
        send(theirs, {"op": "exited", "pid": device.pid, "status": 0, "lingering": False})
        assert launcher.wait_exit(device.pid, 5) == (0, False)
    finally:
        sleeper.kill()
        sleeper.wait()
        ours.close()
        theirs.close()
