"""The sparse-v1 RAM encoding: finds only the data, and its decoder rejects every malformed file."""

from __future__ import annotations

import contextlib
import io
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.snapshot import SnapshotError
from splitvmm.snapshot.ram import check_ram, data_extents, nonzero_runs, write_ram
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
