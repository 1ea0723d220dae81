"""Guest RAM: one memfd, sealed so nobody can shrink or grow it, mapped in the monitor.

Device processes get the same memfd and map it themselves, so virtqueue data
never passes through the monitor. The seal matters: a device that could
ftruncate() the memfd would make the monitor's mapping fault (SIGBUS).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

from splitvmm.errors import SplitvmmError
from splitvmm.monitor.layout import ram_ranges

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class GuestMemoryError(SplitvmmError):
    """An access to a guest-physical range that is not (all) RAM."""


@dataclass(frozen=True, slots=True)
class Region:
    gpa: int  # guest-physical start
    size: int
    offset: int  # offset in the memfd


class GuestMemory:
    """The guest's RAM as one sealed memfd, split into regions around the PCI hole."""

    def __init__(self, size: int, name: str = "guest-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        regions, offset = [], 0
        for gpa, length in ram_ranges(size):
            regions.append(Region(gpa, length, offset))
            offset += length
        self.regions: tuple[Region, ...] = tuple(regions)

    def slots(self, holes: list[tuple[int, int]]) -> list[Region]:
        """RAM regions with (gpa, size) holes cut out, for KVM memory slots (which cannot overlap)."""
        out = list(self.regions)
        for hole_gpa, hole_size in holes:
            cut = []
            for r in out:
                lo, hi = max(r.gpa, hole_gpa), min(r.gpa + r.size, hole_gpa + hole_size)
                if lo >= hi:
                    cut.append(r)
                    continue
                if r.gpa < lo:
                    cut.append(Region(r.gpa, lo - r.gpa, r.offset))
                if hi < r.gpa + r.size:
                    cut.append(Region(hi, r.gpa + r.size - hi, r.offset + hi - r.gpa))
            out = cut
        return out

    def _locate(self, gpa: int, length: int) -> int:
        """The memfd offset of [gpa, gpa+length), which must lie in one region."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        off = self._locate(gpa, len(data))
        self.map[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self._locate(gpa, length)
        return self.map[off : off + length]

    def view(self, gpa: int, length: int) -> memoryview:
        off = self._locate(gpa, length)
        return memoryview(self.map)[off : off + length]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
