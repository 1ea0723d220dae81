"""The monitor's end of a device's ZeroMQ channel: ZMTP 3.0 (RFC 23), spoken by the monitor
itself over the UNIX socket the device connects to. The device keeps its libzmq PAIR socket;
the wire is ZeroMQ's.

Why not libzmq here too:

- A compromised device writes any bytes it likes to its end, and a libzmq socket keeps
  every part of a multipart message until its last part comes. ZMQ_MAXMSGSIZE bounds a
  part and ZMQ_RCVHWM counts whole messages, so one message that never ends grew the
  monitor without limit (tests/unit/test_channel_multipart.py; no libzmq 4.3 option bounds
  it, and the draft sockets that refuse multipart are not built into pyzmq).
- libzmq's I/O thread stands between every socket and its user: a forwarded access woke
  it twice on the monitor's side (the request out, the reply in), on top of the device's
  own. Here the thread that forwards the access writes the request and reads the reply
  itself (bench/exit_rtt.py has the figures); and the monitor starts without importing
  pyzmq or starting that thread (bench/startup.py), and without its memory
  (bench/memory.py).

What this module takes from a device:

- the greeting with the NULL mechanism, then the device's READY command, which must name a
  PAIR socket (its libzmq sends both as soon as it sees ours);
- then frames, each a whole message: the MORE flag, a command, reserved flag bits and a
  frame over the channel's maximum are protocol errors, seen in the frame's header, before
  its body has come. What the monitor holds of a device is a whole frame not yet taken, one
  unfinished frame and one read's chunk at most; the rest waits in the kernel's socket
  buffer, and a device that fills it waits in its send.

Towards the device it writes ZMTP frames; a multipart message (posted frames, as one
wake-up: monitor/channel.py post_many) carries MORE on all its parts but the last.

ZmtpReader is the parser alone (no I/O: the unit tests and the fuzzer feed it bytes);
ZmtpLink is the socket with the one peer it serves.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from splitvmm.errors import ProtocolError

# Our greeting (RFC 23): signature, version 3.0, the NULL mechanism, as-server 0, filler.
# A 3.1 peer (libzmq 4.3) speaks 3.0 to a 3.0 peer: no PING commands, which would need a
# heartbeat option on the device's socket anyway.
SIGNATURE_END = 9  # byte 0 is 0xFF, bytes 1-8 padding (libzmq puts a length there), byte 9 0x7F
GREETING_SIZE = 64
_MECHANISM = slice(12, 32)
NULL_MECHANISM = b"NULL".ljust(20, b"\0")
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + NULL_MECHANISM + b"\0" + bytes(31)
SOCKET_TYPE = b"PAIR"


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


_READY_BODY = b"\x05READY" + _property(b"Socket-Type", SOCKET_TYPE)
HANDSHAKE = GREETING + b"\x04" + bytes([len(_READY_BODY)]) + _READY_BODY  # what we send first

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
MAX_READY = 1024  # the device's READY command: a socket type and, at most, a routing id
CHUNK = 64 * 1024  # bytes one read takes at most
PUMP_CHUNKS = 4  # reads one frame_ready() makes at most: a whole 64 KiB frame and its header


def encode(frames: Sequence[bytes]) -> bytes:
    """`frames` as one ZMTP message: MORE on every part but the last."""
    if len(frames) == 1 and len(frames[0]) < 256:  # a request: the path a vCPU waits on
        return bytes((0, len(frames[0]))) + frames[0]
    out = bytearray()
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = MORE if i < last else 0
        if len(frame) < 256:
            out += bytes((more, len(frame)))
        else:
            out += struct.pack(">BQ", more | LONG, len(frame))
        out += frame
    return bytes(out)


class ZmtpReader:
    """The device's bytes in, its frames out, each checked on its header (the module
    docstring). ProtocolError says what was wrong; after one, nothing more is read."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # where the unparsed bytes start in _buf
        self.ready = False  # the greeting and the READY command are in

    def feed(self, chunk: bytes) -> None:
        """Bytes as they came. The caller feeds more only once next() has returned None (the
        channel does), so what is held is one frame's header and body and one chunk."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk

    def next(self) -> bytes | None:
        """The next whole frame, or None until more bytes come."""
        if not self.ready and not self._handshake():
            return None
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < 2:
            return None
        flags = buf[pos]
        if flags & MORE:
            raise ProtocolError("sent a multipart message (the channel takes one frame each)")
        if flags & ~LONG:
            what = "a command" if flags & COMMAND else f"frame flags {flags:#04x}"
            raise ProtocolError(f"sent {what} after its handshake")
        if flags & LONG:
            if have < 9:
                return None
            (size,) = struct.unpack_from(">Q", buf, pos + 1)
            start = pos + 9
        else:
            size, start = buf[pos + 1], pos + 2
        if size > self.max_frame:
            raise ProtocolError(f"sent a frame of {size} bytes, over the {self.max_frame} allowed")
        end = start + size
        if end > len(buf):
            return None
        self._pos = end
        return bytes(buf[start:end])

    def _handshake(self) -> bool:
        """The device's greeting and READY command, checked: True once both are in."""
        buf = self._buf
        if len(buf) < GREETING_SIZE:
            # A stream that is not ZMTP is refused on its first byte, not after 64.
            if buf and buf[0] != 0xFF:
                raise ProtocolError("sent bytes that are not a ZMTP greeting")
            return False
        if buf[0] != 0xFF or buf[SIGNATURE_END] != 0x7F:
            raise ProtocolError("sent bytes that are not a ZMTP greeting")
        if buf[10] != 3:
            raise ProtocolError(f"speaks ZMTP {buf[10]}.{buf[11]}, not 3")
        if buf[_MECHANISM] != NULL_MECHANISM:
            raise ProtocolError("asked for a ZMTP security mechanism other than NULL")
        flags = buf[GREETING_SIZE] if len(buf) > GREETING_SIZE else None
        if flags is None:
            return False
        if flags not in (COMMAND, COMMAND | LONG):
            raise ProtocolError("sent no READY command after its greeting")
        head = 9 if flags & LONG else 2
        if len(buf) < GREETING_SIZE + head:
            return False
        if flags & LONG:
            (size,) = struct.unpack_from(">Q", buf, GREETING_SIZE + 1)
        else:
            size = buf[GREETING_SIZE + 1]
        if size > MAX_READY:
            raise ProtocolError(f"sent a READY command of {size} bytes")
        start = GREETING_SIZE + head
        if len(buf) < start + size:
            return False
        _check_ready(bytes(buf[start : start + size]))
        self._pos, self.ready = start + size, True
        return True


def _check_ready(body: bytes) -> None:
    """READY with its properties (RFC 23: name-size, name, value-size, value), of which
    Socket-Type must be PAIR, as our end is to its libzmq."""
    if not body.startswith(b"\x05READY"):
        raise ProtocolError("sent a command other than READY after its greeting")
    pos, props = 6, {}
    while pos < len(body):
        n = body[pos]
        name = body[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if len(name) != n or pos + 4 > len(body):
            raise ProtocolError("sent a READY command with a truncated property")
        (size,) = struct.unpack_from(">I", body, pos)
        value = body[pos + 4 : pos + 4 + size]
        pos += 4 + size
        if len(value) != size:
            raise ProtocolError("sent a READY command with a truncated property")
        props[name.lower()] = value
    kind = props.get(b"socket-type")
    if kind != SOCKET_TYPE:  # its words in our log: a few bytes of them
        raise ProtocolError(
            f"is not a ZeroMQ PAIR socket ({kind if kind is None else kind[:16]!r})"
        )


class ZmtpLink:
    """The monitor's end of one device's channel: the listening UNIX socket made before the
    device started, then the one connection accepted on it (the listener is closed then: a
    second connection is refused; only the device and the monitor can reach its path). The
    connection's end is final: the device's socket never reconnects (devprocs/runtime.py).

    Non-blocking throughout: nothing here waits. `fd` is what to poll (for reading: the
    listener until the device has connected; for writing: the connection, while a message
    is still going out). Only read(2), write(2) and accept4(2): a vCPU thread's seccomp
    filter allows the first two (policies/<arch>/vcpu.policy), and accepts happen before
    READY, on the thread that starts the device."""

    def __init__(self, listener: int, max_frame: int) -> None:
        """`listener`: a listening UNIX stream socket; ours (closed by close())."""
        self.reader = ZmtpReader(max_frame)
        try:
            self._listener: socket.socket | None = socket.socket(fileno=listener)
        except BaseException:
            os.close(listener)
            raise
        self._conn: socket.socket | None = None
        self.fd = listener
        self.closed = False  # the device's connection ended (or we ended it)
        # Nothing more to read: its end read, or its socket closed by us. A write that finds
        # its end (EPIPE) closes the link, but what it sent before is still read.
        self._eof = False
        self._frame: bytes | None = None  # a whole frame read, not yet taken
        self._out: bytes | memoryview = b""  # what the kernel has not taken yet of a message
        try:
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise

    def take(self) -> bytes:
        """The frame frame_ready() said waits."""
        frame, self._frame = self._frame, None
        assert frame is not None, "take() without a frame_ready()"
        return frame

    def frame_ready(self, chunks: int = PUMP_CHUNKS) -> bool:
        """Whether a whole frame waits (take() has it), parsed from what was read, else read
        from the connection, never waiting, until one is whole: at most `chunks` reads (0: no
        system call at all). The one place that parses: ProtocolError if the device broke
        ZMTP."""
        if self._frame is None:
            self._frame = self.reader.next()
        for _ in range(chunks):
            if self._frame is not None:
                return True
            if self._eof or (self._conn is None and not self._accept()):
                return False
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return False
            except OSError:  # ECONNRESET: it ended with our bytes unread
                data = b""
            if not data:
                self._ended()
                return False
            self.reader.feed(data)
            self._frame = self.reader.next()
        return self._frame is not None

    def _accept(self) -> bool:
        """The device's connection, if it has come: taken, the listener closed, our greeting
        and READY sent (they fit in any empty socket buffer: no partial write)."""
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return False
        self._listener.close()
        self._listener = None
        conn.setblocking(False)
        self._conn, self.fd = conn, conn.fileno()
        self._out = self._write(HANDSHAKE)
        return True  # read on, even if the greeting found its end: what it sent before

    def send(self, data: bytes) -> bool:
        """Start sending `data`, ZMTP bytes (encode()): True once it is ours to send (what the
        kernel did not take at once goes out before anything else: flush()). False, nothing
        taken, until the device's greeting and READY are in (a libzmq peer takes a frame that
        comes before it has sent its own READY for a handshake command, and hangs up), while
        a message before it is still going out, or once the connection has ended."""
        if not self.reader.ready or self.closed or not self.flush():
            return False
        self._out = self._write(data)
        return not self.closed

    def flush(self) -> bool:
        """Whether every message taken by send() has gone to the kernel (it writes what is
        left of the last, as far as there is room)."""
        if self._out:
            self._out = self._write(self._out)
        return not self._out and not self.closed

    def _write(self, data: bytes | memoryview) -> bytes | memoryview:
        """What of `data` did not fit (the connection's end: nothing, and closed)."""
        try:
            done = os.write(self.fd, data)
        except BlockingIOError:
            return data
        except OSError:  # EPIPE, ECONNRESET: its end (Python ignores SIGPIPE); the bytes
            self.closed, self._out = True, b""  # it sent before it are still read
            return b""
        return memoryview(data)[done:] if done < len(data) else b""

    def _ended(self) -> None:
        self.closed = self._eof = True
        self._out = b""

    def close_peer(self) -> None:
        """End the device's connection (after a protocol error): it can send us nothing more,
        and what it sent is dropped, by the kernel. `fd` is closed; nothing polls it again
        (a closed link is looked at first)."""
        self._ended()
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                sock.close()
        self._listener = self._conn = None
        self._ended()
