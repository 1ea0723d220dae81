"""Bus: range lookup, overlap refusal, unclaimed accesses."""

import contextlib
import logging
import sys
import threading
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_bus_access_straddling_window_end_gives_the_device_its_part():
    """`outw 0x3ff`: the chipset gives COM1 its byte (the scratch register) and no one the
    other; the access was dropped whole."""
    bus = Bus("pio")
    dev = Recorder("uart")
    bus.insert(0x3F8, 8, dev)
    bus.write(0x3FF, b"\x5a\xa5")
    assert (dev.writes, bus.read(0x3FF, 2), bus.unclaimed) == ([(7, b"\x5a")], b"\x07\xff", 2)


def test_bus_access_across_two_windows_and_a_gap_is_split_at_their_edges():
    bus = Bus("mmio")
    low, high = Recorder("low"), Recorder("high")
    bus.insert(0x1000, 4, low)
    bus.insert(0x1004, 2, high)  # adjacent; then a gap of two bytes
    bus.write(0x1002, bytes(range(8)))
    assert (low.writes, high.writes, bus.unclaimed) == ([(2, b"\x00\x01")], [(0, b"\x02\x03")], 1)
    assert bus.read(0x0FFE, 4) == b"\xff\xff\x00\x00"  # a gap, then low from its start
    assert bus.read(0x1002, 6) == b"\x02\x02\x00\x00\xff\xff"  # low, high, a gap


def test_bus_part_of_an_access_in_a_window_reaches_it_in_sizes_a_device_takes():
    """`outl 0x3fd`: three bytes are COM1's, sent as a byte and an aligned word (a 3-byte
    access frame is one a device refuses, and fails on)."""
    bus = Bus("pio")
    dev = Recorder("uart")
    bus.insert(0x3F8, 8, dev)
    bus.write(0x3FD, b"\x01\x02\x03\x04")
    assert dev.writes == [(5, b"\x01"), (6, b"\x02\x03")]


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


def test_bus_remove_frees_the_range_for_lookups_and_inserts():
    bus = Bus("mmio")
    bar = Recorder("blk0 BAR 0")
    bus.insert(0xC0000000, 0x4000, bar)
    bus.remove(0xC0000000, bar)
    bus.insert(0xC0002000, 0x1000, Recorder("other"))
    assert (bus.find(0xC0000000, 4), bus.find(0xC0002000, 4) is not None) == (None, True)


def test_bus_remove_of_another_devices_range_raises():
    bus = Bus("mmio")
    bus.insert(0xC0000000, 0x4000, Recorder("blk0 BAR 0"))
    with pytest.raises(BusError, match="0xc0000000 holds no range of rng0 BAR 0"):
        bus.remove(0xC0000000, Recorder("rng0 BAR 0"))


def test_bus_lookups_while_another_thread_moves_a_range_always_find_the_fixed_one():
    # A vCPU looks up one device while another vCPU's BAR move removes and inserts another:
    # copy-on-write means no lookup sees a half-changed map (and none takes a lock).
    bus = Bus("mmio")
    fixed, moving = Recorder("fixed"), Recorder("moving")
    bus.insert(0xC0008000, 0x1000, fixed)
    done = threading.Event()

    def mover() -> None:
        while not done.is_set():
            bus.insert(0xC0000000, 0x4000, moving)
            bus.remove(0xC0000000, moving)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: a lookup mid-change would show
    thread = threading.Thread(target=mover)
    thread.start()
    try:
        found = [bus.find(0xC0008000 + i % 0x1000, 1) for i in range(30_000)]
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert all(hit is not None and hit[0] is fixed for hit in found)


class Bytes:
    """A window's device for the model test: byte k of it reads as its address's low 7 bits;
    it records each write, and an access it is sent as part of a split one, unaligned."""

    def __init__(self, base: int, size: int) -> None:
        self.name, self.base, self.size = f"dev@{base}", base, size
        self.writes: list[tuple[int, bytes]] = []
        self.odd: list[tuple[int, int]] = []  # (offset, size) of no size a device takes

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes((self.base + offset + k) & 0x7F for k in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.writes.append((offset, data))

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.size or size not in (1, 2, 4, 8) or offset % size:
            self.odd.append((offset, size))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 48), st.integers(1, 12)), max_size=5),
    st.integers(0, 64),
    st.integers(1, 8),
)
def test_bus_split_access_matches_a_byte_by_byte_model(windows, addr, size):
    """Each byte of an access is its window's, at its offset, or reads all-ones and is written
    nowhere; a device is sent only sizes it takes, aligned, inside its window."""
    bus, devices = Bus("mmio"), []
    for base, length in windows:
        device = Bytes(base, length)
        with contextlib.suppress(BusError):  # an overlap: the model keeps the first
            bus.insert(base, length, device)
            devices.append(device)
    owner = {d.base + k: d for d in devices for k in range(d.size)}
    span = range(addr, addr + size)
    whole = addr in owner and owner[addr] is owner.get(addr + size - 1)
    data = bytes(range(0x80, 0x80 + size))
    read = bus.read(addr, size)
    bus.write(addr, data)
    written = {
        d.base + o + k: (d, v) for d in devices for o, c in d.writes for k, v in enumerate(c)
    }
    assert read == bytes(a & 0x7F if a in owner else 0xFF for a in span)
    assert written == {a: (owner[a], data[a - addr]) for a in span if a in owner}
    assert whole or all(d.odd == [] for d in devices)
    assert bus.unclaimed == (0 if all(a in owner for a in span) else 2)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 48), st.integers(1, 12)), max_size=5),
    st.integers(0, 64),
    st.sampled_from([1, 2, 4]),
    st.integers(1, 6),
)
def test_bus_repeated_access_is_its_accesses_one_after_another(windows, addr, size, count):
    """A rep ins or outs: what `count` reads or writes one by one give, counted alike,
    whether a window holds all of it, part of it or none (then in one step)."""
    buses = []
    for _ in range(2):
        bus, devices = Bus("pio"), []
        for base, length in windows:
            device = Bytes(base, length)
            with contextlib.suppress(BusError):
                bus.insert(base, length, device)
                devices.append(device)
        buses.append((bus, devices))
    (repeated, theirs), (one_by_one, ours) = buses
    data = bytes(range(0x80, 0x80 + size * count))

    read = repeated.read_repeated(addr, size, count)
    repeated.write_repeated(addr, size, data)
    expected = b"".join(one_by_one.read(addr, size) for _ in range(count))
    for i in range(0, len(data), size):
        one_by_one.write(addr, data[i : i + size])

    assert read == expected
    assert [d.writes for d in theirs] == [d.writes for d in ours]
    assert repeated.unclaimed == one_by_one.unclaimed


def test_bus_repeated_access_nowhere_is_one_step_counted_per_access():
    bus = Bus("pio")
    bus.insert(0x3F8, 8, Recorder("uart"))
    calls = []
    bus._parts = lambda *args: calls.append(args)  # type: ignore[method-assign]

    assert bus.read_repeated(0x80, 1, 4096) == b"\xff" * 4096
    bus.write_repeated(0x400, 2, bytes(2048))  # right after COM1's window: none of it there

    assert (calls, bus.unclaimed, list(bus.recent_unclaimed)) == ([], 4096 + 1024, [0x80, 0x400])
