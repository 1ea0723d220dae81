"""Guest RAM as a virtio device process sees it: the RAM memfd and its dirty bitmap.

A device reads and writes guest buffers in place (rings, request data), by guest-physical
address, through a MAP_SHARED mapping of the memfd the monitor handed it. Every address and
length comes from the guest, so every access is bounds-checked against the RAM ranges the
monitor gave (DeviceSpec.transport["ram"]) and never reaches a hole or past the memfd.

KVM's dirty log sees vCPU writes only, so every page the device writes is marked in the
dirty bitmap memfd's first half, its live bitmap (bit n % 8 of byte n // 8 for page n of the
RAM memfd), for the monitor's snapshots. Its second half is the harvest: between two passes of
a live snapshot's copy (monitor/dirtylog.py) the device moves its marks there and clears the
live bitmap (harvest_dirty), on its own thread, between requests, so that no mark races the
clear; the monitor then reads and clears the harvest, which the device touches at no other
time. The monitor clears the live bitmap itself only while the device is quiesced: no mark
races that clear (one that did could be lost).

GuestMemoryView (native/mem.py) is the monitor's view of the same memfd; this one adds the
dirty log, checks the ranges harder (page aligned, no two aliasing the same memfd pages) and
also runs over plain bytearrays, so queue tests need no memfd.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Any

from splitvmm.native.mem import GuestMemoryError, Region, map_shared_fd
from splitvmm.protocol.dirtybits import PAGE_SHIFT, PAGE_SIZE, bitmap_size, mark_pages

GPA_LIMIT = 1 << 64

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

Buffer = bytearray | mmap.mmap


class GuestRamError(GuestMemoryError):
    """A guest address/length outside RAM (the caller turns it into NEEDS_RESET), or RAM
    ranges that do not fit the memfd."""


def skip_bytes(parts: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """A chain's (gpa, len) buffers after their first n bytes (a request's header, the part
    a request filled)."""
    out = []
    for gpa, length in parts:
        if n >= length:
            n -= length
            continue
        out.append((gpa + n, length - n))
        n = 0
    return out


def _region(entry: Sequence[int]) -> Region:
    """One [gpa, size, memfd_offset] entry, every field a page-aligned int."""
    if len(entry) != 3 or not all(type(v) is int for v in entry):
        raise GuestRamError(f"guest RAM range {entry!r} is not [gpa, size, memfd_offset]")
    gpa, size, offset = entry
    if size <= 0 or gpa < 0 or offset < 0 or gpa + size > GPA_LIMIT:
        raise GuestRamError(f"guest RAM range {entry!r} is empty, negative or past 2^64")
    if (gpa | size | offset) % PAGE_SIZE:
        raise GuestRamError(f"guest RAM range {entry!r} is not page aligned")
    return Region(gpa, size, offset)


def _regions(ranges: Sequence[Sequence[int]], ram_size: int) -> list[Region]:
    """The ranges, checked (sorted, disjoint in gpa and in the memfd, inside the memfd), with
    neighbours contiguous in both gpa and memfd merged into one: an access may span those."""
    regions = [_region(e) for e in ranges]
    if not regions:
        raise GuestRamError("guest RAM has no range")
    for prev, cur in zip(regions, regions[1:], strict=False):
        if cur.gpa < prev.gpa + prev.size:
            raise GuestRamError(f"guest RAM range at gpa {cur.gpa:#x} is unsorted or overlaps")
    by_offset = sorted(regions, key=lambda r: r.offset)
    for prev, cur in zip(by_offset, by_offset[1:], strict=False):
        if cur.offset < prev.offset + prev.size:
            raise GuestRamError(f"guest RAM range at gpa {cur.gpa:#x} aliases memfd pages")
    if by_offset[-1].offset + by_offset[-1].size > ram_size:
        raise GuestRamError(f"guest RAM ranges reach past the memfd's {ram_size:#x} bytes")
    merged = [regions[0]]
    for r in regions[1:]:
        last = merged[-1]
        if r.gpa == last.gpa + last.size and r.offset == last.offset + last.size:
            merged[-1] = Region(last.gpa, last.size + r.size, last.offset)
        else:
            merged.append(r)
    return merged


def _hit_of(r: Region) -> tuple[int, int, int]:
    """(gpa start, gpa end, memfd offset - gpa) of a range: what offset() compares a
    look-up with, and adds to its gpa."""
    return r.gpa, r.gpa + r.size, r.offset - r.gpa


class GuestRam:
    """Guest RAM by guest-physical address, with the device's writes in the dirty bitmap."""

    def __init__(self, ram: Buffer, dirty: Buffer, ranges: Sequence[Sequence[int]]) -> None:
        """Use map() (a device process) or from_buffers() (tests)."""
        self._regions = _regions(ranges, len(ram))
        half = len(dirty) // 2  # the live bitmap, then the harvest (the module docstring)
        if half < bitmap_size(len(ram)):
            raise GuestRamError(
                f"dirty bitmap memfd of {len(dirty)} bytes holds no two bitmaps of the "
                f"{bitmap_size(len(ram))} bytes that {len(ram)} bytes of RAM need"
            )
        self._starts = [r.gpa for r in self._regions]
        # the range offset() found last: a device's buffers are mostly in one range, so most
        # look-ups end at one comparison
        self._hit = _hit_of(self._regions[0])
        self._buffers = (ram, dirty)
        self._ram = memoryview(ram)
        self._log = memoryview(dirty)
        self._dirty, self._harvest = self._log[:half], self._log[half : 2 * half]

    @classmethod
    def map(cls, ram_fd: int, dirty_fd: int, ranges: Sequence[Sequence[int]]) -> GuestRam:
        """Map the RAM memfd and the dirty bitmap memfd handed to this device process."""
        maps: list[mmap.mmap] = []
        try:
            for fd in (ram_fd, dirty_fd):
                size = os.fstat(fd).st_size
                if size == 0:
                    raise GuestRamError(f"fd {fd} (guest RAM or dirty bitmap) is empty")
                maps.append(map_shared_fd(fd, size))  # keeps no fd for the sandbox to close
                maps[-1].madvise(mmap.MADV_DONTDUMP)  # before its sandbox, a device may dump
            return cls(maps[0], maps[1], ranges)
        except BaseException:
            for m in maps:
                m.close()
            raise

    @classmethod
    def from_buffers(
        cls, ram: bytearray, dirty: bytearray, ranges: Sequence[Sequence[int]]
    ) -> GuestRam:
        """Guest RAM over plain bytearrays (a fake guest memory for tests)."""
        return cls(ram, dirty, ranges)

    @property
    def ranges(self) -> tuple[Region, ...]:
        """The RAM ranges, sorted by gpa, neighbours contiguous in gpa and memfd merged."""
        return tuple(self._regions)

    def offset(self, gpa: int, size: int) -> int:
        """The memfd offset of [gpa, gpa + size), which must lie in one RAM range."""
        start, end, delta = self._hit
        if start <= gpa and 0 <= size and gpa + size <= end:
            return gpa + delta
        if gpa >= 0 and size >= 0:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i >= 0:
                r = self._regions[i]
                if gpa + size <= r.gpa + r.size:
                    self._hit = _hit_of(r)
                    return r.offset + gpa - r.gpa
        raise GuestRamError(f"guest range {gpa:#x}+{size:#x} is not RAM")

    def last_range(self) -> tuple[int, int]:
        """[start, end) of the RAM range the last look-up hit: an access inside it is RAM
        (a caller checking many buffers compares against it, and calls offset() for the
        rest, which looks them up in every range). Callers rely on it for their bounds
        checks: _hit only ever holds one whole range of self._regions, which never change."""
        start, end, _ = self._hit
        return start, end

    def check(self, gpa: int, size: int) -> None:
        self.offset(gpa, size)

    def read(self, gpa: int, size: int) -> bytes:
        off = self.offset(gpa, size)
        return bytes(self._ram[off : off + size])

    def write(self, gpa: int, data: bytes) -> None:
        off = self.offset(gpa, len(data))
        self._ram[off : off + len(data)] = data
        self._mark_dirty(
            off, len(data)
        )  # after the data: a snapshot that saw it clear copies later

    def buffer(self, gpa: int, size: int, writable: bool) -> memoryview:
        """A zero-copy view of guest RAM (for preadv/pwritev); writable=True marks its pages
        dirty now, before the data lands: a snapshot's quiesce() finishes in-flight requests
        before the monitor reads the bitmap. Release the view before close()."""
        off = self.offset(gpa, size)
        view = self._ram[off : off + size]
        if not writable:
            return view.toreadonly()
        self._mark_dirty(off, size)
        return view

    def iovecs(self, parts: Sequence[tuple[int, int]], writable: bool) -> list[memoryview]:
        """Views of a chain's (gpa, len) buffers, in order, for os.preadv/os.pwritev."""
        views = []
        for gpa, size in parts:  # (not a comprehension: in 3.11 that is a function call)
            views.append(self.buffer(gpa, size, writable))
        return views

    def gather(self, parts: Sequence[tuple[int, int]], size: int) -> bytes:
        """The first `size` bytes of a chain's (gpa, len) buffers (fewer if they are shorter)."""
        out = b""
        for gpa, length in parts:
            out += self.read(gpa, min(length, size - len(out)))
            if len(out) == size:
                break
        return out

    def scatter(
        self, parts: Sequence[tuple[int, int]], offset: int, data: bytes | memoryview
    ) -> int:
        """Write `data` at `offset` into a chain's (gpa, len) buffers, as far as they reach;
        the bytes written."""
        done = 0
        for gpa, length in parts:
            if offset >= length:
                offset -= length
                continue
            chunk = bytes(data[done : done + length - offset])
            self.write(gpa + offset, chunk)
            done += len(chunk)
            offset = 0
            if done == len(data):
                break
        return done

    def window(self, gpa: int, size: int) -> RamWindow:
        """[gpa, gpa + size), checked once, for a part read and written over and over (a
        ring): the caller indexes it by offset into the part. Its view holds the mapping:
        a GuestRam with windows out is never close()d (a device's RAM lives as long as it)."""
        return RamWindow(self, self.offset(gpa, size), size)

    def unpack(self, layout: struct.Struct, gpa: int) -> tuple[Any, ...]:
        """`layout` read at gpa in place (no copy of the bytes first)."""
        return layout.unpack_from(self._ram, self.offset(gpa, layout.size))

    def u16(self, gpa: int) -> int:
        return int(self.unpack(U16, gpa)[0])

    def u32(self, gpa: int) -> int:
        return int(self.unpack(U32, gpa)[0])

    def u64(self, gpa: int) -> int:
        return int(self.unpack(U64, gpa)[0])

    def write_u8(self, gpa: int, value: int) -> None:
        off = self.offset(gpa, 1)
        self._ram[off] = value
        self._mark_dirty(off, 1)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, U16.pack(value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, U32.pack(value))

    def harvest_dirty(self) -> None:
        """Move every mark into the harvest and clear the live bitmap (a live snapshot's pass
        begins: monitor/dirtylog.py). On the thread that marks, with no buffer() view being
        written: none of its marks is lost. Added to what the harvest holds: one the monitor
        has not read yet (it did not wait for our answer) keeps its marks."""
        marks = int.from_bytes(self._dirty, "little")
        if not marks:
            return
        held = int.from_bytes(self._harvest, "little")
        self._harvest[:] = (held | marks).to_bytes(len(self._harvest), "little")
        self._dirty[:] = bytes(len(self._dirty))

    def _mark_dirty(self, off: int, size: int) -> None:
        """Set the bits of memfd pages [off, off + size) (protocol/dirtybits.py)."""
        if size == 0:
            return
        first, last = off >> PAGE_SHIFT, (off + size - 1) >> PAGE_SHIFT
        if first == last:  # a ring field, a status byte: one bit
            self._dirty[first >> 3] |= 1 << (first & 7)
            return
        mark_pages(self._dirty, first, last - first + 1)

    def close(self) -> None:
        """Unmap (a mapped GuestRam); every view from buffer() must be released first."""
        self._ram.release()
        for view in (self._dirty, self._harvest, self._log):
            view.release()
        for buf in self._buffers:
            if isinstance(buf, mmap.mmap):
                buf.close()


class RamWindow:
    """A part of guest RAM checked once (GuestRam.window), read in place through `view` (it
    covers exactly the part: struct.unpack_from at an offset into it stays inside it or
    raises) and written through write(), which marks the dirty log; or stored to through
    `view` by slice assignment, a few fields at once, then mark() for them all.

    Never struct.pack_into a field the guest may be reading: it zeroes the field's bytes
    before it stores the value (CPython's s_pack_internal memsets first), so a driver
    polling a used idx sees 0 now and then (measured: 6% of reads against a writer in a
    loop), takes the ring for 65536 entries ahead and reads stale ones. A slice assignment
    of packed bytes is one memcpy: the field changes from old to new in one store."""

    __slots__ = ("_ram", "_offset", "view")

    def __init__(self, ram: GuestRam, offset: int, size: int) -> None:
        self._ram = ram
        self._offset = offset
        self.view = ram._ram[offset : offset + size]

    def write(self, at: int, data: bytes) -> None:
        """`data` at offset `at` of the part, then its pages marked dirty."""
        self.view[at : at + len(data)] = data
        self._ram._mark_dirty(self._offset + at, len(data))

    def mark(self) -> None:
        """Every page of the part marked dirty: after stores through `view` (a few fields
        stored, one mark for them all)."""
        self._ram._mark_dirty(self._offset, len(self.view))
