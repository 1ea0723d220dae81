"""ControlServer with fake handlers: clients served side by side, one request deadline each,
a cap on connections, and operations that change the VM never interleaved.

No /dev/kvm needed; real UNIX sockets and threads.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.errors import SplitvmmError
from splitvmm.monitor import control
from splitvmm.monitor.control import ControlBusy, ControlError, ControlServer, request
from tests.integration.rawclient import connect, hung_up, reply_of, unanswered

READ_ONLY = ("status", "big")
# A reply far past a socket's send buffer (net.core.wmem_default, ~208 KiB), yet one a
# client takes (MAX_REPLY): a status of many devices with long failure texts.
BIG = "x" * (control.MAX_REPLY - 64)


class Operation:
    """A handler that blocks until the test lets it finish, and says when it has started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, req: dict[str, object]) -> dict[str, object]:
        self.started.set()
        self.release.wait(30)
        return {"done": True}


@pytest.fixture
def snapshot_op() -> Iterator[Operation]:
    op = Operation()
    yield op
    op.release.set()


def serve(tmp_path: Path, snapshot_op: Operation, **kwargs: object) -> ControlServer:
    handlers = {
        "status": lambda req: {"state": "running"},
        "pause": lambda req: {"state": "paused"},
        "snapshot": snapshot_op,
        "big": lambda req: {"blob": BIG},
        "big_work": lambda req: {"blob": BIG},  # the same, answered from the worker
    }
    server = ControlServer(tmp_path, handlers, read_only=READ_ONLY, **kwargs)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def server(tmp_path, snapshot_op) -> Iterator[ControlServer]:
    s = serve(tmp_path, snapshot_op)
    yield s
    snapshot_op.release.set()
    s.close()


def test_control_silent_client_does_not_delay_status(server):
    silent = connect(server.path, b'{"op": ')  # half a request, then nothing
    with silent:
        reply = request(server.path, "status")
        assert (reply["state"], unanswered(silent)) == ("running", True)


def test_control_many_idle_connections_leave_requests_served(server):
    idle = [connect(server.path) for _ in range(12)]
    reply = request(server.path, "pause")
    still_open = [unanswered(s) for s in idle]
    for s in idle:
        s.close()
    assert (reply["state"], still_open) == ("paused", [True] * 12)


def test_control_connection_past_cap_is_refused_with_json_error(tmp_path, snapshot_op):
    server = serve(tmp_path, snapshot_op, max_clients=4)
    idle = [connect(server.path) for _ in range(4)]
    try:
        with pytest.raises(ControlError, match="already serves 4 control connections"):
            request(server.path, "status")
    finally:
        for s in idle:
            s.close()
        server.close()


def test_control_request_not_sent_within_deadline_gets_error_and_close(tmp_path, snapshot_op):
    server = serve(tmp_path, snapshot_op, request_timeout_s=0.2)
    try:
        reply = reply_of(connect(server.path, b'{"op": "sta'))
    finally:
        server.close()
    assert reply == {"ok": False, "error": "no complete request line within 0.2 s"}


def test_control_operation_during_snapshot_is_busy_and_status_answers(server, snapshot_op):
    snap = connect(server.path, b'{"op": "snapshot"}\n')
    assert snapshot_op.started.wait(30)
    with pytest.raises(ControlBusy, match="the monitor is busy with snapshot"):
        request(server.path, "pause")
    status = request(server.path, "status")
    snapshot_op.release.set()
    assert (status["state"], reply_of(snap)) == ("running", {"ok": True, "done": True})


def test_control_operation_after_snapshot_finishes_runs(server, snapshot_op):
    snapshot_op.release.set()
    first = request(server.path, "snapshot")
    assert (first["done"], request(server.path, "pause")["state"]) == (True, "paused")


@pytest.mark.parametrize(
    "line,error",
    [
        (b"not json\n", "request is not JSON"),
        (b'{"op": "reboot"}\n', "unknown operation 'reboot'"),
        (b"[1]\n", "request is not a JSON object"),
        (b'"status"\n', "request is not a JSON object"),
        (b'{"op": null}\n', "unknown operation None"),
        (  # clipped: the error is one short line, whatever the client sent
            b'{"op": "%s"}\n' % (b"x" * 60000),
            f"unknown operation '{'x' * 99}... (60002 characters)",
        ),
        (b"x" * (65 * 1024), "request longer than 65536 bytes"),
    ],
)
def test_control_bad_request_gets_one_sentence_error(server, line, error):
    assert reply_of(connect(server.path, line)) == {"ok": False, "error": error}


def test_control_close_with_idle_client_connected_returns(tmp_path, snapshot_op):
    server = serve(tmp_path, snapshot_op)
    idle = connect(server.path)
    request(server.path, "status")  # accepted after idle: the backlog is served in order
    server.close()
    with idle:
        assert (idle.recv(1), server.path.exists()) == (b"", False)


def test_control_request_ended_by_shutdown_without_newline_is_answered(server):
    """A client that shuts its side after its request (as `printf '{"op": "status"}' | nc -U
    -N` does) still gets its reply; nothing came back before."""
    with connect(server.path, b'{"op": "status"}') as client:
        client.shutdown(socket.SHUT_WR)
        assert reply_of(client) == {"ok": True, "state": "running"}


def test_control_handler_that_says_not_now_gets_a_retry_reply(tmp_path, snapshot_op):
    """A handler's ControlBusy (a snapshot waiting on a device's restart) is a "try again",
    as the server's own busy refusal is; it was answered as a plain error."""

    def restarting(req: dict[str, object]) -> dict[str, object]:
        raise ControlBusy("device rng0 is restarting")

    server = serve(tmp_path, snapshot_op)
    server.handlers["pause"] = restarting
    try:
        reply = reply_of(connect(server.path, b'{"op": "pause"}\n'))
    finally:
        server.close()
    assert reply == {"ok": False, "error": "device rng0 is restarting", "retry": True}


def test_control_request_to_a_full_listen_backlog_is_busy_not_failed(tmp_path, monkeypatch):
    """A UNIX connect with a timeout set fails with EAGAIN at once when the listener's
    backlog is full: ctl said "Resource temporarily unavailable" and exit 1 for a monitor
    that was only busy. It waits CONNECT_WAIT_S, then says busy (exit 75)."""
    from splitvmm.cli.ctl.common import _listening
    from splitvmm.monitor import control

    monkeypatch.setattr(control, "CONNECT_WAIT_S", 0.05)
    path = tmp_path / "busy.sock"
    waiting: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)  # never accepts
        try:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                waiting.append(s)
                s.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(ControlBusy, match="connection backlog full; try again"):
                request(path, "status")
            assert _listening(path)  # busy, not a stale socket
        finally:
            for s in waiting:
                s.close()


def test_control_server_whose_socket_cannot_be_made_says_so_in_one_line(tmp_path, monkeypatch):
    """No fd left for the socket (EMFILE): one line naming it, not an AttributeError over it."""

    def no_fd_left(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(control.socket, "socket", no_fd_left)

    with pytest.raises(SplitvmmError, match="cannot make the control socket .*Too many open"):
        ControlServer(tmp_path, {})


@pytest.mark.parametrize("op", ["big", "big_work"])
def test_control_reply_past_the_socket_buffer_arrives_whole(server, op):
    """A reply larger than the socket's send buffer was cut to what one send() took, and
    the client, which read it at once, said the VM closed the connection without a reply."""
    assert request(server.path, op)["blob"] == BIG


def test_control_client_that_does_not_read_its_reply_delays_nobody_then_is_dropped(
    tmp_path, snapshot_op
):
    """The rest of a big reply waits for a client that does not read it, while the monitor
    serves the others, until the client's deadline; then the connection is closed."""
    server = serve(tmp_path, snapshot_op, request_timeout_s=2.0)
    try:
        with connect(server.path, b'{"op": "big"}\n') as ignoring:
            reply = request(server.path, "big")
            assert (reply["blob"], hung_up(ignoring)) == (BIG, True)
    finally:
        server.close()


def test_control_reply_of_an_operation_ending_the_monitor_still_leaves(tmp_path, snapshot_op):
    """A suspend stops the machine, which closes the server while the operation runs: the
    loop sends the worker's reply, so it must still send it once the worker is done."""
    server = serve(tmp_path, snapshot_op)
    snap = connect(server.path, b'{"op": "snapshot"}\n')
    assert snapshot_op.started.wait(30)
    closer = threading.Thread(target=server.close)
    closer.start()
    snapshot_op.release.set()
    closer.join()
    assert reply_of(snap) == {"ok": True, "done": True}


class FailingAccept:
    """The control socket, whose first accept() fails as a process out of fds sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.failures = sock, 1

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def test_control_accept_out_of_fds_pauses_accepting_and_serves_the_client_after(
    tmp_path, snapshot_op, caplog
):
    """accept() failing with EMFILE ended the control thread: ctl went unanswered for the
    VM's life. The loop stops accepting for a moment; the connection waits in the backlog."""
    server = ControlServer(tmp_path, {"status": lambda req: {"state": "running"}}, ("status",))
    server.sock = FailingAccept(server.sock)  # type: ignore[assignment]
    server.start()
    try:
        reply = request(server.path, "status", timeout_s=30)
    finally:
        server.close()
    assert (reply, server.sock.failures) == ({"ok": True, "state": "running"}, 0)  # type: ignore[attr-defined]
    assert "cannot accept a connection: Too many open files" in caplog.text
