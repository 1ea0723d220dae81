"""Bus: range lookup, overlap refusal, unclaimed accesses."""

import pytest

from splitvmm.monitor.bus import Bus, BusError


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
    assert (bus.read(0x80, 2), bus.unclaimed[0x80]) == (b"\xff\xff", 1)


def test_bus_access_straddling_window_end_is_unclaimed():
    bus = Bus("pio")
    dev = Recorder("uart")
    bus.insert(0x3F8, 8, dev)
    bus.write(0x3FF, b"\x00\x00")
    assert (dev.writes, bus.unclaimed[0x3FF]) == ([], 1)
