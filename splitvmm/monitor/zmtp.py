"""The monitor's end of a device's ZeroMQ channel, speaking ZMTP 3.0 itself (RFC 23).

Why not a libzmq PAIR socket, as the device has: a compromised device writes any bytes it
likes to its end, and libzmq keeps every part of a multipart message until its last part
comes. ZMQ_MAXMSGSIZE bounds a part and ZMQ_RCVHWM counts whole messages, so one message
that never ends grew the monitor without limit (tests/unit/test_channel_multipart.py; no
libzmq 4.3 option bounds it, and the draft sockets that refuse multipart are not built into
pyzmq). So the monitor's socket is a ZMQ_STREAM one: libzmq's I/O thread still does the
socket work and the wake-ups, but hands over raw chunks of at most 8 KiB, at most RCVHWM of
them unread, and this module parses them:

- the greeting with the NULL mechanism, then the device's READY command, which must name a
  PAIR socket (its libzmq sends both as soon as it sees ours);
- then frames, each a whole message: the MORE flag, a command, reserved flag bits and a
  frame over the channel's maximum are protocol errors, seen in the frame's header, before
  its body has come. What the monitor holds of a device is one unfinished frame and one
  chunk at most.

Towards the device it writes ZMTP frames; a multipart message (posted frames, as one
wake-up: monitor/channel.py post_many) carries MORE on all its parts but the last.

ZmtpReader is the parser alone (no I/O: the unit tests and the fuzzer feed it bytes);
StreamLink is the ZMQ_STREAM socket with the one peer it serves.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import cast

import zmq

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
PUMP_CHUNKS = 64  # chunks one frame_ready() reads at most (a whole 64 KiB frame is ~9)
_NOBLOCK, _SNDMORE, _POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN)  # not IntFlag


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


class StreamLink:
    """A ZMQ_STREAM socket serving one peer, the device's PAIR socket, in ZMTP: the first
    connection is the device's; a second is closed as it comes (only the device and the
    monitor can reach the channel's path). Its end is final: the device's socket never
    reconnects (devprocs/runtime.py)."""

    def __init__(self, sock: zmq.Socket[bytes], max_frame: int) -> None:
        self.sock = sock
        self.reader = ZmtpReader(max_frame)
        self.peer: bytes | None = None
        self.closed = False  # the device's connection ended (or we ended it)
        self._frame: bytes | None = None  # a whole frame read, not yet taken

    def take(self) -> bytes:
        """The frame frame_ready() said waits."""
        frame, self._frame = self._frame, None
        assert frame is not None, "take() without a frame_ready()"
        return frame

    def frame_ready(self, readable: bool = False, chunks: int = PUMP_CHUNKS) -> bool:
        """Whether a whole frame waits (take() has it), parsed from what was read, else from
        what ZeroMQ holds, never waiting, until one is whole: at most `chunks` chunks (0: no
        call to ZeroMQ at all; a chunk from a connection we closed makes no progress).
        `readable`: the caller's poll just said a chunk waits, so the first is read without
        asking ZeroMQ (ZMQ_EVENTS: ~2 us; a recv that finds nothing raises, ~7 us). The one
        place that parses: ProtocolError if the device broke ZMTP."""
        if self._frame is None:
            self._frame = self.reader.next()
        sock = self.sock
        for _ in range(chunks):
            if self._frame is not None:
                return True
            if not readable and not cast(int, sock.get(zmq.EVENTS)) & _POLLIN:
                return False
            readable = False
            try:
                who = sock.recv(_NOBLOCK)
            except zmq.Again:
                return False
            data = sock.recv()  # a STREAM message is always [routing id, data]
            if not data:
                self._notice(who)
            elif who == self.peer and not self.closed:
                self.reader.feed(data)
                self._frame = self.reader.next()
        return self._frame is not None

    def _notice(self, who: bytes) -> None:
        """An empty chunk: a connection (ZMQ_STREAM_NOTIFY) or its end. Nothing here waits
        for room: a connection that has ended by the time its notice is read has a pipe
        ZeroMQ holds, unwritable, until its end's notice is read, by our caller (a blocking
        send waited for ever); what cannot be sent at once is a connection that is gone."""
        if self.peer is None:
            self.peer = who
            try:  # the greeting and READY, at once
                self.sock.send_multipart([who, HANDSHAKE], _NOBLOCK)
            except zmq.ZMQError:  # zmq.Again (ending), EHOSTUNREACH (ended): never greeted
                self.closed = True
        elif who == self.peer:
            self.closed = True
        else:  # another connection: closed (an empty message to it does that), if still there
            try:
                self.sock.send_multipart([who, b""], _NOBLOCK)
            except zmq.ZMQError:
                pass

    def send(self, data: bytes, flags: int) -> None:
        """ZMTP bytes (encode()) to the device; zmq.Again (nothing sent) while its queue is
        full, or until its greeting and READY are in: a libzmq peer takes a frame that comes
        before it has sent its own READY for a handshake command, and hangs up. A
        connection ZeroMQ has ended, its notice not yet read, is closed here too."""
        peer = self.peer
        if peer is None or not self.reader.ready or self.closed:
            raise zmq.Again()
        try:
            self.sock.send(peer, flags | _SNDMORE)
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:  # ZMQ_STREAM: no such peer (any longer)
                raise
            self.closed = True
            raise zmq.Again() from None
        self.sock.send(data, flags)

    def close_peer(self) -> None:
        """End the device's connection (after a protocol error: it reads no more from us)."""
        if self.peer is not None and not self.closed:
            self.closed = True
            try:
                self.sock.send_multipart([self.peer, b""], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
