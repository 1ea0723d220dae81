"""ZMTP 3.0 (RFC 23), the wire of every device channel: ZeroMQ's protocol, spoken by both
ends themselves over the UNIX stream socket the device connects to (the monitor's end:
monitor/zmtp.py; the device's: devprocs/channel.py). Any ZeroMQ PAIR socket can still be
either end: the tests' and `splitvmm policy audit`'s monitor ends are pyzmq's.

Why neither end uses libzmq (bench/exit_rtt.py has the figures):

- A compromised device writes any bytes it likes to its end, and a libzmq socket keeps
  every part of a multipart message until its last part comes. ZMQ_MAXMSGSIZE bounds a
  part and ZMQ_RCVHWM counts whole messages, so one message that never ends grew the
  monitor without limit (tests/unit/test_channel_multipart.py; no libzmq 4.3 option bounds
  it, and the draft sockets that refuse multipart are not built into pyzmq).
- libzmq's I/O thread stands between every socket and its user: a forwarded access woke it
  twice on each side (the request, the reply), on top of the two threads that do the work.
  On this project's 2-CPU hosts a wake-up on the other CPU costs as much as the rest of the
  round trip (bench/floors.py's pipe floors). Here the vCPU thread writes the request and
  reads the reply itself, and so does the device's one thread.
- Each end starts without importing pyzmq or starting libzmq's threads (bench/startup.py),
  and runs without their memory (bench/memory.py); a device process has one thread, and its
  seccomp filter allows nothing for threads it does not have (policies/).

What each end takes from its peer (ZmtpReader):

- the greeting with the NULL mechanism, then the peer's READY command, which must name a
  PAIR socket (a libzmq peer sends both as soon as it sees ours);
- then frames, each a whole message: the MORE flag, a command, reserved flag bits and a
  frame over the end's maximum are protocol errors, seen in the frame's header, before
  its body has come. So an end holds of its peer a whole frame not yet taken, one
  unfinished frame and one read's chunk at most; the rest waits in the kernel's socket
  buffer, and a peer that fills it waits in its send.

Each end writes HANDSHAKE (its greeting and READY) first, then frames (encode()), and sends
no frame before the peer's READY is in: a libzmq peer takes a frame that comes before it has
sent its own READY for a handshake command, and hangs up.
"""

from __future__ import annotations

import struct

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
MAX_READY = 1024  # the peer's READY command: a socket type and, at most, a routing id
CHUNK = 64 * 1024  # bytes one read takes at most, at either end


def encode(frame: bytes) -> bytes:
    """`frame` as one ZMTP message of one part (several go out in one write: b"".join)."""
    if len(frame) < 256:  # a request or a reply: the path a vCPU waits on
        return bytes((0, len(frame))) + frame
    return struct.pack(">BQ", LONG, len(frame)) + frame


class ZmtpReader:
    """The peer's bytes in, its frames out, each checked on its header (the module
    docstring). ProtocolError says what was wrong, in words that follow the peer's name
    ("device serial0 sent ..."); after one, nothing more is read."""

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
        """The peer's greeting and READY command, checked: True once both are in."""
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
    Socket-Type must be PAIR, as our end is."""
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
