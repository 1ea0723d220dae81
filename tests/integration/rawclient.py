"""Raw control-socket clients for tests: connect, say some bytes, then look at what came back."""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path


def connect(path: Path, send: bytes = b"") -> socket.socket:
    """A connection that has sent `send` (maybe half a request, maybe nothing) and waits."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(send)
    s.setblocking(False)
    return s


def unanswered(s: socket.socket) -> bool:
    """True while the monitor has neither replied to nor closed this connection."""
    try:
        s.recv(1)
    except BlockingIOError:
        return True
    return False


def hung_up(s: socket.socket) -> bool:
    """Whether the monitor closes this connection within 30 s, read or not (POLLRDHUP: a
    UNIX peer's close shows while its data still waits to be read)."""
    poller = select.poll()
    poller.register(s, select.POLLRDHUP)
    return bool(poller.poll(30_000))


def reply_of(s: socket.socket) -> dict[str, object]:
    """The reply line the monitor sends on this connection (then closes it)."""
    s.settimeout(30)
    with s, s.makefile("rb") as f:
        return json.loads(f.readline())
