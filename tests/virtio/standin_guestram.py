"""Test-only stand-in for splitvmm/devprocs/virtio/guestram.py (written on another branch),
with exactly the contract's API; tests/conftest.py installs it only while the real module is
missing, so the same tests run against the real one once it is merged."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence

PAGE = 4096


class GuestRamError(Exception):
    """A guest address/length outside RAM."""


class GuestRam:
    def __init__(self, ram: mmap.mmap, dirty: mmap.mmap, ranges: Sequence[tuple[int, int, int]]):
        self._ram, self._dirty, self._ranges = ram, dirty, list(ranges)

    @classmethod
    def map(cls, ram_fd: int, dirty_fd: int, ranges: Sequence[tuple[int, int, int]]) -> GuestRam:
        import os

        ram = mmap.mmap(ram_fd, os.fstat(ram_fd).st_size)
        dirty = mmap.mmap(dirty_fd, os.fstat(dirty_fd).st_size)
        return cls(ram, dirty, ranges)

    def _offset(self, gpa: int, size: int) -> int:
        for start, length, offset in self._ranges:
            if start <= gpa and gpa + size <= start + length and size >= 0:
                return offset + gpa - start
        raise GuestRamError(f"guest range {gpa:#x}+{size:#x} is not in RAM")

    def check(self, gpa: int, size: int) -> None:
        self._offset(gpa, size)

    def _mark(self, offset: int, size: int) -> None:
        for page in range(offset // PAGE, (offset + max(size, 1) - 1) // PAGE + 1):
            self._dirty[page // 8] |= 1 << (page % 8)

    def read(self, gpa: int, size: int) -> bytes:
        off = self._offset(gpa, size)
        return bytes(self._ram[off : off + size])

    def write(self, gpa: int, data: bytes) -> None:
        off = self._offset(gpa, len(data))
        self._ram[off : off + len(data)] = data
        self._mark(off, len(data))

    def buffer(self, gpa: int, size: int, writable: bool) -> memoryview:
        off = self._offset(gpa, size)
        if writable:
            self._mark(off, size)
        return memoryview(self._ram)[off : off + size]

    def u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def u64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))
