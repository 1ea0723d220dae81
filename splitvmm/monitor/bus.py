"""Bus: non-overlapping address ranges -> the device that decodes them (crosvm/Firecracker Bus).

One bus for port I/O, one for MMIO. A device gets the offset into its window,
and the bus guarantees offset + size <= window. Accesses nobody claims read
as all-ones (what an empty ISA/PCI bus returns) and are counted, never fatal.
An access that runs past the end of a window is split at the window's edge, as
the CPU and the chipset split it into one cycle per device (byte enables): each
device gets its part, and a part nobody claims reads as all-ones. `inw 0x3ff`
reads COM1's scratch register and an empty byte, not two empty ones. (QEMU
gives such an access whole to the region where it starts, for chipsets whose
registers overlap; here windows never overlap, so each part has one owner.)
The guest picks those addresses, so what the bus keeps about them has a fixed
size: one count per bus and the last few addresses, for the log.

Ranges change while the guest runs (a PCI BAR moved or its decode turned off, from a
vCPU thread) as other vCPUs look addresses up. Lookups take no lock: a change builds
new lists under the writers' lock and swaps one reference, so a lookup sees the map
before the change or after it, never half of it (copy-on-write, as crosvm's Bus).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from typing import Protocol

from splitvmm.protocol.wire import ACCESS_SIZES
from splitvmm.record import Struct

log = logging.getLogger("splitvmm.bus")

# Unclaimed addresses remembered for the log line. A fixed number: a guest sweeping the PCI
# hole touches millions of distinct addresses, and one record each grew the monitor without
# bound (32 -> 160 MB in 80 s).
RECENT_UNCLAIMED = 4
UNCLAIMED_LOG_INTERVAL_S = 1.0  # at most one line a second, however busy the guest


class BusDevice(Protocol):
    name: str

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


class BusRange(Struct, frozen=True):
    base: int
    size: int
    device: BusDevice


class BusError(ValueError):
    pass


class _Map(Struct, frozen=True):
    """The ranges by base, sorted; never changed once made (a change makes a new one)."""

    bases: tuple[int, ...] = ()
    ranges: tuple[BusRange, ...] = ()


class Bus:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "pio" or "mmio", for messages
        self._map = _Map()  # read without a lock: replaced whole, never changed
        self._change_lock = threading.Lock()  # one insert or remove at a time
        self.unclaimed = 0  # accesses nobody claimed, every address together
        self.recent_unclaimed: deque[int] = deque(maxlen=RECENT_UNCLAIMED)
        self._last_log = 0.0
        self._log_lock = threading.Lock()

    def insert(self, base: int, size: int, device: BusDevice) -> None:
        if size <= 0:
            raise BusError(f"{self.kind} range for {device.name} is empty")
        with self._change_lock:
            bases, ranges = self._map.bases, self._map.ranges
            i = bisect.bisect_right(bases, base)
            before = ranges[i - 1] if i else None
            after = ranges[i] if i < len(ranges) else None
            if before and before.base + before.size > base:
                other = before
            elif after and base + size > after.base:
                other = after
            else:
                other = None
            if other is not None:
                raise BusError(
                    f"{self.kind} {base:#x}+{size:#x} of {device.name} overlaps {other.device.name}"
                )
            new = BusRange(base, size, device)
            self._map = _Map(bases[:i] + (base,) + bases[i:], ranges[:i] + (new,) + ranges[i:])

    def remove(self, base: int, device: BusDevice) -> None:
        """Take out the range at `base`, which `device` must hold (BusError otherwise)."""
        with self._change_lock:
            bases, ranges = self._map.bases, self._map.ranges
            i = bisect.bisect_left(bases, base)
            if i == len(bases) or bases[i] != base or ranges[i].device is not device:
                raise BusError(f"{self.kind} {base:#x} holds no range of {device.name}")
            self._map = _Map(bases[:i] + bases[i + 1 :], ranges[:i] + ranges[i + 1 :])

    def find(self, addr: int, size: int) -> tuple[BusDevice, int] | None:
        current = self._map  # one read: this lookup's map, whatever a writer swaps in
        i = bisect.bisect_right(current.bases, addr) - 1
        if i < 0:
            return None
        r = current.ranges[i]
        offset = addr - r.base
        if offset + size > r.size:
            return None
        return r.device, offset

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr, size)
        if hit is not None:
            device, offset = hit
            return device.read(offset, size)
        out = bytearray()
        for _at, length, part in self._parts(addr, size):
            out += b"\xff" * length if part is None else part[0].read(part[1], length)
        return bytes(out)

    def read_repeated(self, addr: int, size: int, count: int) -> bytes:
        """`count` reads of `size` bytes at `addr`, back to back (a rep ins). Where no window
        holds any byte of it, all-ones in one step, counted as `count` accesses: each read
        through read() cost ~3 us of Python, a 4 KiB `rep insb` on port 0x80 ~11 ms of the
        monitor's, holding the GIL its other threads wait for."""
        if self._nowhere(addr, size):
            self._count_unclaimed(addr, count)
            return b"\xff" * (size * count)
        return b"".join(self.read(addr, size) for _ in range(count))

    def write_repeated(self, addr: int, size: int, data: bytes) -> None:
        """len(data) // size writes of `size` bytes at `addr`, back to back (a rep outs); as
        read_repeated, dropped in one step where no window holds any byte of it."""
        if self._nowhere(addr, size):
            self._count_unclaimed(addr, len(data) // size)
            return
        for i in range(0, len(data), size):
            self.write(addr, data[i : i + size])

    def _nowhere(self, addr: int, size: int) -> bool:
        """Whether no window holds any byte of [addr, addr + size)."""
        current = self._map
        i = bisect.bisect_right(current.bases, addr + size - 1) - 1
        return i < 0 or current.ranges[i].base + current.ranges[i].size <= addr

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr, len(data))
        if hit is not None:
            device, offset = hit
            device.write(offset, data)
            return
        for at, length, part in self._parts(addr, len(data)):
            if part is not None:
                part[0].write(part[1], data[at - addr : at - addr + length])

    def _parts(self, addr: int, size: int) -> list[tuple[int, int, tuple[BusDevice, int] | None]]:
        """An access no one window holds whole, cut where windows begin and end: (address,
        length, (device, offset) or None where no window is), in order. Counted unclaimed
        once if any part is."""
        current = self._map  # one map for every part, whatever a writer swaps in meanwhile
        parts: list[tuple[int, int, tuple[BusDevice, int] | None]] = []
        at, end = addr, addr + size
        i = bisect.bisect_right(current.bases, at) - 1
        while at < end:
            r = current.ranges[i] if i >= 0 else None
            if r is not None and at < r.base + r.size:  # inside window i
                length = min(end, r.base + r.size) - at
                for offset, piece in aligned_pieces(at - r.base, length):
                    parts.append((r.base + offset, piece, (r.device, offset)))
            else:  # a gap, up to the next window's start
                next_base = current.bases[i + 1] if i + 1 < len(current.bases) else end
                length = min(end, next_base) - at
                parts.append((at, length, None))
            at += length
            if i + 1 < len(current.bases) and at >= current.bases[i + 1]:
                i += 1
        if any(part is None for _, _, part in parts):
            self._count_unclaimed(addr)
        return parts

    def _count_unclaimed(self, addr: int, accesses: int = 1) -> None:
        with self._log_lock:
            self.unclaimed += accesses
            self.recent_unclaimed.append(addr)
            now = time.monotonic()
            if now - self._last_log >= UNCLAIMED_LOG_INTERVAL_S:
                self._last_log = now
                recent = ", ".join(f"{a:#x}" for a in self.recent_unclaimed)
                log.info(
                    "%d unclaimed %s accesses so far, latest at %s",
                    self.unclaimed,
                    self.kind,
                    recent,
                )


def aligned_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """`length` bytes from `offset` as accesses a device takes (wire.ACCESS_SIZES, each
    aligned to its size): the part of a 4-byte access left in a window may be 3 bytes, which
    no device is ever sent (its frame decoder refuses one, and the device would fail)."""
    pieces = []
    while length:  # 1 is always one: each step takes the largest that fits and is aligned
        size = next(n for n in _LARGEST_FIRST if n <= length and offset % n == 0)
        pieces.append((offset, size))
        offset, length = offset + size, length - size
    return pieces


_LARGEST_FIRST = sorted(ACCESS_SIZES, reverse=True)
