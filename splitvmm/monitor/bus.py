"""Bus: non-overlapping address ranges -> the device that decodes them (crosvm/Firecracker Bus).

One bus for port I/O, one for MMIO. A device gets the offset into its window,
and the bus guarantees offset + size <= window. Accesses nobody claims read
as all-ones (what an empty ISA/PCI bus returns) and are counted, never fatal.
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
        if hit is None:
            self._count_unclaimed(addr)
            return b"\xff" * size
        device, offset = hit
        return device.read(offset, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr, len(data))
        if hit is None:
            self._count_unclaimed(addr)
            return
        device, offset = hit
        device.write(offset, data)

    def _count_unclaimed(self, addr: int) -> None:
        with self._log_lock:
            self.unclaimed += 1
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
