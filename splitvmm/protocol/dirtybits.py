"""The dirty log's page bitmaps (FdKind.DIRTY_LOG, protocol/models.py): bit n % 8 of byte
n // 8 marks 4 KiB page n of the RAM memfd. A device process sets them
(devprocs/virtio/guestram.py), the monitor sizes their memfd (monitor/devicefds.py) and reads
them (monitor/dirtylog.py), and a live snapshot's RAM writer keeps one of the pages its records
hold (snapshot/ram.py): one encoding, these helpers for all of them."""

from __future__ import annotations

import functools
import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def bitmap_size(ram_bytes: int) -> int:
    """Bytes of one bitmap for `ram_bytes` of RAM memfd: ceil(pages / 8), no rounding up."""
    pages = -(-ram_bytes // PAGE_SIZE)
    return -(-pages // 8)


def dirty_log_size(ram_bytes: int) -> int:
    """Bytes of a dirty log memfd for `ram_bytes` of RAM memfd: two bitmaps (the device's
    marks, then their harvest) of bitmap_size() bytes, each in whole pages."""
    return 2 * -(-bitmap_size(ram_bytes) // PAGE_SIZE) * PAGE_SIZE


def mark_pages(bitmap: bytearray | memoryview, first: int, count: int) -> None:
    """Set the bits of pages [first, first + count) (count >= 1): whole bytes by slice, so a
    1 MiB buffer costs a few byte operations, not one per page."""
    last = first + count - 1
    b0, b1 = first >> 3, last >> 3
    low = (0xFF << (first & 7)) & 0xFF  # pages first.. in byte b0
    high = (2 << (last & 7)) - 1  # pages ..last in byte b1
    if b0 == b1:
        bitmap[b0] |= low & high
        return
    bitmap[b0] |= low
    bitmap[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    bitmap[b1] |= high


def _byte_runs(byte: int) -> tuple[tuple[int, int], ...]:
    """(first bit, bits) of each run of set bits in one byte, lowest first."""
    runs: list[tuple[int, int]] = []
    for bit in range(8):
        if byte >> bit & 1:
            if runs and sum(runs[-1]) == bit:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((bit, 1))
    return tuple(runs)


@functools.cache
def _scan() -> tuple[re.Pattern[bytes], tuple[tuple[tuple[int, int], ...], ...]]:
    """A stretch of full bytes, or any other byte with a bit set (zero bytes are never
    visited), and each byte's runs: made at the first page_runs(), as a device process, which
    only marks, never asks (its start-up is a VM's)."""
    return re.compile(rb"\xff+|[^\x00]"), tuple(_byte_runs(b) for b in range(256))


def page_runs(bitmap: bytes | bytearray) -> list[tuple[int, int]]:
    """(first page, pages) of each run of set bits in `bitmap`, in order."""
    runs: list[tuple[int, int]] = []
    start = end = -1  # the run under way: pages [start, end)
    found_set, byte_runs = _scan()
    for match in found_set.finditer(bitmap):
        base, found = match.start() * 8, match.group()
        parts = ((0, len(found) * 8),) if found[0] == 0xFF else byte_runs[found[0]]
        for bit, count in parts:
            if base + bit == end:
                end += count
                continue
            if end > 0:
                runs.append((start, end - start))
            start, end = base + bit, base + bit + count
    if end > 0:
        runs.append((start, end - start))
    return runs
