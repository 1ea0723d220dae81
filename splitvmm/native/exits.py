"""Typed vCPU exits: what KVM_RUN left in the shared kvm_run page, as small immutable records.

VcpuFd.run() returns one record per exit, so the monitor never reads struct kvm_run
itself. This is the path of every guest port or MMIO access: RunPage decodes the
page with one struct.unpack_from whose layout is built here from the header's
offsets (not typed by hand), reads the data bytes as one slice, and builds one
record. The four access records are NamedTuples, built with tuple.__new__: a third
of what a frozen dataclass cost to build (~0.13 against ~0.4 us here), on every
exit. They compare equal only to records of their own type, never to a plain tuple.
The other exits are rare and are frozen msgspec Structs (which build in ~0.09 us:
the access records could be Structs too); the ones without fields are singletons.

A read exit (PioIn, MmioRead) is completed by RunPage.complete_read(data) before the
next KVM_RUN: KVM copies those bytes into the guest's register when it re-enters.
"""

from __future__ import annotations

import enum
import mmap
import struct
from typing import Any, NamedTuple, TypeVar

from splitvmm.native._kvm import ffi, lib
from splitvmm.record import Struct

_R = TypeVar("_R", bound=tuple[object, ...])


def _same_type_eq(self: tuple[object, ...], other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _same_type_ne(self: tuple[object, ...], other: object) -> bool:
    return not _same_type_eq(self, other)


def _access_record(cls: type[_R]) -> type[_R]:
    """A NamedTuple that equals only records of its own type: PioIn(0x60, 1, 1) equals
    neither the tuple (0x60, 1, 1) nor a record of another kind with the same fields."""
    # Replacing methods of a made class is what this decorator is for (a NamedTuple takes no
    # mixin base): mypy cannot check an assignment to a method, so each line says so.
    cls.__eq__ = _same_type_eq  # type: ignore[method-assign]
    cls.__ne__ = _same_type_ne  # type: ignore[method-assign, assignment]
    cls.__hash__ = tuple.__hash__  # type: ignore[method-assign]
    return cls


@_access_record
class PioIn(NamedTuple):
    """`count` reads of `size` bytes from `port` (count > 1 for rep ins)."""

    port: int
    size: int
    # kvm_run's io.count; shadowing tuple.count() is deliberate: a record is never searched.
    count: int  # type: ignore[assignment]


@_access_record
class PioOut(NamedTuple):
    """Writes to `port`: `data` holds len(data) // size accesses of `size` bytes, in order."""

    port: int
    size: int
    data: bytes


@_access_record
class MmioRead(NamedTuple):
    gpa: int
    size: int


@_access_record
class MmioWrite(NamedTuple):
    gpa: int
    data: bytes


class Hlt(Struct, frozen=True):
    """The guest halted and KVM has no in-kernel LAPIC to wait on."""


class Shutdown(Struct, frozen=True):
    """The guest triple-faulted (KVM_EXIT_SHUTDOWN)."""


class Interrupted(Struct, frozen=True):
    """KVM_RUN returned without running the guest to an exit: a kick (EINTR,
    immediate_exit) or KVM_EXIT_INTR. Nothing is pending; run again."""


class Unstarted(Struct, frozen=True):
    """KVM_RUN returned EAGAIN: the vCPU is an AP no INIT and start-up IPI has started yet
    (KVM_MP_STATE_UNINITIALIZED), and an event woke it. Once after its INIT or its SIPI
    (KVM took it, and runs the AP at the next KVM_RUN); again and again, at once, while an
    event KVM cannot deliver to it stays pending (an NMI IPI sent to it: any guest can).
    Nothing is pending; run again, but not in a tight loop."""


class FailEntry(Struct, frozen=True):
    """KVM could not enter the guest; `hardware_reason` is the CPU's (VMX/SVM) code."""

    hardware_reason: int


class InternalError(Struct, frozen=True):
    """KVM_EXIT_INTERNAL_ERROR. For an emulation failure, `insn` holds the instruction
    bytes when KVM reported them (Linux 5.14+), else None. For any other suberror, `data`
    holds internal.data[0..ndata): what KVM says of the error (its meaning is the
    suberror's)."""

    suberror: int
    insn: bytes | None = None
    data: tuple[int, ...] = ()

    @property
    def emulation_failure(self) -> bool:
        return self.suberror == int(lib.KVM_INTERNAL_ERROR_EMULATION)


class SystemEventKind(enum.Enum):
    SHUTDOWN = "shutdown"
    RESET = "reset"
    OTHER = "other"


class SystemEvent(Struct, frozen=True):
    """KVM_EXIT_SYSTEM_EVENT; `type` is the raw KVM_SYSTEM_EVENT_* value, for messages."""

    kind: SystemEventKind
    type: int


class Unknown(Struct, frozen=True):
    """An exit reason the monitor has no handler for (`name` from <linux/kvm.h> if known)."""

    reason: int
    name: str


Exit = (
    PioIn
    | PioOut
    | MmioRead
    | MmioWrite
    | Hlt
    | Shutdown
    | Interrupted
    | Unstarted
    | FailEntry
    | InternalError
    | SystemEvent
    | Unknown
)

HLT = Hlt()
SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()
UNSTARTED = Unstarted()

# KVM_EXIT_* names by number, for Unknown (only the ones the build names; the rest say "?").
EXIT_NAMES: dict[int, str] = {
    getattr(lib, name): name
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
_SYSTEM_EVENT_KINDS = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: SystemEventKind.SHUTDOWN,
    lib.KVM_SYSTEM_EVENT_RESET: SystemEventKind.RESET,
}
_UNPACK_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _field(ctype: str, path: str) -> tuple[int, Any]:
    """(offset, cffi type) of a dotted field path ("io.port") of `ctype`, from the header."""
    names = path.split(".")
    field_type = ffi.typeof(ctype)
    for name in names:
        field_type = dict(field_type.fields)[name].type
    return ffi.offsetof(ctype, *names), field_type


def field_reader(ctype: str, *paths: str) -> struct.Struct:
    """A Struct that unpacks the named integer fields of `ctype`, in that order, at the
    offsets and widths the compiler gave them: one call instead of one cffi attribute
    access per field."""
    fmt, pos = "=", 0
    for path in paths:
        offset, field_type = _field(ctype, path)
        if offset < pos:
            raise ValueError(f"{ctype}: field {path} is not after the one before it")
        fmt += f"{offset - pos}x" if offset > pos else ""
        fmt += _UNPACK_FORMATS[ffi.sizeof(field_type)]
        pos = offset + ffi.sizeof(field_type)
    return struct.Struct(fmt)


_RUN = "struct kvm_run"
# exit_reason, then the io union member: decoded together, port I/O being the common exit.
_HEAD = field_reader(
    _RUN, "exit_reason", "io.direction", "io.size", "io.port", "io.count", "io.data_offset"
)
_MMIO = field_reader(_RUN, "mmio.phys_addr", "mmio.len", "mmio.is_write")
_MMIO_DATA, _MMIO_DATA_TYPE = _field(_RUN, "mmio.data")
_MMIO_DATA_MAX = _MMIO_DATA_TYPE.length
# The hot path's constants as module globals: a cffi `lib.X` lookup costs more than a global.
_EXIT_IO, _EXIT_IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_IO_OUT
_EXIT_MMIO, _EXIT_INTR = lib.KVM_EXIT_MMIO, lib.KVM_EXIT_INTR
_new = tuple.__new__
_IMMEDIATE_EXIT = ffi.offsetof(_RUN, "immediate_exit")
_INSN_MAX = _field(_RUN, "emulation_failure.insn_bytes")[1].length


class RunPage:
    """A vCPU's mmapped struct kvm_run: decodes exits, completes reads, sets immediate_exit.

    Owned by VcpuFd, which unmaps it on close.
    """

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        # SAFETY: `mapping` owns the kvm_run page; its owner (VcpuFd) calls close(), which
        # drops both cdata, before it unmaps the page. Only cold exits read through _run.
        self._buf = ffi.from_buffer(mapping)
        self._run: Any = ffi.cast("struct kvm_run *", self._buf)
        self._read_at = 0  # where the pending read's bytes go in the page ...
        self._read_len = 0  # ... and how many; 0: no read pending

    def set_immediate_exit(self, on: bool) -> None:
        """KVM_RUN returns EINTR at once (after finishing a pending I/O exit) while set."""
        self._map[_IMMEDIATE_EXIT] = 1 if on else 0

    def complete_read(self, data: bytes) -> None:
        """The bytes a PioIn (size * count) or MmioRead (size) exit reads, for the next
        KVM_RUN to hand to the guest."""
        if not self._read_len:
            raise ValueError("no port or MMIO read exit is pending on this vCPU")
        if len(data) != self._read_len:
            raise ValueError(f"read exit wants {self._read_len} bytes, {len(data)} given")
        self._map[self._read_at : self._read_at + self._read_len] = data

    def decode(self) -> Exit:
        """The exit KVM_RUN just returned with (it returned 0)."""
        page = self._map
        reason, direction, size, port, count, offset = _HEAD.unpack_from(page)
        self._read_len = 0
        # _new(Record, fields) is Record(*fields) without NamedTuple's Python-level __new__.
        if reason == _EXIT_IO:
            if direction == _EXIT_IO_OUT:
                return _new(PioOut, (port, size, page[offset : offset + size * count]))
            self._read_at, self._read_len = offset, size * count
            return _new(PioIn, (port, size, count))
        if reason == _EXIT_MMIO:
            gpa, length, is_write = _MMIO.unpack_from(page)
            length = min(length, _MMIO_DATA_MAX)
            if is_write:
                return _new(MmioWrite, (gpa, page[_MMIO_DATA : _MMIO_DATA + length]))
            self._read_at, self._read_len = _MMIO_DATA, length
            return _new(MmioRead, (gpa, length))
        if reason == _EXIT_INTR:
            return INTERRUPTED
        return self._decode_cold(reason)

    def _decode_cold(self, reason: int) -> Exit:
        run = self._run
        if reason == lib.KVM_EXIT_HLT:
            return HLT
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return SHUTDOWN
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntry(run.fail_entry.hardware_entry_failure_reason)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            if internal.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
                return InternalError(internal.suberror, self._insn_bytes())
            ndata = min(internal.ndata, len(internal.data))
            return InternalError(internal.suberror, None, tuple(internal.data[0:ndata]))
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            return SystemEvent(_SYSTEM_EVENT_KINDS.get(kind, SystemEventKind.OTHER), kind)
        return Unknown(reason, EXIT_NAMES.get(reason, "?"))

    def _insn_bytes(self) -> bytes | None:
        failure = self._run.emulation_failure
        if (
            failure.suberror != lib.KVM_INTERNAL_ERROR_EMULATION
            or failure.ndata < 3  # flags, insn_size and insn_bytes are data[0..2]
            or not failure.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            return None
        return bytes(failure.insn_bytes[0 : min(failure.insn_size, _INSN_MAX)])

    def close(self) -> None:
        """Drops the page's cdata: the mapping can be closed after this."""
        self._run = self._buf = None
