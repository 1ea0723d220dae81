"""Guest RAM chunk, encodings sparse-v1 and sparse-v2: only the pages that hold data, each
with its offset.

Why a self-describing extent stream rather than a sparse file restored with SEEK_DATA: holes
belong to the file system, not to the file's bytes. cp, tar, scp and object stores fill them
in, some file systems have none, and a checksum over a sparse file reads every hole (64 GiB of
zeros for an idle 64 GiB guest). The stream's size and checksum cost what the data costs, it
survives any copy, and the reader bound-checks every extent before it touches guest memory.

Layout, little endian:
  header   magic b"SVMMRAM\\0", version u32 (1: sparse-v1, 2: sparse-v2), page_size u32
           (4096), memory_size u64, reserved u64 (0)
  records  offset u64, length u64, then `length` bytes of data. Offsets ascend, extents are
           page aligned, non-empty, do not overlap and lie inside memory_size.
  pass     sparse-v2 only, at most MAX_PASSES - 1 times: offset u64 = 2^64 - 2, length u64 = 0.
           The records after it ascend again from 0 and replace what the ones before it said
           of their pages (they may hold zeros).
  end      offset u64 = 2^64 - 1, length u64 = total data bytes; nothing may follow.

sparse-v2 is a live snapshot's (monitor/dirtylog.py): the first pass is copied while the VM
runs, then, while what it wrote meanwhile shrinks, a pass or two more of just that, still
running; the last pass once it is paused, holding the pages written since the pass before. A
paused VM's RAM is written in one pass, as sparse-v1, which every release reads.

Each record carries its own data (no table up front), so the writer makes one pass over the
memory (each pass of sparse-v2 is one such) and neither side ever allocates a table whose size
the file chooses. The count needs
no separate cap: ascending, non-overlapping, page-aligned extents inside memory_size number at
most memory_size / 8 KiB a pass.

The data comes from the memfd's data extents (lseek SEEK_DATA/SEEK_HOLE): pages the guest
never touched are holes and cost nothing. All-zero pages among the data (touched, or freed and
zeroed by the guest) are skipped too, so restoring them leaves holes in the new memfd. A later
pass of sparse-v2 skips a written page that is all zeros where no record before it holds the
page (the restored memory has zeros there already: a page the guest allocated, which it
zeroes, and had not filled yet); one that a record holds, now zeroed, is recorded, zeros and
all.

The checksum is taken in the same pass as the data moves, on a helper thread that hashes one
piece while the next is written or copied (digest.Overlapped): a restore checks what landed in
guest memory, at the cost of the copy alone.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Final, Protocol

from splitvmm.protocol.dirtybits import bitmap_size, mark_pages, page_runs
from splitvmm.record import Struct
from splitvmm.snapshot import digest
from splitvmm.snapshot.format import PAGE_SIZE, RamEncoding, SnapshotError

MAGIC = b"SVMMRAM\0"
VERSION = 1
ENCODING: Final[RamEncoding] = "sparse-v1"
PRECOPY_VERSION = 2
PRECOPY_ENCODING: Final[RamEncoding] = "sparse-v2"
VERSIONS: Final[dict[str, int]] = {ENCODING: VERSION, PRECOPY_ENCODING: PRECOPY_VERSION}
HEADER = struct.Struct("<8sIIQQ")  # magic, version, page_size, memory_size, reserved
RECORD = struct.Struct("<QQ")  # offset, length
END_OFFSET = (1 << 64) - 1
PASS_OFFSET = (1 << 64) - 2  # sparse-v2: a pass ends, the next replaces its pages
# sparse-v2: the first pass, up to two more made while the VM runs, the last once it is stopped
MAX_PASSES = 4
ZERO_PAGE = bytes(PAGE_SIZE)
PIECE = 8 << 20  # bytes per write/read/progress step: big syscalls, a responsive progress bar

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class RegionLike(Protocol):
    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def offset(self) -> int: ...


class MemoryLayoutLike(Protocol):
    """What the manifest records about guest memory (GuestMemory has it)."""

    @property
    def size(self) -> int: ...
    @property
    def regions(self) -> Sequence[RegionLike]: ...


class RamLike(MemoryLayoutLike, Protocol):
    """GuestMemory as the snapshot code uses it: one memfd and a shared read/write mapping."""

    @property
    def fd(self) -> int: ...
    @property
    def map(self) -> mmap.mmap: ...


class RamStats(Struct, frozen=True):
    extents: int
    data_bytes: int
    file_bytes: int
    digest: str  # hex, of digest.WRITE_ALGORITHM


# --- finding the data --------------------------------------------------------------------------


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the memfd's data, page aligned. Uses only lseek: reading a hole through
    a shared mapping would allocate a page for it, undoing the sparseness we are after.

    lseek moves the file offset that dup'ed copies of the fd share; nobody reads the memfd
    through its offset (everyone maps it), so that is harmless.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            if e.errno == errno.EINVAL:  # a file system without SEEK_DATA: all of it is data
                return [*extents, (pos, size)]
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % PAGE_SIZE
        end = min(-(-end // PAGE_SIZE) * PAGE_SIZE, size)
        extents.append((start, end))
        pos = end
    return extents


def file_holes(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the holes in the first `size` bytes of file `fd`, page aligned: ranges
    that hold nothing on disk and read as zeros. None listed where the file system cannot
    say (data_extents)."""
    holes, pos = [], 0
    for start, end in data_extents(fd, size):
        if start > pos:
            holes.append((pos, start))
        pos = end
    if pos < size:
        holes.append((pos, size))
    return holes


def nonzero_runs(mm: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of pages in [start, end) that are not all zero."""
    run = None
    for page in range(start, end, PAGE_SIZE):
        # A page whose first byte is set is data (one index, no copy); any other is copied and
        # compared whole (memcmp). Not mmap.find(ZERO_PAGE, page, page + PAGE_SIZE), which
        # compares in place but runs a substring search per page: 256 MiB of data pages took
        # 11 ms with it on CPython 3.11.7 and 168 ms on Debian's 3.11.2 (whose search sets up
        # the 4 KiB pattern anew each call), and a mix of 128 MiB of data pages and 128 MiB of
        # zero pages 130 and 430 ms. This way, on both: 3-4 ms for the data pages, 17-38 ms
        # for 256 MiB of zero pages.
        if mm[page] == 0 and mm[page : page + PAGE_SIZE] == ZERO_PAGE:
            if run is not None:
                yield run, page - run
                run = None
        elif run is None:
            run = page
    if run is not None:
        yield run, end - run


# --- writing -----------------------------------------------------------------------------------


class _RamWriter:
    """Writes records and data, hashing and counting them; progress is memfd data scanned.
    `running`: the VM runs, and may change a piece of its memory between the write and the
    hash, so each piece is copied first and both are of the copy."""

    def __init__(
        self,
        out: BinaryIO,
        total: int,
        progress: Progress | None,
        checksum: digest.Overlapped,
        running: bool = False,
        recorded: bytearray | None = None,
    ) -> None:
        """`recorded`: a bitmap of the memory's pages (bit n % 8 of byte n // 8 for page n),
        set here for each page a record holds, where later passes need it (_later_runs)."""
        self.out, self.total, self.progress, self.hash = out, total, progress, checksum
        self.running, self.recorded = running, recorded
        self.size = self.scanned = self.extents = self.data = 0

    def put(self, data: bytes | memoryview) -> None:
        if self.running and isinstance(data, memoryview):
            data = data.tobytes()
        self.hash.update(data)  # hashed on a helper thread while it is written
        self.out.write(data)
        self.size += len(data)

    def report(self, scanned: int) -> None:
        if self.progress:
            self.progress(scanned, self.total)

    def data_extent(self, mm: mmap.mmap, view: memoryview, start: int, end: int) -> None:
        """One memfd data extent: its non-zero runs become records."""
        for offset, length in nonzero_runs(mm, start, end):
            self.extent(view, offset, length, start)
        self.scanned += end - start
        self.report(self.scanned)

    def extent(
        self, view: memoryview, offset: int, length: int, scanning: int | None = None
    ) -> None:
        """One record of `length` bytes at `offset`, whatever they hold (zeros too). Each
        piece is reported: as scanned up to its end, within the data extent that began at
        `scanning`; or, in a pass made again (`scanning` None), at what was scanned already,
        as it scans nothing new: such a pass holds up to half of the RAM, and progress() may
        end it (a VM that stops)."""
        self.put(RECORD.pack(offset, length))
        for piece in range(offset, offset + length, PIECE):
            piece_end = min(piece + PIECE, offset + length)
            self.put(view[piece:piece_end])
            self.report(self.scanned + (0 if scanning is None else piece_end - scanning))
        self.extents, self.data = self.extents + 1, self.data + length
        if self.recorded is not None:
            mark_pages(self.recorded, offset // PAGE_SIZE, length // PAGE_SIZE)


def write_ram(out: BinaryIO, mem: RamLike, progress: Progress | None = None) -> RamStats:
    """Encode `mem` into `out` (a buffered file); the VM must be paused and devices quiesced."""
    return _write(out, mem, progress, VERSION, None)


Written = Sequence[tuple[int, int]]  # (offset, length) of page-aligned extents, in order


def write_ram_precopy(
    out: BinaryIO,
    mem: RamLike,
    stop: Callable[[], Written],
    progress: Progress | None = None,
    again: Callable[[int], Written | None] | None = None,
) -> RamStats:
    """Encode `mem` into `out` as sparse-v2, its VM running: a first pass over its data;
    then, up to MAX_PASSES - 2 times, again(bytes the pass before held: the first's data, a
    later one's written set, its zero pages included), which returns the
    extents written since that pass began, to copy now, the VM still running, or None; then
    stop(), which stops the VM (vCPUs parked, devices quiesced) and returns the extents
    written since the pass before began (monitor/dirtylog.py): the last pass. On return
    the VM is still stopped; if stop() raises, nothing more is written."""

    def later_passes(w: _RamWriter, view: memoryview) -> None:
        held = w.data
        for _ in range(MAX_PASSES - 2):
            written = again(held) if again is not None else None
            if written is None:
                break
            _pass(w, mem.map, view, written, mem.size)
            # What it was asked to copy, the zero pages it skipped included: again() weighs the
            # set it would copy next, counted so too, against it.
            held = sum(length for _, length in written)
        written = stop()
        w.running = False  # stopped: what is written now stays as it is until it is hashed
        _pass(w, mem.map, view, written, mem.size)

    return _write(out, mem, progress, PRECOPY_VERSION, later_passes)


def _write(
    out: BinaryIO,
    mem: RamLike,
    progress: Progress | None,
    version: int,
    later_passes: Callable[[_RamWriter, memoryview], None] | None,
) -> RamStats:
    """The header, the first pass over the memfd's data (made while the VM runs where there
    are later passes: sparse-v2), the later passes, the end record."""
    if mem.size % PAGE_SIZE:
        raise SnapshotError(f"guest memory size {mem.size} is not a multiple of {PAGE_SIZE}")
    extents = data_extents(mem.fd, mem.size)
    total = sum(end - start for start, end in extents)
    # The helper is joined before the view goes (a `with` leaves its last item first).
    with memoryview(mem.map) as view, digest.Overlapped(digest.WRITE_ALGORITHM) as checksum:
        recorded = None if later_passes is None else bytearray(bitmap_size(mem.size))
        w = _RamWriter(out, total, progress, checksum, later_passes is not None, recorded)
        w.put(HEADER.pack(MAGIC, version, PAGE_SIZE, mem.size, 0))
        for start, end in extents:
            w.data_extent(mem.map, view, start, end)
        if later_passes is not None:
            later_passes(w, view)
        w.put(RECORD.pack(END_OFFSET, w.data))
        return RamStats(w.extents, w.data, w.size, checksum.hexdigest())


def _pass(
    w: _RamWriter, mm: mmap.mmap, view: memoryview, written: Written, memory_size: int
) -> None:
    """A pass marker, then each written extent, checked, as it is now: what a later pass
    records of it (_later_runs)."""
    assert w.recorded is not None  # _write() keeps it for a stream with later passes
    w.put(RECORD.pack(PASS_OFFSET, 0))
    last = 0
    for offset, length in written:
        if offset % PAGE_SIZE or length % PAGE_SIZE or not length or offset < last:
            raise SnapshotError(f"written extent {offset:#x}+{length:#x} is out of order")
        if offset + length > memory_size:
            raise SnapshotError(f"written extent {offset:#x}+{length:#x} lies beyond RAM")
        for start, run in _later_runs(w.recorded, mm, offset, offset + length):
            w.extent(view, start, run)
        last = offset + length


def _later_runs(
    recorded: bytearray, mm: mmap.mmap, start: int, end: int
) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of [start, end) that a later pass records: its pages that
    hold data, and its zero pages that a record before holds (zeroed since); not the zero
    pages none holds, which the restored memory has as zeros already. Neighbours merged."""
    run: tuple[int, int] | None = None
    cursor = start
    for offset, length in [*nonzero_runs(mm, start, end), (end, 0)]:  # then the gap at the end
        for part in [*_recorded_runs(recorded, cursor, offset), (offset, length)]:
            if not part[1]:
                continue
            if run is not None and sum(run) == part[0]:
                run = (run[0], run[1] + part[1])
                continue
            if run is not None:
                yield run
            run = part
        cursor = offset + length
    if run is not None:
        yield run


def _recorded_runs(recorded: bytearray, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of pages in [start, end) that `recorded` holds."""
    first, last = start // PAGE_SIZE, end // PAGE_SIZE
    if first >= last:
        return []
    base = first >> 3 << 3  # the page of the first byte looked at
    runs = []
    for page, pages in page_runs(recorded[first >> 3 : ((last - 1) >> 3) + 1]):
        lo, hi = max(first, base + page), min(last, base + page + pages)
        if lo < hi:  # (the bytes' other pages lie outside the range)
            runs.append((lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE))
    return runs


# --- reading -----------------------------------------------------------------------------------


class _Stream:
    """A RAM chunk being read at explicit offsets: hashes what it reads (when given a hash),
    names the chunk."""

    def __init__(
        self,
        fd: int,
        file_size: int,
        where: str,
        checksum: digest.Overlapped | None = None,
        holes: Sequence[tuple[int, int]] = (),
    ) -> None:
        """`holes`: the file's (file_holes), for load_extent."""
        self.fd, self.file_size, self.where, self.hash = fd, file_size, where, checksum
        self.holes = holes
        self._hole = 0  # the first of `holes` that may end past pos (pos only grows)
        self.pos = 0

    def fail(self, message: str) -> SnapshotError:
        return SnapshotError(f"{self.where}: {message}")

    def read_exact(self, n: int) -> bytes:
        data = os.pread(self.fd, n, self.pos)
        if len(data) != n:
            raise self.fail(f"truncated at byte {self.pos + len(data)}")
        if self.hash is not None:
            self.hash.update(data)
        self.pos += n
        return data

    def copy_into(self, mem: RamLike, view: memoryview, offset: int, length: int) -> None:
        """File data -> guest memory at `offset`, then hash it where it landed (on the helper
        thread, while the caller copies the next piece)."""
        done = 0
        while done < length:
            n = _copy(self.fd, self.pos + done, mem, offset + done, length - done, view)
            if not n:
                raise self.fail(f"truncated at byte {self.pos + done}")
            done += n
        if self.hash is not None:
            self.hash.update(view[offset : offset + length])
        self.pos += length

    def load_extent(
        self,
        mem: RamLike,
        view: memoryview,
        offset: int,
        length: int,
        progress: Progress | None,
        zero_pages: Callable[[int, int], None],
    ) -> None:
        """The extent's `length` bytes of data into `mem` at `offset`, but its whole pages that
        a hole of the file holds: zeros, that only zero_pages(offset, length) gets to make
        (or refuse), so that a file of a few KiB on disk never fills host memory with them."""
        done = 0
        for start, end in self._zero_runs(length):
            self._copy_extent(mem, view, offset + done, start - done, progress)
            zero_pages(offset + start, end - start)
            if self.hash is not None:
                for piece in range(start, end, PIECE):
                    self.hash.update(_zeros()[: min(PIECE, end - piece)])  # (a view)
            self.pos += end - start
            done = end
        self._copy_extent(mem, view, offset + done, length - done, progress)

    def _zero_runs(self, length: int) -> Iterator[tuple[int, int]]:
        """(start, end), from the data at self.pos as it is at the first next(), of each run
        of the next `length` bytes' whole pages that lie in a hole of the file. (The caller
        moves pos on while it takes them.)"""
        base, holes = self.pos, self.holes
        while self._hole < len(holes) and holes[self._hole][1] <= base:
            self._hole += 1  # ended before this extent: no later one reaches it either
        for i in range(self._hole, len(holes)):
            hole_start, hole_end = holes[i]
            if hole_start >= base + length:
                break
            start = max(hole_start - base, 0)
            start += -start % PAGE_SIZE  # the first whole page in it
            end = min(hole_end - base, length)
            end -= end % PAGE_SIZE
            if start < end:
                yield start, end

    def _copy_extent(
        self, mem: RamLike, view: memoryview, offset: int, length: int, progress: Progress | None
    ) -> None:
        for piece in range(offset, offset + length, PIECE):
            self.copy_into(mem, view, piece, min(PIECE, offset + length - piece))
            if progress:
                progress(self.pos, self.file_size)

    def skip(self, n: int) -> None:
        """Step over data without reading it (the structure check; verify hashes separately)."""
        self.pos += n


def _copy(fd: int, pos: int, mem: RamLike, offset: int, n: int, view: memoryview) -> int:
    # sendfile copies page cache -> memfd inside the kernel: about twice as fast here as
    # reading into the mapping, which takes a page fault per fresh 4 KiB page. It writes at
    # the memfd's file offset, which nobody else uses (everyone maps it).
    try:
        os.lseek(mem.fd, offset, os.SEEK_SET)
        return os.sendfile(mem.fd, fd, pos, n)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):  # hugetlbfs has no write(): map it
            raise
    return os.preadv(fd, [view[offset : offset + n]], pos)


def _check_header(s: _Stream, memory_size: int, encoding: str) -> int:
    """The stream's version, as the manifest's `encoding` says it must be."""
    magic, version, page_size, size, reserved = HEADER.unpack(s.read_exact(HEADER.size))
    if magic != MAGIC:
        raise s.fail(f"not a {encoding} RAM chunk (bad magic)")
    if version not in VERSIONS.values():
        known = ", ".join(map(str, VERSIONS.values()))
        raise s.fail(f"RAM encoding version {version} is unknown (this splitvmm reads {known})")
    if version != VERSIONS.get(encoding):
        raise s.fail(f"holds RAM encoding version {version}, the manifest says {encoding}")
    if page_size != PAGE_SIZE or reserved != 0:
        raise s.fail(f"page size {page_size} / reserved {reserved} must be {PAGE_SIZE} / 0")
    if size != memory_size:
        raise s.fail(f"holds {size} bytes of RAM, the manifest says {memory_size}")
    return VERSIONS[encoding]


def _records(s: _Stream, memory_size: int, encoding: str) -> Iterator[tuple[int, int]]:
    """Validated (offset, length) extents; the caller reads or skips each one's data. A
    sparse-v2 stream's later passes each begin with (PASS_OFFSET, 0)."""
    precopy = _check_header(s, memory_size, encoding) == PRECOPY_VERSION
    passes_due = MAX_PASSES - 1 if precopy else 0
    prev_end = data = 0
    while True:
        offset, length = RECORD.unpack(s.read_exact(RECORD.size))
        if offset == END_OFFSET:
            break
        if offset == PASS_OFFSET and passes_due and not length:
            passes_due, prev_end = passes_due - 1, 0
            yield offset, length
            continue
        if offset % PAGE_SIZE or length % PAGE_SIZE or not length or offset < prev_end:
            raise s.fail(f"extent {offset:#x}+{length:#x} is unaligned, empty or out of order")
        if offset + length > memory_size:
            raise s.fail(
                f"extent {offset:#x}+{length:#x} lies beyond the {memory_size:#x} bytes of RAM"
            )
        if s.pos + length + RECORD.size > s.file_size:
            raise s.fail(f"truncated: extent {offset:#x}+{length:#x} runs past the end of file")
        yield offset, length
        prev_end, data = offset + length, data + length
    if length != data:
        raise s.fail(f"end record says {length} data bytes, the extents hold {data}")
    if s.pos != s.file_size:
        raise s.fail(f"{s.file_size - s.pos} bytes after the end record")


def check_ram(
    fd: int, file_size: int, memory_size: int, where: str, encoding: str = ENCODING
) -> tuple[int, int]:
    """Walk the structure without reading the data: (extent count, data bytes)."""
    s = _Stream(fd, file_size, where)
    count = data = 0
    for offset, length in _records(s, memory_size, encoding):
        if offset == PASS_OFFSET:
            continue
        s.skip(length)
        count, data = count + 1, data + length
    return count, data


def clear(mem: RamLike) -> None:
    """Make every page of `mem` a hole again, so pages absent from the snapshot read as zero."""
    for start, end in data_extents(mem.fd, mem.size):
        _punch(mem, start, end - start)


def _punch(mem: RamLike, offset: int, length: int) -> None:
    """Zero `length` bytes of `mem` at `offset` (page aligned) by making them a hole."""
    try:
        # Punches a hole in the memfd (frees the pages), as fallocate(PUNCH_HOLE) would.
        mem.map.madvise(mmap.MADV_REMOVE, offset, length)
    except OSError:  # a mapping that cannot punch holes: zero the bytes instead
        for pos in range(offset, offset + length, PAGE_SIZE):
            mem.map[pos : pos + PAGE_SIZE] = ZERO_PAGE


@functools.cache
def _zeros() -> memoryview:
    """One PIECE of zeros, made by the first restore that needs it."""
    return memoryview(bytes(PIECE))


def load_ram(
    fd: int,
    file_size: int,
    mem: RamLike,
    where: str,
    algorithm: digest.Algorithm,
    progress: Progress | None = None,
    encoding: str = ENCODING,
) -> str:
    """Read the chunk into `mem`, each extent bounds-checked before it is copied; returns the
    checksum (hex, of `algorithm`) of what was read, for the caller to compare. On error `mem`
    holds a partial image."""
    clear(mem)
    holes = file_holes(fd, file_size)

    def zero_pages(offset: int, length: int) -> None:
        """Whole pages of zeros, read from a hole of the file. sparse-v1 is written from a
        stopped VM's pages that are not zero (write_ram): a zero page there is a forged or
        damaged file. A sparse-v2 pass may hold them (a page zeroed while the first pass ran,
        or since a record before held it), and gets them as a hole in guest RAM: nothing of
        the host's memory, however large the extent a forger wrote."""
        if encoding == ENCODING:
            raise s.fail(
                f"guest RAM {offset:#x}+{length:#x} is stored as pages of zeros (a hole in "
                f"the file), which no {ENCODING} writer stores"
            )
        _punch(mem, offset, length)

    with memoryview(mem.map) as view, digest.Overlapped(algorithm) as checksum:
        s = _Stream(fd, file_size, where, checksum, holes)
        for offset, length in _records(s, mem.size, encoding):
            if offset == PASS_OFFSET:
                # A pass is hashed where it landed: all of it before the next overwrites
                # any (the helper may still be at its last piece).
                checksum.wait()
                continue
            s.load_extent(mem, view, offset, length, progress, zero_pages)
        return checksum.hexdigest()
