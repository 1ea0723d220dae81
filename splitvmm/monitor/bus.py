"""Bus: non-overlapping address ranges -> the device that decodes them (crosvm/Firecracker Bus).

One bus for port I/O, one for MMIO. A device gets the offset into its window,
and the bus guarantees offset + size <= window. Accesses nobody claims read
as all-ones (what an empty ISA/PCI bus returns) and are counted, never fatal.
The guest picks those addresses, so what the bus keeps about them has a fixed
size: one count per bus and the last few addresses, for the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True, slots=True)
class BusRange:
    base: int
    size: int
    device: BusDevice


class BusError(ValueError):
    pass


class Bus:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "pio" or "mmio", for messages
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self.unclaimed = 0  # accesses nobody claimed, every address together
        self.recent_unclaimed: deque[int] = deque(maxlen=RECENT_UNCLAIMED)
        self._last_log = 0.0
        self._log_lock = threading.Lock()

    def insert(self, base: int, size: int, device: BusDevice) -> None:
        if size <= 0:
            raise BusError(f"{self.kind} range for {device.name} is empty")
        i = bisect.bisect_right(self._bases, base)
        before = self._ranges[i - 1] if i else None
        after = self._ranges[i] if i < len(self._ranges) else None
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
        self._bases.insert(i, base)
        self._ranges.insert(i, BusRange(base, size, device))

    def find(self, addr: int, size: int) -> tuple[BusDevice, int] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
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
