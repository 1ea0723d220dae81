"""Guest RAM mappings: the gpa view both sides share, and host addresses for KVM memory
slots (an hva never leaves native/)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence

from splitvmm.errors import SplitvmmError
from splitvmm.native._kvm import ffi
from splitvmm.record import Struct


def map_shared_page(fd: int, size: int) -> memoryview:
    """The first `size` bytes of `fd`, mapped shared and writable for the process's life
    (never unmapped), as unsigned bytes.

    Not CPython's mmap.mmap: it keeps a dup of the fd, which a device's sandbox closes and
    its channel's socket then reuses, and its finalizer (at the interpreter's exit) closes
    that number and unmaps the pages: with the progress page so mapped, a virtio-blk device
    that ended through Python's own teardown (its policy audit's malformed frame) died of
    SIGSEGV, one run in three under load. A plain mmap(2) keeps no fd."""
    there = os.fstat(fd).st_size
    if not 0 < size <= there:
        raise ValueError(f"fd {fd}: {size} bytes to map, {there} there")
    address = _libc_mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of fd {fd}: {os.strerror(err)}")
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


def map_shared_fd(fd: int, size: int) -> mmap.mmap:
    """The first `size` bytes of `fd`, mapped shared and writable, as a CPython mmap that
    keeps no fd (as map_shared_page, but one that close() unmaps, and that refuses to while a
    view of it is held): a mapping of no file is made, then its pages replaced in place by
    the fd's (MAP_FIXED). Guest RAM in a device process: its sandbox closes every fd it was
    not handed, and the dup a plain mmap.mmap(fd) keeps would be closed a second time, under
    whatever took its number since (its channel's socket), when the mapping goes at the exit."""
    # Shared, as the pages that replace it: a private writable placeholder is private memory
    # to RLIMIT_DATA, which then refused a guest's RAM larger than the limit
    mapping = mmap.mmap(-1, size, mmap.MAP_SHARED | _MAP_NORESERVE)
    address = mapping_address(mapping)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if _libc_mmap(address, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) != address:
        err = ctypes.get_errno()
        mapping.close()
        raise OSError(err, f"mmap of fd {fd}: {os.strerror(err)}")
    return mapping


_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # <linux/mman.h> (CPython's mmap lacks them)
_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
_libc_mmap.restype = ctypes.c_void_p
_libc_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_MAP_FAILED = ctypes.c_void_p(-1).value


def mapping_address(mapping: mmap.mmap, offset: int = 0) -> int:
    """The host virtual address of `mapping[offset]`.

    SAFETY: the address is only valid while `mapping` stays open; callers hand it
    to KVM for a memory slot whose lifetime is bounded by the mapping's owner
    (GuestMemory closes the mapping only after the VM fd is closed).
    """
    buf = ffi.from_buffer(mapping)
    return int(ffi.cast("uintptr_t", buf)) + offset


class GuestMemoryError(SplitvmmError):
    """An access to a guest-physical range that is not (all) RAM."""


class Region(Struct, frozen=True):
    gpa: int  # guest-physical start
    size: int
    offset: int  # offset in the RAM memfd (and its mapping)


class GuestMemoryView:
    """Guest RAM by guest-physical address, over one mapping of the RAM memfd.

    The one view the monitor (loader, fault reports, snapshots) and device processes
    (virtqueues, which map the memfd themselves) share. Every access must lie inside one
    region: a guest-supplied address and length never reach outside the mapping, and an
    access that straddles the PCI hole is refused rather than split.
    """

    def __init__(self, mapping: mmap.mmap, regions: Sequence[Region]) -> None:
        end = 0
        for r in sorted(regions, key=lambda r: r.gpa):
            if r.size <= 0 or r.gpa < end or r.offset < 0 or r.offset + r.size > len(mapping):
                raise GuestMemoryError(f"guest RAM region {r} does not fit the mapping")
            end = r.gpa + r.size
        # Guest RAM never goes into a core file (QEMU's dump-guest-core=off): the monitor is
        # made non-dumpable only when it confines itself, after a restore or a boot filled it.
        mapping.madvise(mmap.MADV_DONTDUMP)
        self.map = mapping
        self.regions: tuple[Region, ...] = tuple(regions)

    @classmethod
    def map_fd(cls, fd: int, regions: Sequence[Region]) -> GuestMemoryView:
        """Map a RAM memfd handed to us (a device process) and view it by gpa."""
        size = os.fstat(fd).st_size
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            return cls(mapping, regions)
        except GuestMemoryError:
            mapping.close()
            raise

    def locate(self, gpa: int, length: int) -> int:
        """The mapping offset of [gpa, gpa+length), which must lie in one region."""
        if gpa >= 0 and length >= 0:
            for r in self.regions:
                if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                    return r.offset + gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def read(self, gpa: int, length: int) -> bytes:
        off = self.locate(gpa, length)
        return self.map[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        off = self.locate(gpa, len(data))
        self.map[off : off + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window (for preadv/pwritev into guest buffers); release it before
        close()."""
        off = self.locate(gpa, length)
        return memoryview(self.map)[off : off + length]

    def close(self) -> None:
        self.map.close()
