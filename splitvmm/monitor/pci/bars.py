"""BAR decode and placement: the part of a function's config space the monitor owns.

A BAR's low bits are read-only flags and the bits below its size read as zero, so writing
all-ones and reading back gives the size (PCI Local Bus 3.0 6.2.5.1): what a driver that
assigns its own BARs does before it writes a new base. BARs start pre-assigned in the PCI
hole (as crosvm and Firecracker do, so a guest needs no firmware to use them). Every change
of a BAR's base is reported to the owner of the bus ranges (`on_move`), which decides
whether the new base decodes (the command register's enables, the virtio step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from splitvmm.errors import ConfigError
from splitvmm.monitor.pci.config import BAR0, BAR_COUNT, BAR_END, ConfigSpace
from splitvmm.protocol.models import BarKind, PciBar
from splitvmm.record import Struct

DWORD = 0xFFFF_FFFF
BAR_IO_SPACE = 0x1  # bit 0: I/O space indicator
BAR_MEM_TYPE_64 = 0x4  # bits 2:1 = 10b: 64-bit memory BAR
BAR_MEM_PREFETCH = 0x8  # bit 3: prefetchable
BAR_MEM_FLAG_BITS = 0xF
BAR_IO_FLAG_BITS = 0x3
MIN_MEM_BAR = 16  # the four flag bits are never address bits
MIN_IO_BAR = 4
MAX_IO_BAR = 256  # 6.2.5.1: an I/O BAR asks for at most 256 bytes

# (bar index, old base, new base)
MoveHook = Callable[[int, int, int], None]


def check_bars(name: str, bars: Sequence[PciBar]) -> None:
    """Refuse a descriptor whose BARs a guest could not size (a model author's mistake)."""
    taken: set[int] = set()
    for bar in bars:
        regs = {bar.index, bar.index + 1} if bar.kind is BarKind.MEM64 else {bar.index}
        low = MIN_IO_BAR if bar.kind is BarKind.IO else MIN_MEM_BAR
        high = MAX_IO_BAR if bar.kind is BarKind.IO else 1 << 63
        if not regs <= set(range(BAR_COUNT)) or regs & taken:
            raise ConfigError(f"{name}: BAR {bar.index} overlaps another or lies past BAR 5")
        if bar.size & (bar.size - 1) or not low <= bar.size <= high:
            raise ConfigError(f"{name}: BAR {bar.index} size {bar.size:#x} is not a power of two")
        if bar.kind is BarKind.MEM32 and bar.size > 1 << 31:
            raise ConfigError(f"{name}: 32-bit BAR {bar.index} is larger than 2 GiB")
        taken |= regs


class _Register(Struct, frozen=True):
    """One BAR dword: its writable address bits and its read-only flags."""

    mask: int
    flags: int


def _registers(bar: PciBar) -> dict[int, _Register]:
    size_mask = ~(bar.size - 1)
    if bar.kind is BarKind.IO:
        return {bar.index: _Register(size_mask & DWORD & ~BAR_IO_FLAG_BITS, BAR_IO_SPACE)}
    flags = BAR_MEM_PREFETCH if bar.prefetchable else 0
    if bar.kind is BarKind.MEM32:
        return {bar.index: _Register(size_mask & DWORD & ~BAR_MEM_FLAG_BITS, flags)}
    return {
        bar.index: _Register(size_mask & DWORD & ~BAR_MEM_FLAG_BITS, flags | BAR_MEM_TYPE_64),
        bar.index + 1: _Register((size_mask >> 32) & DWORD, 0),
    }


class BarDecoder:
    """The six BAR registers of one function, at config offsets 0x10-0x27."""

    def __init__(
        self, name: str, bars: Sequence[PciBar], bases: Mapping[int, int], on_move: MoveHook
    ) -> None:
        check_bars(name, bars)
        self._bars = {bar.index: bar for bar in bars}
        self._regs: dict[int, _Register] = {}
        for bar in bars:
            self._regs.update(_registers(bar))
        self._values = [0] * BAR_COUNT  # unimplemented BARs read as zero (6.2.5.1)
        for bar in bars:
            self._set_base(bar, bases[bar.index])
        self._on_move = on_move
        self._lock = threading.Lock()  # one read-modify-write at a time, whichever vCPU

    @staticmethod
    def owns(offset: int) -> bool:
        return BAR0 <= offset < BAR_END

    def base(self, index: int) -> int:
        bar = self._bars[index]
        low = self._values[index] & self._regs[index].mask
        if bar.kind is BarKind.MEM64:
            return low | self._values[index + 1] << 32
        return low

    def registers(self) -> tuple[int, ...]:
        """The six BAR dwords as the guest reads them (a snapshot's record of them)."""
        with self._lock:
            return tuple(self._values)

    def load(self, values: tuple[int, ...]) -> None:
        """Set the six BAR dwords from a snapshot (untrusted): each keeps only the address bits
        its BAR's size allows and its read-only flags, as a guest's write would. The owner
        re-decodes afterwards; no move is reported."""
        with self._lock:
            for index, value in enumerate(values[:BAR_COUNT]):
                reg = self._regs.get(index)
                self._values[index] = 0 if reg is None else (value & reg.mask) | reg.flags

    def read(self, offset: int, size: int) -> bytes:
        start = offset - BAR0
        with self._lock:
            raw = b"".join(v.to_bytes(4, "little") for v in self._values)
        return raw[start : start + size]

    def write(self, offset: int, data: bytes) -> None:
        index, shift = divmod(offset - BAR0, 4)
        reg = self._regs.get(index)
        if reg is None:
            return  # an unimplemented BAR ignores writes
        with self._lock:
            owner = self._owner(index)
            old = self.base(owner)
            value = bytearray(self._values[index].to_bytes(4, "little"))
            value[shift : shift + len(data)] = data
            self._values[index] = (int.from_bytes(value, "little") & reg.mask) | reg.flags
            new = self.base(owner)
        if new != old:
            self._on_move(owner, old, new)

    def _owner(self, index: int) -> int:
        """The BAR a register belongs to: the upper dword of a 64-bit BAR is its index - 1."""
        return index if index in self._bars else index - 1

    def _set_base(self, bar: PciBar, base: int) -> None:
        if base % bar.size:
            raise ConfigError(f"BAR {bar.index} base {base:#x} is not aligned to its size")
        for index, reg in _registers(bar).items():
            part = base >> 32 if index != bar.index else base & DWORD
            self._values[index] = (part & reg.mask) | reg.flags


class FunctionWithBars:
    """A function whose config space its owner serves, but for the BARs, decoded here."""

    def __init__(self, inner: ConfigSpace, bars: BarDecoder) -> None:
        self.name = inner.name
        self._inner = inner
        self.bars = bars

    def config_read(self, offset: int, size: int) -> bytes:
        if self.bars.owns(offset):
            return self.bars.read(offset, size)
        return self._inner.config_read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        if self.bars.owns(offset):
            self.bars.write(offset, data)
        else:
            self._inner.config_write(offset, data)


class BarAllocator:
    """Naturally aligned bases from one window of the PCI hole (bump allocation: BARs are
    placed once, when the VM is built)."""

    def __init__(self, start: int, end: int, what: str) -> None:
        self._next, self._end, self._what = start, end, what

    def allocate(self, size: int) -> int:
        base = -(-self._next // size) * size
        if base + size > self._end:
            raise ConfigError(f"no room for a BAR of {size:#x} bytes in the {self._what} window")
        self._next = base + size
        return base
