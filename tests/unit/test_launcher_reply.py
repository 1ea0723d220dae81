"""The monitor's decoder of launcher messages (sandbox/launcher.py): anything else is a
ValueError, which marks the launcher broken, never another exception."""

import contextlib
import json
import os
import select
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.sandbox.launcher import LaunchedProcess, Launcher, _decode_reply
from splitvmm.sandbox.launcher_start import LauncherError, send
from splitvmm.sandbox.spawn import readable


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


@pytest.mark.parametrize(
    "data",
    [
        (b'{"op": "spawned", "id": 1, "pid": 5}', 1),
        (b'{"op": "refused", "id": 1, "message": "no", "pid": 5}', 0),
        (b'{"op": "spawned", "id": 1, "pid": "5"}', 2),
        (b'{"op": "spawned", "id": 1, "pid": true}', 2),
    ],
    ids=["one-fd-for-two", "extra-key", "pid-not-int", "pid-a-bool"],
)
def test_decode_reply_not_of_its_ops_shape_raises_value_error(data: tuple[bytes, int]) -> None:
    """Each op with exactly its keys, each of its type (a bool is no int), and its fds."""
    message, nfds = data
    with pytest.raises(ValueError, match="malformed spawned|malformed refused|is not int"):
        _decode_reply(message, list(range(100, 100 + nfds)))


@pytest.fixture
def fake() -> Iterator[tuple[Launcher, socket.socket]]:
    """A handle on a "launcher" whose messages the test sends itself, on `theirs`: the
    handle, and theirs."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sleeper = subprocess.Popen(["sleep", "30"])  # a pid to hold a pidfd on (the "launcher")
    try:
        launcher = Launcher(ours, sleeper.pid)
        send(theirs, {"op": "ready"})
        launcher._await(lambda: launcher._ready or None, 5)
        yield launcher, theirs
    finally:
        sleeper.kill()
        sleeper.wait()
        ours.close()
        theirs.close()


def ended_child() -> int:
    """The pid of a child of ours that has ended, and been reaped (a device's, as the
    launcher reports)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_an_exit_report_of_a_pid_not_ours_breaks_the_handle(fake) -> None:
    launcher, theirs = fake
    ours = ended_child()
    launcher._running.add(ours)  # as a "spawned" reply would
    send(theirs, {"op": "exited", "pid": ours + 1, "status": 0, "lingering": False})
    send(theirs, {"op": "exited", "pid": ours, "status": 0, "lingering": False})

    with pytest.raises(LauncherError, match=f"the end of pid {ours + 1}, not ours"):
        launcher.wait_exit(ours, 5)


def test_a_reply_naming_another_request_is_not_taken_for_this_ones(fake) -> None:
    launcher, theirs = fake
    send(theirs, {"op": "refused", "id": 99, "message": "an answer to nothing"})
    send(theirs, {"op": "rested", "id": 1})

    launcher.rest()  # its own reply taken, the other dropped


def test_a_reply_that_came_while_no_request_waited_is_not_taken_for_the_next_ones(fake) -> None:
    """A second reply to a request answered already (its id the last one sent) comes while
    only exit reports are awaited: the next request must wait for its own."""
    launcher, theirs = fake
    send(theirs, {"op": "rested", "id": 1})
    launcher.rest()
    device = ended_child()
    launcher._running.add(device)  # as a "spawned" reply would
    send(theirs, {"op": "refused", "id": 1, "message": "a late second answer"})
    send(theirs, {"op": "exited", "pid": device, "status": 0, "lingering": False})
    launcher.wait_exit(device, 5)
    send(theirs, {"op": "rested", "id": 2})

    launcher.rest()


def test_a_spawned_reply_for_no_request_breaks_the_handle(fake) -> None:
    """A device started for nobody: no slot holds it, so the handle is not to be trusted."""
    launcher, theirs = fake
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        send(theirs, {"op": "spawned", "id": 99, "pid": 4321}, [r, w])
        send(theirs, {"op": "rested", "id": 1})
        with pytest.raises(LauncherError, match="started pid 4321 for nobody"):
            launcher.rest()
    finally:
        os.close(r)
        os.close(w)


def test_a_reply_to_a_request_given_up_lets_the_devices_end_be_reported(fake) -> None:
    """abandon() gives a spawn up; the launcher's late "spawned" names a device the handle
    did not take, whose end it then reports (at close): that pid is the launcher's, not a
    stranger's, and the other devices' reports still come."""
    launcher, theirs = fake
    outcome: list[BaseException] = []

    def spawn() -> None:
        try:
            launcher._request({"op": "spawn"}, b"{}", [])
        except LauncherError as e:
            outcome.append(e)

    thread = threading.Thread(target=spawn)
    thread.start()
    assert readable(theirs.fileno(), 5)  # the request went
    launcher.abandon("the VM is stopping")
    thread.join(5)
    other = ended_child()
    launcher._running.add(other)  # as a "spawned" reply would
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        send(theirs, {"op": "spawned", "id": 1, "pid": 4321}, [r, w])
    finally:
        os.close(r)
        os.close(w)
    send(theirs, {"op": "exited", "pid": 4321, "status": -9, "lingering": False})
    send(theirs, {"op": "exited", "pid": other, "status": 0, "lingering": False})

    assert [str(e) for e in outcome] == ["the VM is stopping"]
    assert launcher.wait_exit(other, 5) == (0, False)


@pytest.mark.parametrize("how", ["abandoned", "broken"])
def test_a_handle_abandoned_or_broken_sends_no_request(fake, how: str) -> None:
    launcher, theirs = fake
    if how == "abandoned":
        launcher.abandon("the VM is stopping")
    else:
        send(theirs, b"[]")  # a protocol error, filed while an exit report is awaited
        with pytest.raises(LauncherError, match="broke its protocol"):
            launcher.wait_exit(4321, 5)

    with pytest.raises(LauncherError, match="the VM is stopping|broke its protocol"):
        launcher.rest()
    assert not select.select([theirs], [], [], 0)[0]


def test_a_launcher_silent_past_a_wait_is_broken_for_good(fake) -> None:
    """A reply that came after its wait ended would answer the next request."""
    launcher, theirs = fake
    with pytest.raises(LauncherError, match="did not answer within 0.1 s"):
        launcher.wait_exit(4321, 0.1)
    send(theirs, {"op": "rested", "id": 1})

    with pytest.raises(LauncherError, match="did not answer within 0.1 s"):
        launcher.rest()


def _drain(sock: socket.socket) -> list[dict[str, object]]:
    """The request headers the launcher's end received (chunks of spec bytes skipped)."""
    headers = []
    while select.select([sock], [], [], 0)[0]:
        data = sock.recv(1 << 20)
        if data.startswith(b"{") and b'"op"' in data[:40]:
            headers.append(json.loads(data))
    return headers


@contextlib.contextmanager
def _ahead_launcher() -> Iterator[tuple[Launcher, socket.socket, int]]:
    """A handle on a stand-in launcher (its end of the socket, as the second item), ready,
    and a running process to stand in for the device a spawn gets (its pid)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sleeper = subprocess.Popen(["sleep", "30"])  # a pid to hold a pidfd on (the "launcher")
    device = subprocess.Popen(["sleep", "30"])
    try:
        launcher = Launcher(ours, sleeper.pid)
        send(theirs, {"op": "ready"})
        yield launcher, theirs, device.pid
    finally:
        for p in (sleeper, device):
            p.kill()
            p.wait()
        ours.close()
        theirs.close()


def _reply_spawned(theirs: socket.socket, request: int, pid: int) -> int:
    """Answer `request` with a device: its pidfd and, standing in for its channel's listening
    socket, a pipe's read end; the write end, to tell that fd by."""
    listener_r, listener_w = os.pipe()
    pidfd = os.pidfd_open(pid)
    send(theirs, {"op": "spawned", "id": request, "pid": pid}, [pidfd, listener_r])
    for fd in (pidfd, listener_r):
        os.close(fd)  # the launcher's copies
    return listener_w


def _check_taken(taken: tuple[LaunchedProcess, int], pid: int, listener_w: int) -> None:
    """The device of a spawned reply, with the very listening fd the reply carried."""
    process, listener = taken
    try:
        assert process.pid == pid
        os.write(listener_w, b"!")
        assert os.read(listener, 1) == b"!"
    finally:
        os.close(listener)
        os.close(listener_w)
        process.close()


def test_spawns_sent_ahead_are_each_taken_by_their_id_whatever_the_order() -> None:
    """A restore asks for its devices that read no guest RAM, loads RAM, then takes the
    replies (monitor/machine.py): each request's reply goes to its own take, a refusal
    included, whichever is taken first; an exit report meanwhile is filed as ever."""
    with _ahead_launcher() as (launcher, theirs, device):
        first = launcher.send_spawn(DeviceSpec("serial0", "serial", "ipc:///x/serial0.sock"))
        second = launcher.send_spawn(DeviceSpec("rtc", "rtc", "ipc:///x/rtc.sock"))
        assert [h["id"] for h in _drain(theirs)] == [first, second]
        listener_w = _reply_spawned(theirs, first, device)
        send(theirs, {"op": "refused", "id": second, "message": "device rtc: no room"})

        with pytest.raises(DeviceFailure, match="device rtc: no room"):
            launcher.take_spawn(second)
        _check_taken(launcher.take_spawn(first), device, listener_w)


def test_a_spawn_sent_ahead_and_given_up_at_a_stop_is_taken_only_by_the_teardown() -> None:
    """A stop abandons the launcher's requests: the build's take of a spawn sent ahead fails
    at once, but its reply, when it comes, is kept for the teardown's take (given_up), whose
    slot ends the device before its listening socket closes: closed first, a device on its
    way up said "the monitor closed the channel" after a stop during a restore's RAM load."""
    with _ahead_launcher() as (launcher, theirs, device):
        request = launcher.send_spawn(DeviceSpec("serial0", "serial", "ipc:///x/serial0.sock"))
        launcher.send_spawn(DeviceSpec("rtc", "rtc", "ipc:///x/rtc.sock"))  # the latest one
        launcher.abandon("the VM is stopping")
        with pytest.raises(LauncherError, match="the VM is stopping"):
            launcher.take_spawn(request)
        listener_w = _reply_spawned(theirs, request, device)

        taken = launcher.take_spawn(request, given_up=True, timeout_s=5)

        assert device in launcher._running
        assert launcher._answers == {} and not launcher._broken
        _check_taken(taken, device, listener_w)  # the fd still open
