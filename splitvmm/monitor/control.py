"""The control socket: `splitvmm ctl` talks to a running monitor here.

A UNIX stream socket (mode 0600) in the VM's runtime directory. Each request
is one JSON object on one line (`{"op": "pause"}`), each reply one JSON object
on one line (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`), and then
the monitor closes the connection.

Clients are served side by side, so a silent or slow one delays nobody: one
selector loop reads every request and writes every reply without blocking; each
connection has one deadline (REQUEST_TIMEOUT_S) to send its whole line, and as
long again to take its whole reply (one larger than the socket's send buffer, a
status of many devices, leaves in parts as the client reads it); at most
MAX_CLIENTS are open at once, and one more is refused with a JSON error rather
than left to hang. Read-only operations (`status`, `devices`) are answered by
the loop at once, even while a snapshot runs: they read a few fields and change
nothing. Every other operation runs on a worker thread, one at a time, so pause,
snapshot and resume never interleave; one that arrives while another runs is
refused as busy, not queued behind it; its reply is handed back to the loop,
which sends it as it sends any other.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from splitvmm.errors import SplitvmmError, shown
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol import schema
from splitvmm.record import Struct, field

log = logging.getLogger("splitvmm.control")

MAX_REQUEST = 64 * 1024
# Open connections at once: each costs an fd and up to MAX_REQUEST of buffer, so a local
# process opening connections by the thousand cannot exhaust the monitor's fds or memory.
MAX_CLIENTS = 32
# A client has this long to send its whole request line (one deadline, not one per recv: a
# client dribbling a byte at a time gets no more than a silent one), and as long again to
# take its whole reply (a client that does not read holds a reply's memory no longer).
REQUEST_TIMEOUT_S = 5.0
# accept() that fails for want of an fd or of memory (EMFILE, ENFILE, ENOBUFS): the loop
# stops accepting for this long, then tries again; the connection waits in the backlog. It
# ended the control thread, and ctl with it, for the VM's life.
ACCEPT_BACKOFF_S = 0.1
# status and devices, which the monitor answers from its loop (counters: a round trip to each
# device, each within its own timeout): a client waits this long for them. Any other request
# is waited for without a limit: a suspend of a large VM to slow storage takes what it takes,
# and a monitor that dies closes the socket (ctl's --timeout is a script's own limit).
READ_ONLY_TIMEOUT_S = 30
CONNECT_WAIT_S = 2.0  # a client waits this long for room in a busy monitor's listen backlog
CONNECT_RETRY_S = 0.01
PEERCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid (SO_PEERCRED)
MAX_REPLY = 1 << 20  # a status of every device fits many times over; more is not our monitor
SOCKET_NAME = "control.sock"

Handler = Callable[[dict[str, object]], dict[str, object]]


class ControlError(SplitvmmError):
    """A control request that cannot be done; its text is the reply's error."""


class ControlBusy(ControlError):
    """A request refused for now, that may be done later (the reply says "retry": true):
    the monitor is busy with another operation, or serves all the connections it takes."""


class _Client(Struct):
    conn: socket.socket
    deadline: float  # time.monotonic() by which its whole request must have come
    buf: bytearray = field(default_factory=bytearray)


class _Reply(Struct):
    conn: socket.socket
    deadline: float  # time.monotonic() by which the client must have taken all of it
    rest: memoryview  # what the socket has not taken yet


class ControlServer(threading.Thread):
    def __init__(
        self,
        rundir: Path,
        handlers: dict[str, Handler],
        read_only: Collection[str] = (),
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        """read_only: the operations that change nothing and may run beside any other."""
        super().__init__(name="control", daemon=True)
        self.path = rundir / SOCKET_NAME
        self.handlers = handlers
        self.read_only = frozenset(read_only)
        self.request_timeout_s = request_timeout_s
        self.max_clients = max_clients
        # Connections the loop reads a request from or writes a reply to (the cap counts both:
        # a reply waiting for its client holds memory as a request does).
        self._clients: dict[socket.socket, _Client | _Reply] = {}
        # Replies of the operations the worker has finished, for the loop to send (under
        # _busy_lock; the wake fd says one is there).
        self._done: list[tuple[socket.socket, dict[str, object]]] = []
        self._accept_again: float | None = None  # accepting paused until then (EMFILE)
        self._worker: threading.Thread | None = None  # the operation in progress, if any
        self._worker_op = ""  # the operation in progress ("": none), under _busy_lock
        self._busy_lock = threading.Lock()
        self._wake = EventFd()
        self._closing = False
        old_umask = os.umask(0o177)  # the socket is created 0600: only our user may steer the VM
        sock = None
        try:
            sock = self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(self.path))
        except OSError as e:  # a runtime dir with no room (ENOSPC, EDQUOT): `up` says so
            if sock is not None:  # (none made: no fd left, EMFILE)
                sock.close()
            self._wake.close()
            raise SplitvmmError(
                f"cannot make the control socket {self.path}: {e.strerror or e}"
            ) from None
        finally:
            os.umask(old_umask)
        self.sock.listen(max_clients)
        self.sock.setblocking(False)

    # -- the selector loop ---------------------------------------------------------------
    def run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake.fd, selectors.EVENT_READ)
            while not self._closing:
                self._serve(sel)
            if self._accept_again is None:
                sel.unregister(self.sock)
            for client in [c for c in self._clients.values() if isinstance(c, _Client)]:
                self._drop(sel, client)
            if self._worker is not None:
                self._worker.join()  # a snapshot in progress finishes before the machine goes
            self._send_done(sel)
            while self._clients:  # replies given (a suspend's) still leave, each by its deadline
                self._serve(sel)

    def _serve(self, sel: selectors.BaseSelector) -> None:
        for key, _ in sel.select(self._next_timeout()):
            if key.fileobj is self.sock and not self._closing:
                self._accept(sel)
            elif key.fileobj is self._wake.fd:
                self._wake.drain()
                self._send_done(sel)
            elif isinstance(key.data, _Client):
                self._read(sel, key.data)
            elif isinstance(key.data, _Reply):
                self._write(sel, key.data)
        self._expire(sel)
        if self._accept_again is not None and time.monotonic() >= self._accept_again:
            self._accept_again = None
            if not self._closing:
                sel.register(self.sock, selectors.EVENT_READ)

    def _next_timeout(self) -> float | None:
        deadlines = [c.deadline for c in self._clients.values()]
        if self._accept_again is not None:
            deadlines.append(self._accept_again)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # the client gave up between poll and accept
        except OSError as e:  # no fd or no memory for it: the listening socket stays readable
            log.warning("control socket: cannot accept a connection: %s; trying again in "
                        "%g s", e.strerror or e, ACCEPT_BACKOFF_S)  # fmt: skip
            sel.unregister(self.sock)
            self._accept_again = time.monotonic() + ACCEPT_BACKOFF_S
            return
        conn.setblocking(False)
        if len(self._clients) >= self.max_clients:
            error = f"the monitor already serves {self.max_clients} control connections; try again"
            self._reply(sel, conn, {"ok": False, "error": error, "retry": True})
            return
        client = _Client(conn, time.monotonic() + self.request_timeout_s)
        self._clients[conn] = client
        sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, sel: selectors.BaseSelector, client: _Client) -> None:
        try:
            chunk = client.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError as e:
            log.info("control client went away: %s", e)
            chunk = b""
        if not chunk:
            if not client.buf:
                self._drop(sel, client)
                return
            chunk = b"\n"  # a request the client ended by shutting its side: its line ends
        client.buf += chunk
        line, newline, _ = client.buf.partition(b"\n")
        if newline or len(client.buf) > MAX_REQUEST:
            self._forget(sel, client)
            self._handle(sel, client.conn, bytes(line))

    def _reply(
        self, sel: selectors.BaseSelector, conn: socket.socket, reply: dict[str, object]
    ) -> None:
        """Send one reply line, then close; what the socket does not take at once is sent
        from the loop as the client reads it, until the client's deadline."""
        data = memoryview(json.dumps(reply).encode() + b"\n")
        pending = _Reply(conn, time.monotonic() + self.request_timeout_s, data)
        self._clients[conn] = pending
        sel.register(conn, selectors.EVENT_WRITE, pending)
        self._write(sel, pending)

    def _write(self, sel: selectors.BaseSelector, pending: _Reply) -> None:
        try:
            pending.rest = pending.rest[pending.conn.send(pending.rest) :]
        except BlockingIOError:
            return
        except OSError as e:
            log.info("control client went away: %s", e)
            pending.rest = pending.rest[:0]
        if not pending.rest:
            self._drop(sel, pending)

    def _send_done(self, sel: selectors.BaseSelector) -> None:
        """Send the replies of the operations the worker has finished."""
        with self._busy_lock:
            done, self._done = self._done, []
        for conn, reply in done:
            self._reply(sel, conn, reply)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            if isinstance(client, _Reply):
                log.info("control client did not take its reply in time; dropped it")
                self._drop(sel, client)
            else:
                self._forget(sel, client)
                error = f"no complete request line within {self.request_timeout_s:g} s"
                self._reply(sel, client.conn, {"ok": False, "error": error})

    def _forget(self, sel: selectors.BaseSelector, client: _Client | _Reply) -> None:
        sel.unregister(client.conn)
        del self._clients[client.conn]

    def _drop(self, sel: selectors.BaseSelector, client: _Client | _Reply) -> None:
        self._forget(sel, client)
        client.conn.close()

    # -- requests ------------------------------------------------------------------------
    def _handle(self, sel: selectors.BaseSelector, conn: socket.socket, line: bytes) -> None:
        """Answer a read-only request now, start any other on the worker, or refuse it."""
        parsed = self._parse(line)
        if isinstance(parsed, str):
            self._reply(sel, conn, {"ok": False, "error": parsed})
            return
        op, request = parsed
        if op in self.read_only:
            self._reply(sel, conn, self._call(op, request))
            return
        with self._busy_lock:
            busy = self._worker_op
            if not busy:
                self._worker_op = op
        if busy:
            error = f"the monitor is busy with {busy}; try again when it is done"
            self._reply(sel, conn, {"ok": False, "error": error, "retry": True})
            return
        self._worker = threading.Thread(
            target=self._work, args=(conn, op, request), name=f"control-{op}", daemon=True
        )
        self._worker.start()

    def _work(self, conn: socket.socket, op: str, request: dict[str, object]) -> None:
        """Run one operation; it is done (not busy) before its reply leaves, so a client
        that sends its next request on the reply finds the monitor free. The loop sends the
        reply: this thread never waits on a client."""
        reply = self._call(op, request)
        with self._busy_lock:
            self._worker_op = ""
            self._done.append((conn, reply))
        self._wake.trigger()

    def _parse(self, line: bytes) -> tuple[str, dict[str, object]] | str:
        """(op, request), or the error to answer."""
        if len(line) > MAX_REQUEST:
            return f"request longer than {MAX_REQUEST} bytes"
        # schema's reader, as for any untrusted JSON: json.loads alone took a request nested
        # just short of the recursion limit, which a handler quoting a value (repr) went past
        try:
            request = schema.loads(line, what="request", error=ControlError)
        except ControlError:
            return "request is not JSON"
        if not isinstance(request, dict):
            return "request is not a JSON object"
        op = request.get("op")
        if not isinstance(op, str) or op not in self.handlers:
            return f"unknown operation {shown(op)}"
        return op, request

    def _call(self, op: str, request: dict[str, object]) -> dict[str, object]:
        try:
            return {"ok": True, **self.handlers[op](request)}
        except ControlBusy as e:  # a handler's "not now": the client may try again
            return {"ok": False, "error": str(e), "retry": True}
        except SplitvmmError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a monitor bug or an odd request: answer, and keep serving
            log.exception("control request %r failed", op)
            return {"ok": False, "error": f"{op} failed: {e!r}"}

    def close(self) -> None:
        self._closing = True
        self._wake.trigger()
        if self.is_alive():
            self.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self._wake.close()


def request(
    path: Path,
    op: str,
    args: dict[str, object] | None = None,
    timeout_s: float | None = None,
    monitor_uid: int | None = None,
) -> dict[str, object]:
    """Client side: one request, one reply, within `timeout_s` in all (None: until the reply
    comes or the monitor closes the connection). Raises ControlError with the monitor's
    words, or one sentence saying why there was no usable reply. `monitor_uid`: the user
    the VM's monitor runs as, where it is not ours (_check_server)."""
    line = json.dumps({"op": op, **(args or {})}).encode() + b"\n"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with _connected(path, os.geteuid() if monitor_uid is None else monitor_uid) as s:
            buf = _exchange(s, line, path, deadline)
    except FileNotFoundError:
        raise ControlError(f"no VM is listening at {path}") from None
    except ConnectionRefusedError:
        if not _is_socket(path):  # a file or FIFO refuses a connect too
            raise ControlError(f"{path} is not a socket") from None
        raise ControlError(f"the VM at {path} is not running (stale socket)") from None
    except TimeoutError:
        raise ControlError(f"the VM at {path} did not answer within {timeout_s:g} s") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the VM at {path}: {e.strerror or e}") from None
    return _decode_reply(buf, path)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _connected(path: Path, monitor_uid: int) -> socket.socket:
    """A socket connected to `path`. A UNIX socket with a timeout set does not wait for room
    in a listener's backlog: connect() fails with EAGAIN at once when the monitor has as
    many connections not yet accepted as it listens for. That is a busy monitor
    (ControlBusy, ctl's exit 75), tried again for CONNECT_WAIT_S first, not a failed one."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONNECT_WAIT_S)
        try:
            s.connect(str(path))
            _check_server(s, path, monitor_uid)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() >= deadline:
                raise ControlBusy(
                    f"the VM at {path} has its connection backlog full; try again"
                ) from None
            time.sleep(CONNECT_RETRY_S)
        except BaseException:
            s.close()
            raise


def _check_server(s: socket.socket, path: Path, monitor_uid: int) -> None:
    """Refuse a socket served by another user than `monitor_uid`, before any request (a
    snapshot's signing key among them) goes to it. Our monitor runs as we do, and its
    socket is 0600: a socket served by anyone else is theirs, whatever path led to it (a
    directory another user could swap between ctl's checks and its connect, or a --socket
    given), unless we said whose VM it is (root steering a service account's VM)."""
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    _pid, uid, _gid = PEERCRED.unpack(creds)
    if uid != monitor_uid:
        whose = "this user" if monitor_uid == os.geteuid() else "--monitor-uid"
        raise ControlError(
            f"the socket {path} is served by uid {uid}, not by {whose} (uid {monitor_uid}): "
            "no request is sent to it"
        )


def _exchange(s: socket.socket, line: bytes, path: Path, deadline: float | None) -> bytes:
    """Send the request, read the reply line, by `deadline` if any (one for the whole reply:
    a peer that sends a byte at a time gets no longer than a silent one; TimeoutError). A
    monitor that refuses us (too many clients) may close before reading the request: its
    reply is still there to read."""
    try:
        s.settimeout(_left(deadline))
        s.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass
    buf = b""
    while not buf.endswith(b"\n"):
        s.settimeout(_left(deadline))
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ControlError(f"the VM at {path} closed the connection without a reply")
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise ControlError(f"the VM at {path} sent a reply longer than {MAX_REPLY} bytes")
    return buf


def _left(deadline: float | None) -> float | None:
    """The socket timeout that ends at `deadline` (None: no timeout); TimeoutError once it
    has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _decode_reply(buf: bytes, path: Path) -> dict[str, object]:
    try:  # strict: no NaN or Infinity, which json.loads takes and `ctl --json` would print
        reply = schema.loads(buf, what="reply", error=ControlError)
    except ControlError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"the VM at {path} replied with something that is not a JSON object")
    if reply.get("ok") is not True:
        refused = ControlBusy if reply.get("retry") is True else ControlError
        raise refused(str(reply.get("error", "unknown error"))[:1000])
    return reply
