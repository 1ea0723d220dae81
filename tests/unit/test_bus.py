"""Bus: range lookup, overlap refusal, unclaimed accesses."""

import logging
import tracemalloc

import pytest

from splitvmm.monitor.bus import RECENT_UNCLAIMED, Bus, BusError

DISTINCT = 1_000_000  # addresses a sweeping guest can touch in well under a minute


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_bus_access_in_window_gets_offset():
    bus = Bus("pio")
    dev = Recorder("uart")
    bus.insert(0x3F8, 8, dev)
    bus.write(0x3FB, b"\x03")
    assert (dev.writes, bus.read(0x3FD, 1)) == ([(3, b"\x03")], b"\x05")


def test_bus_overlapping_insert_raises_naming_both_devices():
    bus = Bus("pio")
    bus.insert(0x3F8, 8, Recorder("uart"))
    with pytest.raises(BusError, match="rtc.*overlaps uart"):
        bus.insert(0x3FF, 2, Recorder("rtc"))


def test_bus_unclaimed_read_is_all_ones_and_counted():
    bus = Bus("pio")
    assert (bus.read(0x80, 2), bus.unclaimed, list(bus.recent_unclaimed)) == (
        b"\xff\xff",
        1,
        [0x80],
    )


def test_bus_access_straddling_window_end_is_unclaimed():
    bus = Bus("pio")
    dev = Recorder("uart")
    bus.insert(0x3F8, 8, dev)
    bus.write(0x3FF, b"\x00\x00")
    assert (dev.writes, bus.unclaimed) == ([], 1)


def test_bus_million_distinct_unclaimed_addresses_keep_state_size_constant():
    bus = Bus("mmio")
    bus.read(0xC0000000, 4)  # the first access sets up what every later one reuses
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for page in range(DISTINCT // 2):
            bus.read(0xC0000000 + page * 4096, 4)
            bus.write(0xC0000000 + page * 4096 + 8, b"\x00")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, f"{DISTINCT} distinct unclaimed addresses grew the bus by {grown} bytes"
    assert (bus.unclaimed, len(bus.recent_unclaimed)) == (DISTINCT + 1, RECENT_UNCLAIMED)


def test_bus_unclaimed_log_names_count_and_latest_addresses(caplog):
    bus = Bus("mmio")
    with caplog.at_level(logging.INFO, logger="splitvmm.bus"):
        bus.read(0xE0000000, 4)
    assert caplog.messages == ["1 unclaimed mmio accesses so far, latest at 0xe0000000"]
