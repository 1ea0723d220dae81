"""The control socket: `splitvmm ctl` talks to a running monitor here.

A UNIX stream socket (mode 0600) in the VM's runtime directory. Each request
is one JSON object on one line (`{"op": "pause"}`), each reply one JSON object
on one line (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`). Requests
are served one at a time: pause, snapshot and resume never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from splitvmm.errors import SplitvmmError
from splitvmm.native.eventfd import EventFd

log = logging.getLogger("splitvmm.control")

MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT_S = 600  # a multi-GiB snapshot takes seconds; a monitor that hangs gets reported
SOCKET_NAME = "control.sock"

Handler = Callable[[dict[str, object]], dict[str, object]]


class ControlError(SplitvmmError):
    """A control request that cannot be done; its text is the reply's error."""


class ControlServer(threading.Thread):
    def __init__(self, rundir: Path, handlers: dict[str, Handler]) -> None:
        super().__init__(name="control", daemon=True)
        self.path = rundir / SOCKET_NAME
        self.handlers = handlers
        self._wake = EventFd()
        self._closing = False
        old_umask = os.umask(0o177)  # the socket is created 0600: only our user may steer the VM
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self.sock.listen(8)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake.fd, selectors.EVENT_READ)
        while not self._closing:
            for key, _ in sel.select():
                if key.fileobj is self.sock and not self._closing:
                    conn, _ = self.sock.accept()
                    with conn:
                        self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            reply = self._dispatch(buf.split(b"\n", 1)[0])
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as e:
            log.info("control client went away: %s", e)

    def _dispatch(self, line: bytes) -> dict[str, object]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return {"ok": False, "error": "request is not JSON"}
        op = request.get("op") if isinstance(request, dict) else None
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown operation {op!r}"}
        try:
            return {"ok": True, **handler(request)}
        except SplitvmmError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a monitor bug or an odd request: answer, and keep serving
            log.exception("control request %r failed", op)
            return {"ok": False, "error": f"{op} failed: {e!r}"}

    def close(self) -> None:
        self._closing = True
        self._wake.trigger()
        if self.is_alive():
            self.join()  # a snapshot in progress finishes before the machine is torn down
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self._wake.close()


def request(path: Path, op: str, args: dict[str, object] | None = None) -> dict[str, object]:
    """Client side: one request, one reply. Raises ControlError with the monitor's words."""
    args = args or {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CLIENT_TIMEOUT_S)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no VM is listening at {path}") from None
        except ConnectionRefusedError:
            raise ControlError(f"the VM at {path} is not running (stale socket)") from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the VM at {path} did not answer within {CLIENT_TIMEOUT_S} s"
                ) from None
            if not chunk:
                raise ControlError(f"the VM at {path} closed the connection without a reply")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply
