"""Fixed-size binary frames on a device channel (crosvm Command/ReadResult shape).

Every frame is FRAME.size bytes: op, size, flags, seq, offset, 8 data bytes.
- monitor -> device: READ (answered by READ_DONE with the same seq), WRITE
  (posted, never answered), INPUT (host input bytes for a console, posted),
  SYNC (answered by SYNC_DONE once everything sent before it is applied).
- device -> monitor: READY (once, when it serves), READ_DONE, SYNC_DONE.
Decoders check everything a hostile peer could get wrong: length, opcode,
size, sequence number, offset range. Nothing here is ever unpickled.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from splitvmm.errors import ProtocolError

FRAME = struct.Struct("<BBHIQ8s")  # op, size, flags, seq, offset, data: 24 bytes
ACCESS_SIZES = (1, 2, 4, 8)
MAX_INPUT_CHUNK = 8


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    READ_DONE = 3
    INPUT = 4
    READY = 5
    SYNC = 6
    SYNC_DONE = 7


@dataclass(frozen=True, slots=True)
class Access:
    """A guest access forwarded to a device: `offset` is relative to the device window."""

    op: Op
    size: int
    seq: int
    offset: int
    data: bytes  # the written bytes (WRITE), the input bytes (INPUT), b"" for READ


def encode_read(seq: int, offset: int, size: int) -> bytes:
    return FRAME.pack(Op.READ, size, 0, seq, offset, b"")


def encode_write(offset: int, data: bytes) -> bytes:
    return FRAME.pack(Op.WRITE, len(data), 0, 0, offset, data)


def encode_input(data: bytes) -> bytes:
    return FRAME.pack(Op.INPUT, len(data), 0, 0, 0, data)


def encode_sync(seq: int) -> bytes:
    return FRAME.pack(Op.SYNC, 0, 0, seq, 0, b"")


def encode_sync_done(seq: int) -> bytes:
    return FRAME.pack(Op.SYNC_DONE, 0, 0, seq, 0, b"")


def encode_read_done(seq: int, data: bytes) -> bytes:
    return FRAME.pack(Op.READ_DONE, len(data), 0, seq, 0, data)


def encode_ready() -> bytes:
    return FRAME.pack(Op.READY, 0, 0, 0, 0, b"")


def _unpack(buf: bytes) -> tuple[int, int, int, int, int, bytes]:
    if len(buf) != FRAME.size:
        raise ProtocolError(f"frame is {len(buf)} bytes, expected {FRAME.size}")
    return FRAME.unpack(buf)


def decode_access(buf: bytes, window: int) -> Access:
    """Device side: a frame from the monitor (trusted, but checked: bugs happen)."""
    op, size, _flags, seq, offset, data = _unpack(buf)
    if op in (Op.READ, Op.WRITE):
        if size not in ACCESS_SIZES or offset + size > window:
            raise ProtocolError(
                f"access {Op(op).name} size={size} offset={offset:#x} out of window"
            )
        return Access(Op(op), size, seq, offset, data[:size] if op == Op.WRITE else b"")
    if op == Op.SYNC:
        return Access(Op.SYNC, 0, seq, 0, b"")
    if op == Op.INPUT:
        if not 0 < size <= MAX_INPUT_CHUNK:
            raise ProtocolError(f"input chunk of {size} bytes")
        return Access(Op.INPUT, size, seq, 0, data[:size])
    raise ProtocolError(f"unexpected opcode {op} from the monitor")


def decode_read_done(buf: bytes, want_seq: int, size: int) -> bytes:
    """Monitor side: the answer to READ `want_seq` of `size` bytes, or ProtocolError."""
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.READ_DONE or seq != want_seq or n != size or flags or offset:
        raise ProtocolError(
            f"unexpected reply op={op} seq={seq} (want {want_seq}) size={n} (want {size})"
        )
    if any(data[size:]):
        raise ProtocolError("reply has data past its size")
    return data[:size]


def decode_sync_done(buf: bytes, want_seq: int) -> None:
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.SYNC_DONE or seq != want_seq or n or flags or offset or any(data):
        raise ProtocolError(f"unexpected reply op={op} seq={seq} to SYNC {want_seq}")


def decode_ready(buf: bytes) -> None:
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.READY or n or flags or seq or offset or any(data):
        raise ProtocolError(f"expected READY, got op={op}")
