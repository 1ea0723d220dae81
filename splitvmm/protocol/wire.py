"""Fixed-size binary frames on a device channel (crosvm Command/ReadResult shape).

Every frame is FRAME.size bytes: op, size, flags, seq, offset, 8 data bytes.
- monitor -> device: READ (answered by READ_DONE with the same seq), WRITE
  (posted, never answered), INPUT (host input bytes for a console, posted),
  SYNC (answered by SYNC_DONE once everything sent before it is applied).
- device -> monitor: READY (once, when it serves), READ_DONE, SYNC_DONE, and MIRROR
  (unasked, like an event: the current values of the registers its model mirrors, for the
  monitor to answer reads of them itself; monitor/mirror.py says when it may). A READ_DONE
  may carry RESTAMPED: the device's last MIRROR holds after this read too, stamped anew
  (its offset field), which saves a whole MIRROR frame per forwarded read. And CHECKPOINT
  (unasked, like an event): the state the device published last (protocol/events.py)
  still holds at a later point, a checkpoint without a state document.
Decoders check everything a hostile peer could get wrong: length, opcode,
size, sequence number, offset range. Nothing here is ever unpickled.
"""

from __future__ import annotations

import enum
import struct

from splitvmm.errors import ProtocolError
from splitvmm.record import Struct

FRAME = struct.Struct("<BBHIQ8s")  # op, size, flags, seq, offset, data: 24 bytes
ACCESS_SIZES = (1, 2, 4, 8)
MAX_INPUT_CHUNK = 8
# A MIRROR frame reuses FRAME's fields: size = the valid mask (one bit per mirrored register,
# so at most 8 registers), flags = the credit (u16), seq = the stamp (frames applied, mod
# 2**32), offset = the credit's offset, data = the registers' values in declaration order.
MAX_MIRRORED = 8
MIRROR_BYTES = 8
MAX_CREDIT = 0xFFFF
STAMP_MASK = 0xFFFFFFFF
# READ_DONE flag: the values, credit offset and credit of the device's last MIRROR hold after
# this read too; the frame's offset is their new stamp (monitor/mirror.py RegisterMirror.restamp).
RESTAMPED = 1
# SYNC flag: the monitor's last request before it ends the device (monitor/machine.py
# _sync_devices): the device gives a slow output line up to FLUSH_TIMEOUT_MS to take what it
# holds. Any other SYNC (a synced write's, a restart's late write's) is answered at once.
DRAIN = 1
# A CHECKPOINT frame: offset = the frames the device had applied, data = the output bytes its
# line had taken (u64); size, flags and seq are 0.
EMITTED = struct.Struct("<Q")
MAX_COUNT = (1 << 63) - 1  # a frame or byte count over a device's life (control.py's too)


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    READ_DONE = 3
    INPUT = 4
    READY = 5
    SYNC = 6
    SYNC_DONE = 7
    MIRROR = 8
    CHECKPOINT = 9


_OPS = {op.value: op for op in Op}  # a dict's lookup: Op(value) costs ~0.3 us a frame


class Access(Struct, frozen=True):
    """A guest access forwarded to a device: `offset` is relative to the device window."""

    op: Op
    size: int
    seq: int
    offset: int
    data: bytes  # the written bytes (WRITE), the input bytes (INPUT), b"" for READ
    drain: bool = False  # SYNC only: wire.DRAIN, the teardown's


class Mirror(Struct, frozen=True):
    """What a read of each mirrored register returns now, as its device publishes it.

    values: per register its model declares (ModelDescriptor.mirrored, in that order), the
    bytes a read of it returns now, or None when it cannot be answered without the device
    now (its read would have a side effect, or the value is about to change).
    credit: how many posted writes at credit_offset, after the stamp, leave every value as
    it is: the device's promise, which lets the monitor answer a read after such a write
    without waiting for the device to say so.
    stamp: the frames (reads, writes, input) the device had applied when it took the values.
    """

    values: tuple[bytes | None, ...]
    credit_offset: int = 0
    credit: int = 0
    stamp: int = 0


def encode_read(seq: int, offset: int, size: int) -> bytes:
    return FRAME.pack(Op.READ, size, 0, seq, offset, b"")


def encode_write(offset: int, data: bytes) -> bytes:
    return FRAME.pack(Op.WRITE, len(data), 0, 0, offset, data)


def encode_input(data: bytes) -> bytes:
    return FRAME.pack(Op.INPUT, len(data), 0, 0, 0, data)


def encode_sync(seq: int, drain: bool = False) -> bytes:
    return FRAME.pack(Op.SYNC, 0, DRAIN if drain else 0, seq, 0, b"")


def encode_sync_done(seq: int) -> bytes:
    return FRAME.pack(Op.SYNC_DONE, 0, 0, seq, 0, b"")


def encode_read_done(seq: int, data: bytes, stamp: int | None = None) -> bytes:
    """The answer to READ `seq`; with a `stamp`, RESTAMPED: the last MIRROR holds at it."""
    if stamp is None:
        return FRAME.pack(Op.READ_DONE, len(data), 0, seq, 0, data)
    return FRAME.pack(Op.READ_DONE, len(data), RESTAMPED, seq, stamp & STAMP_MASK, data)


def encode_ready() -> bytes:
    return FRAME.pack(Op.READY, 0, 0, 0, 0, b"")


def encode_mirror(mirror: Mirror, registers: tuple[tuple[int, int], ...]) -> bytes:
    """Device side: `mirror` of the (offset, size) registers its model declares."""
    if len(mirror.values) != len(registers) or not 0 <= mirror.credit <= MAX_CREDIT:
        raise ProtocolError(f"mirror of {len(mirror.values)} values for {len(registers)} registers")
    mask, data = 0, b""
    for i, (value, (_, size)) in enumerate(zip(mirror.values, registers, strict=True)):
        if value is not None:
            if len(value) != size:
                raise ProtocolError(f"mirrored register {i} is {size} bytes, not {len(value)}")
            mask |= 1 << i
        data += value if value is not None else bytes(size)
    stamp = mirror.stamp & STAMP_MASK
    return FRAME.pack(Op.MIRROR, mask, mirror.credit, stamp, mirror.credit_offset, data)


def encode_checkpoint(applied: int, emitted: int) -> bytes:
    """Device side: its last published state still holds after `applied` frames, with
    `emitted` output bytes taken by its line."""
    return FRAME.pack(Op.CHECKPOINT, 0, 0, 0, applied, EMITTED.pack(emitted))


def is_checkpoint(buf: bytes) -> bool:
    """Whether a frame from a device claims to be a CHECKPOINT (decode_checkpoint checks it)."""
    return len(buf) == FRAME.size and buf[0] == Op.CHECKPOINT


def decode_checkpoint(buf: bytes) -> tuple[int, int]:
    """Monitor side: (applied, emitted) of a CHECKPOINT frame, or ProtocolError."""
    op, n, flags, seq, applied, data = _unpack(buf)
    if op != Op.CHECKPOINT:
        raise ProtocolError(f"expected CHECKPOINT, got op={op}")
    if n or flags or seq:
        raise ProtocolError(f"CHECKPOINT with size={n} flags={flags} seq={seq}, not all 0")
    (emitted,) = EMITTED.unpack(data)
    if applied > MAX_COUNT or emitted > MAX_COUNT:
        raise ProtocolError(f"checkpoint counts {applied} frames, {emitted} bytes: over 2**63-1")
    return applied, emitted


_ACCESS_REPLIES = frozenset((Op.READ_DONE, Op.SYNC_DONE))


def is_access_reply(buf: bytes) -> bool:
    """Whether a frame from a device claims to answer an access (READ_DONE, SYNC_DONE: no
    event; decode_read_reply and decode_sync_done check it)."""
    return len(buf) == FRAME.size and buf[0] in _ACCESS_REPLIES


def is_mirror(buf: bytes) -> bool:
    """Whether a frame from a device claims to be a MIRROR (decode_mirror checks it)."""
    return len(buf) == FRAME.size and buf[0] == Op.MIRROR


def decode_mirror(buf: bytes, registers: tuple[tuple[int, int], ...], window: int) -> Mirror:
    """Monitor side: a device's MIRROR of the (offset, size) registers its model declares, in
    a `window`-byte window. Only what the declaration allows passes: a value for a register
    it does not declare, bytes past the declared sizes or a credit outside the window are a
    ProtocolError."""
    op, mask, credit, stamp, credit_offset, data = _unpack(buf)
    if op != Op.MIRROR:
        raise ProtocolError(f"expected MIRROR, got op={op}")
    if mask >> len(registers):
        raise ProtocolError(
            f"mirror gives register {mask.bit_length() - 1}, the model mirrors {len(registers)}"
        )
    if credit_offset >= window:
        raise ProtocolError(f"mirror credit at offset {credit_offset:#x}, outside the window")
    values: list[bytes | None] = []
    at = 0
    for i, (_, size) in enumerate(registers):
        value, at = data[at : at + size], at + size
        if not mask >> i & 1 and any(value):
            raise ProtocolError(f"mirror has a value for register {i}, marked not valid")
        values.append(value if mask >> i & 1 else None)
    if any(data[at:]):
        raise ProtocolError("mirror has data past its registers")
    return Mirror(tuple(values), credit_offset, credit, stamp)


def _unpack(buf: bytes) -> tuple[int, int, int, int, int, bytes]:
    if len(buf) != FRAME.size:
        raise ProtocolError(f"frame is {len(buf)} bytes, expected {FRAME.size}")
    return FRAME.unpack(buf)


def decode_access(buf: bytes, window: int) -> Access:
    """Device side: a frame from the monitor (trusted, but checked: bugs happen)."""
    op, size, flags, seq, offset, data = _unpack(buf)
    if op in (Op.READ, Op.WRITE):
        if size not in ACCESS_SIZES or offset + size > window:
            raise ProtocolError(
                f"access {Op(op).name} size={size} offset={offset:#x} out of window"
            )
        return Access(_OPS[op], size, seq, offset, data[:size] if op == Op.WRITE else b"")
    if op == Op.SYNC:
        return Access(Op.SYNC, 0, seq, 0, b"", drain=bool(flags & DRAIN))
    if op == Op.INPUT:
        if not 0 < size <= MAX_INPUT_CHUNK:
            raise ProtocolError(f"input chunk of {size} bytes")
        return Access(Op.INPUT, size, seq, 0, data[:size])
    raise ProtocolError(f"unexpected opcode {op} from the monitor")


def decode_read_done(buf: bytes, want_seq: int, size: int) -> bytes:
    """Monitor side: the answer to READ `want_seq` of `size` bytes, or ProtocolError."""
    return decode_read_reply(buf, want_seq, size)[0]


def decode_read_reply(buf: bytes, want_seq: int, size: int) -> tuple[bytes, int | None]:
    """decode_read_done, and the new stamp of the device's last MIRROR if the reply is
    RESTAMPED (None if not)."""
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.READ_DONE or seq != want_seq or n != size:
        raise ProtocolError(
            f"unexpected reply op={op} seq={seq} (want {want_seq}) size={n} (want {size})"
        )
    if flags & ~RESTAMPED or offset > (STAMP_MASK if flags else 0):
        raise ProtocolError(f"reply has flags {flags:#x} and offset {offset:#x}")
    if any(data[size:]):
        raise ProtocolError("reply has data past its size")
    return data[:size], offset if flags else None


def decode_sync_done(buf: bytes, want_seq: int) -> None:
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.SYNC_DONE or seq != want_seq or n or flags or offset or any(data):
        raise ProtocolError(f"unexpected reply op={op} seq={seq} to SYNC {want_seq}")


def decode_ready(buf: bytes) -> None:
    op, n, flags, seq, offset, data = _unpack(buf)
    if op != Op.READY or n or flags or seq or offset or any(data):
        raise ProtocolError(f"expected READY, got op={op}")
