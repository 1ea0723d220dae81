"""GuestMemoryView (native/mem.py): the gpa view of guest RAM the monitor and devices share."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from splitvmm.monitor.memory import GuestMemory
from splitvmm.native.mem import GuestMemoryError, GuestMemoryView, Region, map_shared_page

PAGE = 4096
# RAM in two regions with a hole between them, as around the PCI hole
REGIONS = (Region(0, 2 * PAGE, 0), Region(8 * PAGE, PAGE, 2 * PAGE))


@pytest.fixture
def view():
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 3 * PAGE)
    v = GuestMemoryView.map_fd(fd, REGIONS)
    yield v
    v.close()
    os.close(fd)


def test_guestmem_write_then_read_in_second_region_lands_at_its_offset(view):
    view.write(8 * PAGE + 5, b"abc")

    assert view.read(8 * PAGE + 5, 3) == b"abc"
    assert view.map[2 * PAGE + 5 : 2 * PAGE + 8] == b"abc"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (2 * PAGE - 1, 2),  # runs off the first region into the hole
        (4 * PAGE, 1),  # in the hole
        (9 * PAGE - 1, 2),  # past the end of RAM
        (-1, 1),  # a negative address
        (0, -1),  # a negative length
        (2**64 - 1, 2),  # wraps around 64 bits
    ],
)
def test_guestmem_access_outside_one_region_refused(view, gpa, length):
    with pytest.raises(GuestMemoryError, match="is not RAM"):
        view.read(gpa, length)


def test_guestmem_view_is_zero_copy(view):
    window = view.view(PAGE, 4)
    window[:] = b"wxyz"
    window.release()

    assert view.read(PAGE, 4) == b"wxyz"


@pytest.mark.parametrize(
    "regions",
    [
        (Region(0, 4 * PAGE, 0),),  # larger than the memfd
        (Region(0, PAGE, 0), Region(PAGE // 2, PAGE, PAGE)),  # overlapping gpa ranges
        (Region(0, 0, 0),),  # empty
        (Region(0, PAGE, -PAGE),),  # before the mapping
    ],
)
def test_guestmem_regions_that_do_not_fit_refused(regions):
    mapping = mmap.mmap(-1, 3 * PAGE)
    try:
        with pytest.raises(GuestMemoryError, match="does not fit"):
            GuestMemoryView(mapping, regions)
    finally:
        mapping.close()


def test_guest_ram_mapping_is_left_out_of_core_files():
    """A crash of the monitor before it confines itself (while a restore fills RAM, say)
    dumps no guest RAM: the kernel marks the mapping VM_DONTDUMP ('dd' in smaps)."""
    ram = GuestMemory(1 << 20, name="dontdump-test")
    try:
        smaps = open("/proc/self/smaps").read().split("\n")
        at = next(i for i, line in enumerate(smaps) if "memfd:dontdump-test" in line)
        flags = next(line for line in smaps[at:] if line.startswith("VmFlags:"))
    finally:
        ram.map.close()
        os.close(ram.fd)
    assert " dd" in flags, flags


# Spelled out here, not taken from memory.SEALS: the constant is what is under test.
RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def test_guest_ram_memfd_is_sealed_so_no_device_can_resize_it():
    """Every virtio device holds this memfd: shrunk, the monitor's own mapping would SIGBUS.
    The escape suite's ftruncate attempt runs on a memfd the suite sealed itself, so this is
    the one test that sees the monitor's seals."""
    ram = GuestMemory(1 << 20)

    seals = fcntl.fcntl(ram.fd, fcntl.F_GET_SEALS)
    with pytest.raises(PermissionError):
        os.ftruncate(ram.fd, 4096)
    ram.close()

    assert seals & RAM_SEALS == RAM_SEALS


def test_shared_page_needs_no_fd_once_mapped():
    """map_shared_page keeps no dup of the fd (CPython's mmap does, and closes it at exit):
    the fd closed, the mapping still reaches the memfd's pages."""
    fd = os.memfd_create("page")
    os.ftruncate(fd, 4096)
    reader = os.dup(fd)
    open_before = len(os.listdir("/proc/self/fd"))
    page = map_shared_page(fd, 65)
    assert len(os.listdir("/proc/self/fd")) == open_before  # no fd of its own
    os.close(fd)
    page[64] = 1
    try:
        assert (len(page), os.pread(reader, 1, 64)) == (65, b"\x01")
    finally:
        os.close(reader)


def test_shared_page_past_the_fds_end_is_refused():
    fd = os.memfd_create("page")
    try:
        with pytest.raises(ValueError, match="8192 bytes to map, 4096 there"):
            os.ftruncate(fd, 4096)
            map_shared_page(fd, 8192)
    finally:
        os.close(fd)
