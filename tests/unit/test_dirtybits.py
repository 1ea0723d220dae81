"""protocol/dirtybits.py: the dirty log's page bitmaps, as the device, the monitor and the
snapshot writer share them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitvmm.protocol.dirtybits import bitmap_size, dirty_log_size, mark_pages, page_runs

MIB = 1 << 20


@pytest.mark.parametrize(("ram", "size"), [(4096, 8192), (64 * MIB, 8192), (1 << 30, 65536)])
def test_dirty_log_size_is_two_bitmaps_of_a_bit_per_page_each_in_whole_pages(
    ram: int, size: int
) -> None:
    assert dirty_log_size(ram) == size


@pytest.mark.parametrize(("ram", "size"), [(4096, 1), (9 * 4096, 2), (64 * MIB, 2048)])
def test_bitmap_size_is_a_bit_per_page_not_rounded_up(ram: int, size: int) -> None:
    assert bitmap_size(ram) == size


@given(st.integers(0, 200), st.integers(1, 200))
def test_mark_pages_sets_exactly_its_pages_and_keeps_the_others(first: int, count: int) -> None:
    bitmap = bytearray(b"\x81" * 64)  # pages 0 and 7 of every byte set already
    before = {n for n in range(512) if bitmap[n // 8] >> (n % 8) & 1}

    mark_pages(bitmap, first, count)

    after = {n for n in range(512) if bitmap[n // 8] >> (n % 8) & 1}
    assert after == before | set(range(first, first + count))


@given(st.binary(max_size=64))
def test_page_runs_are_the_runs_of_set_bits(bitmap: bytes) -> None:
    bits = [bitmap[i // 8] >> (i % 8) & 1 for i in range(len(bitmap) * 8)]
    expected, start = [], None
    for i, bit in enumerate([*bits, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            expected.append((start, i - start))
            start = None

    assert page_runs(bitmap) == expected
