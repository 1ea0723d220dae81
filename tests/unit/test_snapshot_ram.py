"""The sparse-v1 and sparse-v2 RAM encodings: finds only the data, a live snapshot's later passes
hold what the guest wrote during the one before, and the decoder rejects every malformed file."""

from __future__ import annotations

import contextlib
import io
import mmap
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.monitor.memory import GuestMemory
from splitvmm.snapshot import SnapshotError, digest, ram
from splitvmm.snapshot.ram import (
    check_ram,
    data_extents,
    load_ram,
    nonzero_runs,
    write_ram,
    write_ram_precopy,
)
from tests.unit.snapshot_support import MEM_SIZE, PAGE, memory

END = (1 << 64) - 1
HEADER = struct.pack("<8sIIQQ", b"SVMMRAM\0", 1, PAGE, MEM_SIZE, 0)


def _record(offset: int, length: int, fill: bytes = b"\xaa") -> bytes:
    return struct.pack("<QQ", offset, length) + fill * length


def _end(data_bytes: int) -> bytes:
    return struct.pack("<QQ", END, data_bytes)


def _check(body: bytes) -> tuple[int, int]:
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        return check_ram(f.fileno(), len(body), MEM_SIZE, "chunk ram (ram.bin)")


def test_ram_untouched_memfd_has_no_extents():
    mem = memory(pages={})

    extents = data_extents(mem.fd, mem.size)
    mem.close()

    assert extents == []


def test_ram_extents_are_page_aligned_data():
    mem = memory(pages={0x3000: b"\x01", 0x4000: b"\x02", 0x9000: b"\x03"})

    extents = data_extents(mem.fd, mem.size)
    mem.close()

    assert extents == [(0x3000, 0x5000), (0x9000, 0xA000)]


def test_ram_runs_split_at_zero_pages():
    mem = memory(pages={0x0: b"\x01", 0x1000: b"\x02", 0x2000: b"\x00", 0x3000: b"\x03"})

    runs = list(nonzero_runs(mem.map, 0, 0x4000))
    mem.close()

    assert runs == [(0x0, 0x2000), (0x3000, 0x1000)]


def test_ram_page_with_one_nonzero_byte_is_kept():
    mem = memory(pages={})
    mem.map[0x7FFF] = 1  # the last byte of page 7

    runs = list(nonzero_runs(mem.map, 0x7000, 0x8000))
    mem.close()

    assert runs == [(0x7000, 0x1000)]


def _runs_page_by_page(data: bytes) -> list[tuple[int, int]]:
    """The definition: maximal runs of pages that are not all zero."""
    runs: list[tuple[int, int]] = []
    for page in range(0, len(data), PAGE):
        if data[page : page + PAGE] == bytes(PAGE):
            continue
        if runs and sum(runs[-1]) == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((page, PAGE))
    return runs


# A page is zero, has one byte set (at its start, middle or end), or holds a zero run longer
# than a page that straddles a page boundary (a match of the search that is not a zero page).
PAGE_KINDS = st.sampled_from(["zero", "first", "middle", "last", "tail-zeros", "head-zeros"])


def _page(kind: str) -> bytes:
    page = bytearray(PAGE)
    if kind == "first":
        page[0] = 1
    elif kind == "middle":
        page[PAGE // 2] = 7
    elif kind == "last":
        page[-1] = 0xFF
    elif kind == "tail-zeros":  # zeros to its end: with a head-zeros next, a straddling run
        page[: PAGE // 4] = b"\x01" * (PAGE // 4)
    elif kind == "head-zeros":
        page[-PAGE // 4 :] = b"\x02" * (PAGE // 4)
    return bytes(page)


@settings(max_examples=200, deadline=None)
@given(st.lists(PAGE_KINDS, min_size=1, max_size=MEM_SIZE // PAGE))
def test_ram_nonzero_runs_are_the_page_by_page_runs(kinds):
    data = b"".join(_page(kind) for kind in kinds)
    mem = memory(pages={})
    mem.map[: len(data)] = data
    try:
        runs = list(nonzero_runs(mem.map, 0, len(data)))
    finally:
        mem.close()
    assert runs == _runs_page_by_page(data)


def test_ram_writer_output_passes_the_check():
    mem = memory()
    out = io.BytesIO()

    stats = write_ram(out, mem)
    mem.close()

    assert _check(out.getvalue()) == (stats.extents, stats.data_bytes) == (3, 4 * PAGE)


def test_ram_valid_handmade_file_passes():
    body = HEADER + _record(0, PAGE) + _record(2 * PAGE, 2 * PAGE) + _end(3 * PAGE)

    assert _check(body) == (2, 3 * PAGE)


@pytest.mark.parametrize(
    "body,message",
    [
        (b"SVMMRAM", "truncated at byte 7"),
        (HEADER.replace(b"SVMMRAM", b"QEMURAM") + _end(0), "bad magic"),
        (struct.pack("<8sIIQQ", b"SVMMRAM\0", 2, PAGE, MEM_SIZE, 0), "RAM encoding version 2"),
        (struct.pack("<8sIIQQ", b"SVMMRAM\0", 1, 8192, MEM_SIZE, 0), "page size 8192"),
        (struct.pack("<8sIIQQ", b"SVMMRAM\0", 1, PAGE, MEM_SIZE, 1), "reserved 1"),
        (
            struct.pack("<8sIIQQ", b"SVMMRAM\0", 1, PAGE, 2 * MEM_SIZE, 0),
            f"holds {2 * MEM_SIZE} bytes",
        ),
        (HEADER, "truncated at byte 32"),
        (HEADER + _record(100, PAGE) + _end(PAGE), "extent 0x64\\+0x1000 is unaligned"),
        (HEADER + _record(0, 100) + _end(100), "extent 0x0\\+0x64 is unaligned"),
        (HEADER + _record(0, 0) + _end(0), "extent 0x0\\+0x0 is unaligned, empty"),
        (HEADER + _record(PAGE, PAGE) + _record(0, PAGE) + _end(2 * PAGE), "out of order"),
        (HEADER + _record(0, 2 * PAGE) + _record(PAGE, PAGE) + _end(3 * PAGE), "out of order"),
        (HEADER + _record(MEM_SIZE, PAGE) + _end(PAGE), f"lies beyond the {MEM_SIZE:#x} bytes"),
        (HEADER + _record(END + 1 - PAGE, PAGE) + _end(PAGE), "0xfffffffffffff000\\+0x1000 lies"),
        (HEADER + _record(0, 1 << 62, b"") + _end(0), "lies beyond"),
        (HEADER + _record(0, PAGE) + _end(2 * PAGE), "end record says 8192 data bytes"),
        (HEADER + _record(0, PAGE) + _end(PAGE) + b"\0", "1 bytes after the end record"),
        (HEADER + _record(0, PAGE), "truncated: extent 0x0\\+0x1000 runs past the end"),
        (HEADER + _record(0, 2 * PAGE)[:-PAGE] + _end(2 * PAGE), "runs past the end"),
    ],
    ids=lambda v: "" if isinstance(v, bytes) else v,
)
def test_ram_malformed_file_refused(body, message):
    with pytest.raises(SnapshotError, match=f"chunk ram \\(ram.bin\\): .*{message}"):
        _check(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_ram_random_tail_gives_only_snapshot_errors(tail):
    with contextlib.suppress(SnapshotError):  # the decoder's only way to say no
        _check(HEADER + tail)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 48 + PAGE + 15), st.integers(1, 255))
def test_ram_flipped_byte_of_valid_file_gives_only_snapshot_errors(index, xor):
    body = bytearray(HEADER + _record(PAGE, PAGE) + _end(PAGE))
    body[index] ^= xor
    with contextlib.suppress(SnapshotError):
        _check(bytes(body))


def test_ram_extent_count_is_bounded_by_memory():
    # Every other page: the most extents a valid file can have (MEM_SIZE / 8 KiB).
    records = b"".join(_record(o, PAGE, b"\x01") for o in range(0, MEM_SIZE, 2 * PAGE))
    count = MEM_SIZE // (2 * PAGE)

    assert _check(HEADER + records + _end(count * PAGE)) == (count, count * PAGE)


def test_ram_fd_offset_is_not_used_for_reads():
    body = HEADER + _record(0, PAGE) + _end(PAGE)
    with tempfile.TemporaryFile() as f:
        f.write(body)  # leaves the file offset at the end

        result = check_ram(f.fileno(), len(body), MEM_SIZE, "chunk ram (ram.bin)")

    assert result == (1, PAGE)


# --- sparse-v2: a live snapshot's passes ---------------------------------------------------------

PASS = (1 << 64) - 2
HEADER_V2 = struct.pack("<8sIIQQ", b"SVMMRAM\0", 2, PAGE, MEM_SIZE, 0)


def _check_v2(body: bytes) -> tuple[int, int]:
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        return check_ram(f.fileno(), len(body), MEM_SIZE, "chunk ram (ram.bin)", "sparse-v2")


def _load(stream: bytes, encoding: str) -> GuestMemory:
    fresh = memory(pages={})
    with tempfile.TemporaryFile() as f:
        f.write(stream)
        f.flush()
        alg = digest.WRITE_ALGORITHM
        got = load_ram(f.fileno(), len(stream), fresh, "chunk ram", alg, None, encoding)
    assert got == digest.of(alg, stream)  # the stream as written is what is hashed
    return fresh


def _load_sparse(stream: bytes, encoding: str) -> GuestMemory:
    """_load of the stream copied as `cp --sparse=always` copies: each 4 KiB block of zeros
    a hole in the file."""
    fresh = memory(pages={})
    skipped = False
    with tempfile.TemporaryFile() as f:
        for block in range(0, len(stream), PAGE):
            if stream[block : block + PAGE].count(0) == len(stream[block : block + PAGE]):
                f.seek(block + PAGE)
                skipped = True
            else:
                f.seek(block)
                f.write(stream[block : block + PAGE])
        f.truncate(len(stream))
        f.flush()
        if skipped:
            assert ram.file_holes(f.fileno(), len(stream)), "this file system made no hole"
        alg = digest.WRITE_ALGORITHM
        try:
            got = load_ram(f.fileno(), len(stream), fresh, "chunk ram", alg, None, encoding)
        except BaseException:
            fresh.close()
            raise
    assert got == digest.of(alg, stream)  # the zeros of the holes are hashed too
    return fresh


def test_ram_v1_stream_whose_pages_of_zeros_are_holes_is_refused_before_they_take_memory():
    """A forged RAM chunk: one extent of zeros as large as the RAM it claims, stored as a hole
    (a few KiB on disk). Copied into guest RAM, it filled as much of the host's memory before
    the checksum could say no. A sparse-v1 writer never stores a page of zeros."""
    body = HEADER + _record(0, 16 * PAGE, b"\0") + _end(16 * PAGE)
    with pytest.raises(SnapshotError, match="chunk ram: guest RAM 0x1000\\+0xe000 is stored as"):
        _load_sparse(body, "sparse-v1")


def test_ram_v2_stream_copied_sparse_restores_its_zeroed_pages_as_holes():
    """A live snapshot's later pass records the pages a record before held and the guest zeroed
    since: copied with holes for its zeros, it restores the same memory, and those pages
    take none of the host's."""
    mem = memory(pages={0x0: b"\x01", **{o: b"\x02" for o in range(0x4000, 0xC000, PAGE)}})

    def stop() -> list[tuple[int, int]]:
        mem.map[0x4000:0xC000] = bytes(8 * PAGE)  # zeroed after the first pass took them
        return [(0x4000, 8 * PAGE)]

    out = io.BytesIO()
    write_ram_precopy(out, mem, stop)
    fresh = _load_sparse(out.getvalue(), "sparse-v2")
    held = data_extents(fresh.fd, fresh.size)  # (before a read of the mapping allocates)

    assert fresh.map[:] == mem.map[:]
    # the pages whole in a hole of the file (each record's data starts where the one before
    # ends, not at a page of the file: the first and last zeroed pages are copied)
    assert not [(start, end) for start, end in held if start < 0xB000 and end > 0x5000], held
    mem.close()
    fresh.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=8, max_size=48))
def test_ram_v2_stream_copied_sparse_restores_any_mix_of_zeroed_pages(zeroed):
    """One record of a later pass, with runs of zeroed pages between pages of data: each run
    whole in a hole of the file lands where it belongs, and so does the data after it."""
    pages = len(zeroed)
    mem = memory(pages={o * PAGE: bytes([o % 250 + 1]) for o in range(pages)})

    def stop() -> list[tuple[int, int]]:
        for index, zero in enumerate(zeroed):
            mem.map[index * PAGE : (index + 1) * PAGE] = (
                bytes(PAGE) if zero else bytes([index % 250 + 2]) * PAGE
            )
        return [(0, pages * PAGE)]

    out = io.BytesIO()
    write_ram_precopy(out, mem, stop)
    fresh = _load_sparse(out.getvalue(), "sparse-v2")
    try:
        assert fresh.map[: pages * PAGE] == mem.map[: pages * PAGE]
    finally:
        mem.close()
        fresh.close()


def test_ram_precopy_holds_memory_as_it_was_when_stopped():
    """The guest writes pages after the first pass copied them (one it had, one new, one it
    zeroed): the second pass holds them as they are once the VM is stopped."""
    mem = memory(pages={0x0: b"\x01", 0x5000: b"\x02", 0x9000: b"\x03"})

    def stop() -> list[tuple[int, int]]:
        mem.map[0x5000:0x6000] = b"\x07" * PAGE  # written after the first pass took it
        mem.map[0xC000:0xE000] = b"\x08" * (2 * PAGE)  # a hole then
        mem.map[0x9000:0xA000] = bytes(PAGE)  # zeroed
        return [(0x5000, PAGE), (0x9000, PAGE), (0xC000, 2 * PAGE)]

    out = io.BytesIO()
    stats = write_ram_precopy(out, mem, stop)
    fresh = _load(out.getvalue(), "sparse-v2")

    assert fresh.map[:] == mem.map[:]
    assert stats.digest == digest.of(digest.WRITE_ALGORITHM, out.getvalue())
    mem.close()
    fresh.close()


def test_ram_precopy_later_pass_skips_a_zero_page_no_record_holds():
    """A page the guest wrote zeros to (allocated, which zeroes it, not filled yet) is zero in
    the restored memory already where no record holds it: a later pass skips it. One that a
    record holds (the first pass took it with data) and the guest zeroed since must be
    recorded, zeros and all, and data next to it goes in one record with it."""
    mem = memory(pages={0x0: b"\x01", 0x9000: b"\x03"})

    def stop() -> list[tuple[int, int]]:
        mem.map[0xC000:0xE000] = bytes(2 * PAGE)  # a hole at the first pass: zeros written
        mem.map[0x9000:0xA000] = bytes(PAGE)  # zeroed after the first pass took its data
        mem.map[0xA000:0xB000] = b"\x04" * PAGE  # new data next to it
        return [(0x9000, 2 * PAGE), (0xC000, 2 * PAGE)]

    out = io.BytesIO()
    stats = write_ram_precopy(out, mem, stop)
    fresh = _load(out.getvalue(), "sparse-v2")

    assert fresh.map[:] == mem.map[:]
    # the first pass's two pages, then one record of 0x9000 (zeros) and 0xA000
    assert (stats.extents, stats.data_bytes) == (3, 4 * PAGE)
    mem.close()
    fresh.close()


# What a page holds at the first pass, and then when the VM stops: nothing (a hole), zeros
# written, or data; and whether the tracker says it was written (a page may be said written
# and hold what it held, as a device's mark before a write that failed).
PAGE_STATES = st.sampled_from(["hole", "zeros", "data"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PAGE_STATES, PAGE_STATES, st.booleans()), min_size=1, max_size=24))
def test_ram_precopy_restores_any_change_of_pages_said_written(pages):
    """The first pass copies what the pages hold; then each page changed is said written
    (with some unchanged ones): the restored memory is the memory when stopped, whichever
    pages the later pass skipped as zeros."""
    mem = memory(pages={})

    def fill(index: int, state: str) -> None:
        offset = index * PAGE
        if state == "data":
            mem.map[offset : offset + PAGE] = bytes([index + 1]) * PAGE
        elif state == "zeros":
            mem.map[offset : offset + PAGE] = bytes(PAGE)
        else:
            mem.map.madvise(mmap.MADV_REMOVE, offset, PAGE)  # a hole in the memfd again

    for index, (first, _, _) in enumerate(pages):
        fill(index, first)

    def stop() -> list[tuple[int, int]]:
        written = []
        for index, (first, then, said) in enumerate(pages):
            if then != first or said:
                fill(index, then)
                written.append((index * PAGE, PAGE))
        return written

    out = io.BytesIO()
    write_ram_precopy(out, mem, stop)
    fresh = _load(out.getvalue(), "sparse-v2")
    try:
        assert fresh.map[: len(pages) * PAGE] == mem.map[: len(pages) * PAGE]
    finally:
        mem.close()
        fresh.close()


class LateChecksum:
    """digest.Overlapped whose helper thread fell behind: every piece is hashed at the end."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm, self.pieces = algorithm, []

    def __enter__(self) -> LateChecksum:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, piece: bytes | memoryview) -> None:
        self.pieces.append(piece)

    def wait(self) -> None:
        pass

    def hexdigest(self) -> str:
        return digest.of(self.algorithm, b"".join(bytes(p) for p in self.pieces))


def test_ram_precopy_hashes_what_it_wrote_while_the_guest_changes_it(monkeypatch):
    """The first pass runs beside the guest: a page changed between its write and its hash
    (the helper thread hashes behind the writes) would make a snapshot that fails its own
    checksum. Each piece is copied, then written and hashed."""
    monkeypatch.setattr(ram.digest, "Overlapped", LateChecksum)
    mem = memory(pages={0x0: b"\x01"})
    out = io.BytesIO()
    real_write = out.write
    running = [True]

    def write_then_change(data: bytes) -> int:
        n = real_write(data)
        if running[0]:  # the guest, just after each write, until it is stopped
            mem.map[0:PAGE] = bytes([mem.map[0] + 1]) * PAGE
        return n

    def stop() -> list[tuple[int, int]]:
        running[0] = False
        return [(0x0, PAGE)]

    out.write = write_then_change  # type: ignore[method-assign]
    stats = write_ram_precopy(out, mem, stop)

    assert stats.digest == digest.of(digest.WRITE_ALGORITHM, out.getvalue())
    mem.close()


def test_ram_precopy_refuses_what_stop_says_out_of_order():
    mem = memory(pages={0x0: b"\x01"})

    with pytest.raises(SnapshotError, match="out of order"):
        write_ram_precopy(io.BytesIO(), mem, lambda: [(0x2000, PAGE), (0x0, PAGE)])
    with pytest.raises(SnapshotError, match="beyond RAM"):
        write_ram_precopy(io.BytesIO(), mem, lambda: [(MEM_SIZE, PAGE)])
    mem.close()


def test_ram_v2_stream_second_pass_counts_and_ascends_again():
    body = (
        HEADER_V2 + _record(0x2000, PAGE) + _record(0x9000, PAGE)
        + struct.pack("<QQ", PASS, 0) + _record(0x0, PAGE) + _record(0x2000, PAGE)
        + _end(4 * PAGE)
    )  # fmt: skip

    assert _check_v2(body) == (4, 4 * PAGE)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (HEADER + struct.pack("<QQ", PASS, 0) + _end(0), "unaligned, empty or out of order"),
        (HEADER_V2 + struct.pack("<QQ", PASS, PAGE) + _end(0), "unaligned, empty or out of order"),
        (
            HEADER_V2 + _record(0x2000, PAGE) + _record(0x0, PAGE) + _end(2 * PAGE),
            "unaligned, empty or out of order",
        ),
    ],
    ids=["pass-in-v1", "pass-with-length", "descending-without-pass"],
)
def test_ram_v2_stream_refuses_a_malformed_pass(body, message):
    encoding = "sparse-v1" if body.startswith(HEADER) else "sparse-v2"
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        with pytest.raises(SnapshotError, match=message):
            check_ram(f.fileno(), len(body), MEM_SIZE, "chunk ram (ram.bin)", encoding)


@pytest.mark.parametrize(
    ("header", "encoding"), [(HEADER, "sparse-v2"), (HEADER_V2, "sparse-v1")], ids=["v1", "v2"]
)
def test_ram_stream_whose_version_is_not_the_manifests_encoding_is_refused(header, encoding):
    body = header + _end(0)
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.flush()
        with pytest.raises(SnapshotError, match="the manifest says sparse-v"):
            check_ram(f.fileno(), len(body), MEM_SIZE, "chunk ram (ram.bin)", encoding)


def test_ram_precopy_passes_made_while_running_hold_memory_as_it_was_stopped():
    """Two more passes while the VM runs (again()), of what it wrote during the pass before,
    then the last once stopped: the restored memory is what it was when stopped, and again()
    is told how much each pass held."""
    mem = memory(pages={0x0: b"\x01", 0x5000: b"\x02", 0x9000: b"\x03"})
    held: list[int] = []

    def again(copied: int) -> list[tuple[int, int]] | None:
        held.append(copied)
        if len(held) == 1:  # written during the first pass
            mem.map[0x5000:0x7000] = b"\x05" * (2 * PAGE)
            return [(0x5000, 2 * PAGE)]
        mem.map[0x6000:0x7000] = b"\x06" * PAGE  # during the second: left for the pause
        return None

    def stop() -> list[tuple[int, int]]:
        mem.map[0x9000:0xA000] = bytes(PAGE)
        return [(0x6000, PAGE), (0x9000, PAGE)]

    out = io.BytesIO()
    write_ram_precopy(out, mem, stop, again=again)
    fresh = _load(out.getvalue(), "sparse-v2")

    assert fresh.map[:] == mem.map[:]
    assert held == [3 * PAGE, 2 * PAGE]
    assert out.getvalue().count(struct.pack("<QQ", PASS, 0)) == 2
    mem.close()
    fresh.close()


def test_ram_precopy_tells_again_what_a_pass_was_asked_to_copy_zero_pages_included():
    """again() weighs the set of pages said written since, which may hold zero pages a pass
    skips, against the pass before: counted the same way, a guest that zeroes pages does not
    look as if its writes grew, and does not lose a pass made while it runs."""
    mem = memory(pages={0x0: b"\x01"})
    held: list[int] = []

    def again(copied: int) -> list[tuple[int, int]] | None:
        held.append(copied)
        if len(held) == 1:  # during the first pass: a page of data and three of zeros
            mem.map[0x4000:0x5000] = b"\x04" * PAGE
            mem.map[0x5000:0x8000] = bytes(3 * PAGE)
            return [(0x4000, 4 * PAGE)]
        return None

    out = io.BytesIO()
    write_ram_precopy(out, mem, lambda: [], again=again)

    assert held == [PAGE, 4 * PAGE]
    mem.close()


def test_ram_precopy_asks_again_at_most_max_passes_minus_two_times():
    mem = memory(pages={0x0: b"\x01"})
    asked: list[int] = []

    def again(copied: int) -> list[tuple[int, int]]:
        asked.append(copied)
        return [(0x0, PAGE)]

    out = io.BytesIO()
    write_ram_precopy(out, mem, lambda: [(0x0, PAGE)], again=again)

    assert len(asked) == ram.MAX_PASSES - 2
    assert _check_v2(out.getvalue()) == (ram.MAX_PASSES, ram.MAX_PASSES * PAGE)
    mem.close()


def test_ram_v2_stream_takes_max_passes_and_refuses_one_more():
    passes = b"".join(struct.pack("<QQ", PASS, 0) + _record(0x0, PAGE) for _ in range(3))
    body = HEADER_V2 + _record(0x0, PAGE) + passes + _end(4 * PAGE)
    assert _check_v2(body) == (4, 4 * PAGE)

    more = HEADER_V2 + _record(0x0, PAGE) + passes + struct.pack("<QQ", PASS, 0) + _end(4 * PAGE)
    with pytest.raises(SnapshotError, match="unaligned, empty or out of order"):
        _check_v2(more)
