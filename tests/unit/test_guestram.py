"""GuestRam (devprocs/virtio/guestram.py): guest RAM in a device process, with its dirty log."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

from splitvmm.devprocs.virtio.guestram import GuestRam, GuestRamError
from splitvmm.protocol.dirtybits import PAGE_SIZE, bitmap_size

PAGE = PAGE_SIZE
GIB = 1 << 30
# Two ranges with a hole between them: gpa [0, 2 pages) at memfd 0, [8, 9 pages) at memfd 2
RANGES = [[0, 2 * PAGE, 0], [8 * PAGE, PAGE, 2 * PAGE]]


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam.from_buffers(bytearray(3 * PAGE), bytearray(PAGE), RANGES)


@pytest.fixture
def memfd() -> Iterator[Callable[[int], int]]:
    """Makes memfds of a given size, closed after the test."""
    fds: list[int] = []

    def make(size: int) -> int:
        fds.append(os.memfd_create("test-guestram", os.MFD_CLOEXEC))
        os.ftruncate(fds[-1], size)
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


def test_guestram_write_in_second_range_lands_at_its_memfd_offset():
    backing = bytearray(3 * PAGE)
    ram = GuestRam.from_buffers(backing, bytearray(PAGE), RANGES)

    ram.write(8 * PAGE + 5, b"abc")

    assert backing[2 * PAGE + 5 : 2 * PAGE + 8] == b"abc"
    assert ram.read(8 * PAGE + 5, 3) == b"abc"


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (2 * PAGE - 1, 2),  # runs off the first range into the hole
        (4 * PAGE, 1),  # in the hole
        (9 * PAGE - 1, 2),  # past the end of RAM
        (9 * PAGE, 1),  # just past the end
        (-1, 1),  # a negative address
        (0, -1),  # a negative length
        (2**64 - 1, 2),  # wraps around 64 bits
        (2 * PAGE - 4, 8 * PAGE),  # spans the hole
    ],
)
def test_guestram_access_outside_one_range_raises(ram, gpa, size):
    with pytest.raises(GuestRamError, match="is not RAM"):
        ram.check(gpa, size)


def test_guestram_access_at_last_byte_of_range_is_allowed(ram):
    ram.write(9 * PAGE - 1, b"z")

    assert ram.read(9 * PAGE - 1, 1) == b"z"


def test_guestram_integers_are_little_endian(ram):
    ram.write(0x10, bytes(range(1, 9)))

    assert (ram.u16(0x10), ram.u32(0x10), ram.u64(0x10)) == (
        0x0201,
        0x04030201,
        0x0807060504030201,
    )


def test_guestram_integer_write_reads_back(ram):
    ram.write_u16(0x20, 0xBEEF)
    ram.write_u32(0x24, 0xDEADBEEF)

    assert ram.read(0x20, 8) == b"\xef\xbe\x00\x00\xef\xbe\xad\xde"


def test_guestram_integer_read_across_range_end_raises(ram):
    with pytest.raises(GuestRamError, match="0x2ffe\\+0x4 is not RAM"):
        ram.u32(3 * PAGE - 2)


def test_guestram_write_marks_the_memfd_page_dirty():
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)

    ram.write(8 * PAGE + 7, b"x")  # memfd page 2

    assert dirty[0] == 0b100


def test_guestram_read_marks_nothing_dirty():
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)

    ram.read(0, 2 * PAGE)
    ram.buffer(0, 2 * PAGE, writable=False)

    assert dirty == bytearray(PAGE)


def test_guestram_write_across_page_boundary_marks_both_pages():
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)

    ram.write(PAGE - 1, b"ab")

    assert dirty[0] == 0b11


def test_guestram_dirty_marks_keep_bits_already_set():
    dirty = bytearray(PAGE)
    dirty[0] = 0b1000_0000
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)

    ram.write(0, b"a")

    assert dirty[0] == 0b1000_0001


def test_guestram_empty_write_marks_nothing():
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)

    ram.write(PAGE, b"")

    assert dirty == bytearray(PAGE)


def test_guestram_writable_buffer_of_1mib_marks_exactly_its_pages():
    size = 4 << 20
    dirty = bytearray(2 * bitmap_size(size))  # its live bitmap, then its harvest
    ram = GuestRam.from_buffers(bytearray(size), dirty, [[0, size, 0]])

    view = ram.buffer(3 * PAGE, (1 << 20) + 1, writable=True)  # pages 3..259

    assert len(view) == (1 << 20) + 1
    expected = {n for n in range(len(dirty) * 8) if dirty[n // 8] >> (n % 8) & 1}
    assert expected == set(range(3, 260))


def test_guestram_writable_buffer_writes_through_to_guest_memory(ram):
    view = ram.buffer(8 * PAGE, 4, writable=True)
    view[:] = b"wxyz"

    assert ram.read(8 * PAGE, 4) == b"wxyz"


def test_guestram_readonly_buffer_refuses_writes(ram):
    view = ram.buffer(0, 4, writable=False)

    with pytest.raises(TypeError):
        view[0] = 1


def test_guestram_iovecs_are_views_in_chain_order(ram):
    ram.write(0x100, b"hello")
    ram.write(8 * PAGE, b"world")

    views = ram.iovecs([(8 * PAGE, 5), (0x100, 5)], writable=False)

    assert [bytes(v) for v in views] == [b"world", b"hello"]


def test_guestram_iovecs_outside_ram_raises(ram):
    with pytest.raises(GuestRamError, match="0x4000\\+0x1 is not RAM"):
        ram.iovecs([(0, 1), (4 * PAGE, 1)], writable=True)


def test_guestram_ranges_contiguous_in_gpa_and_memfd_merge():
    ram = GuestRam.from_buffers(
        bytearray(2 * PAGE), bytearray(PAGE), [[0, PAGE, 0], [PAGE, PAGE, PAGE]]
    )

    ram.write(PAGE - 2, b"abcd")

    assert ram.read(PAGE - 2, 4) == b"abcd"


def test_guestram_ranges_contiguous_in_gpa_only_do_not_merge():
    ram = GuestRam.from_buffers(
        bytearray(3 * PAGE), bytearray(PAGE), [[0, PAGE, 0], [PAGE, PAGE, 2 * PAGE]]
    )

    with pytest.raises(GuestRamError, match="is not RAM"):
        ram.write(PAGE - 2, b"abcd")


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        ([], "has no range"),
        ([[0, PAGE]], "is not \\[gpa, size, memfd_offset\\]"),
        ([[0, PAGE, True]], "is not \\[gpa, size, memfd_offset\\]"),
        ([[0, 0, 0]], "empty, negative"),
        ([[-PAGE, PAGE, 0]], "empty, negative"),
        ([[2**64 - PAGE, 2 * PAGE, 0]], "past 2\\^64"),
        ([[0x800, PAGE, 0]], "not page aligned"),
        ([[0, 0x800, 0]], "not page aligned"),
        ([[0, PAGE, 0x800]], "not page aligned"),
        ([[4 * PAGE, PAGE, 0], [0, PAGE, PAGE]], "unsorted or overlaps"),
        ([[0, 2 * PAGE, 0], [PAGE, PAGE, 2 * PAGE]], "unsorted or overlaps"),
        ([[0, 2 * PAGE, 0], [4 * PAGE, PAGE, PAGE]], "aliases memfd pages"),
        ([[0, 4 * PAGE, 0]], "past the memfd"),
        ([[0, PAGE, 3 * PAGE]], "past the memfd"),
    ],
)
def test_guestram_bad_ranges_raise(ranges, match):
    with pytest.raises(GuestRamError, match=match):
        GuestRam.from_buffers(bytearray(3 * PAGE), bytearray(PAGE), ranges)


@pytest.mark.parametrize("size", [1, 2, 3])  # 9 pages need 2 bytes a bitmap, and two bitmaps
def test_guestram_short_dirty_bitmap_raises(size):
    with pytest.raises(GuestRamError, match=f"memfd of {size} bytes holds no two bitmaps of the 2"):
        GuestRam.from_buffers(bytearray(9 * PAGE), bytearray(size), [[0, 9 * PAGE, 0]])


def test_guestram_harvest_moves_the_marks_into_the_second_half_and_clears_the_first():
    """harvest_dirty (a live snapshot's pass begins: monitor/dirtylog.py): what the device
    wrote so far is the monitor's to read in the harvest; its next writes are marked anew."""
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)
    ram.write(8 * PAGE, b"x")  # memfd page 2

    ram.harvest_dirty()
    ram.write(0, b"y")  # memfd page 0

    assert (dirty[0], dirty[PAGE // 2]) == (0b1, 0b100)


def test_guestram_harvest_adds_to_marks_the_monitor_has_not_read():
    """A harvest the monitor did not wait for (the device answered late) is read with the
    next one, or in the pause: the next harvest keeps what it holds."""
    dirty = bytearray(PAGE)
    ram = GuestRam.from_buffers(bytearray(3 * PAGE), dirty, RANGES)
    ram.write(8 * PAGE, b"x")  # memfd page 2
    ram.harvest_dirty()
    ram.write(0, b"y")  # memfd page 0

    ram.harvest_dirty()

    assert (dirty[0], dirty[PAGE // 2]) == (0, 0b101)


def test_guestram_map_reads_and_writes_the_memfd(memfd):
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(PAGE)
    ram = GuestRam.map(ram_fd, dirty_fd, RANGES)

    ram.write(8 * PAGE + 1, b"hi")
    ram.close()

    assert os.pread(ram_fd, 2, 2 * PAGE + 1) == b"hi"
    assert os.pread(dirty_fd, 1, 0) == b"\x04"


def test_guestram_map_sees_writes_by_another_mapping(memfd):
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(PAGE)
    ram = GuestRam.map(ram_fd, dirty_fd, RANGES)

    os.pwrite(ram_fd, b"\x34\x12", 0x10)

    assert ram.u16(0x10) == 0x1234
    ram.close()


def test_guestram_map_split_around_the_pci_hole(memfd):
    # RAM as the PC layout gives 4 GiB + 64 KiB: [0, 3 GiB) and [4 GiB, +64 KiB) after it in
    # the memfd; sparse, so only the pages touched cost memory.
    size = 3 * GIB + 16 * PAGE
    ram_fd, dirty_fd = memfd(size), memfd(2 * -(-bitmap_size(size) // PAGE) * PAGE)
    ram = GuestRam.map(ram_fd, dirty_fd, [[0, 3 * GIB, 0], [4 * GIB, 16 * PAGE, 3 * GIB]])

    ram.write(4 * GIB, b"high")

    assert os.pread(ram_fd, 4, 3 * GIB) == b"high"
    page = (3 * GIB) // PAGE
    assert os.pread(dirty_fd, 1, page // 8) == bytes([1 << (page % 8)])
    with pytest.raises(GuestRamError, match="is not RAM"):
        ram.check(3 * GIB - 2, 4)
    with pytest.raises(GuestRamError, match="is not RAM"):
        ram.check(3 * GIB, 1)
    ram.close()


def test_guestram_map_ranges_past_the_memfd_raise(memfd):
    ram_fd, dirty_fd = memfd(2 * PAGE), memfd(PAGE)

    with pytest.raises(GuestRamError, match="past the memfd's 0x2000 bytes"):
        GuestRam.map(ram_fd, dirty_fd, RANGES)


def test_guestram_map_empty_dirty_fd_raises(memfd):
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(0)

    with pytest.raises(GuestRamError, match="is empty"):
        GuestRam.map(ram_fd, dirty_fd, RANGES)


def test_guestram_close_with_a_view_held_raises_buffererror(memfd):
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(PAGE)
    ram = GuestRam.map(ram_fd, dirty_fd, RANGES)
    view = ram.buffer(0, 4, writable=True)

    with pytest.raises(BufferError):
        ram.close()
    view.release()
    ram.close()


def open_fds() -> set[int]:
    """The fds open now (fcntl on each: no fd of its own, as listing /proc/self/fd has)."""
    found = set()
    for fd in range(1024):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        found.add(fd)
    return found


def test_guestram_map_holds_no_fd_of_its_own(memfd):
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(PAGE)
    before = open_fds()

    ram = GuestRam.map(ram_fd, dirty_fd, RANGES)
    try:
        assert open_fds() == before
    finally:
        ram.close()


def test_guestram_going_closes_no_fd_that_took_a_number_the_sandbox_freed(memfd):
    """The sandbox closes what the device was not handed; the fds the device opens after it
    take the lowest numbers free. A mapping that kept a dup of the fd closed that number
    again when it went (close(), or the interpreter's teardown at the device's exit):
    another's fd, as the progress page's mapping did before 9beeba8 (a libzmq then aborted
    on it)."""
    ram_fd, dirty_fd = memfd(3 * PAGE), memfd(PAGE)
    before = open_fds()
    ram = GuestRam.map(ram_fd, dirty_fd, RANGES)
    for fd in sorted(open_fds() - before):  # the sandbox's _close_fds_except
        os.close(fd)
    pipes = [os.pipe() for _ in range(2)]  # later fds: the numbers just freed
    try:
        ram.write(8 * PAGE, b"still mapped")
        assert os.pread(ram_fd, 12, 2 * PAGE) == b"still mapped"

        ram.close()

        for fd in (fd for pipe in pipes for fd in pipe):
            fcntl.fcntl(fd, fcntl.F_GETFD)  # EBADF if GuestRam closed another's fd
    finally:
        for pipe in pipes:
            for fd in pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass


def test_guestram_map_is_not_counted_as_private_memory():
    """Guest RAM is a shared mapping of the monitor's memfd: RLIMIT_DATA (`ulimit -d`,
    systemd's LimitDATA=) never counted it, and a device under a limit smaller than its
    guest's RAM mapped it as before e2ff35a. Its placeholder, private and writable, is
    counted (and committed whole under vm.overcommit_memory = 2, which ignores
    MAP_NORESERVE): the device's set-up then fails with ENOMEM."""
    code = textwrap.dedent(
        f"""
        import os, resource
        from splitvmm.devprocs.virtio.guestram import GuestRam
        ram, dirty = (os.memfd_create("r11") for _ in range(2))
        os.ftruncate(ram, {1 << 30}); os.ftruncate(dirty, 65536)
        resource.setrlimit(resource.RLIMIT_DATA, (512 << 20, resource.RLIM_INFINITY))
        GuestRam.map(ram, dirty, [[0, {1 << 30}, 0]]).close()
        print("mapped")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "mapped"), done.stderr[-600:]
