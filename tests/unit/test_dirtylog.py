"""monitor/dirtylog.py: the pages a live snapshot copies again, from KVM's dirty log of each RAM
slot and the devices' bitmaps, against a fake VM."""

from __future__ import annotations

import mmap

from hypothesis import given
from hypothesis import strategies as st

from splitvmm.monitor.dirtylog import DirtyTracker, dirty_runs
from splitvmm.native.mem import Region

PAGE = 4096


class FakeVm:
    """KVM_GET_DIRTY_LOG: each slot's bitmap once, then empty (KVM clears what it returns)."""

    def __init__(self, logs: dict[int, bytes]) -> None:
        self.logs, self.calls = dict(logs), []

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        self.calls.append((slot, size))
        return self.logs.pop(slot, bytes(-(-size // PAGE // 8)))


def device_log(pages: list[int], size: int = PAGE) -> mmap.mmap:
    log = mmap.mmap(-1, size)
    for page in pages:
        log[page // 8] |= 1 << (page % 8)
    return log


# Two slots around a hole, as GuestMemory makes them: RAM memfd pages 0-15 and 16-23
SLOTS = [Region(0, 16 * PAGE, 0), Region(1 << 32, 8 * PAGE, 16 * PAGE)]


def test_tracker_maps_each_slots_log_to_ram_offsets_and_merges_the_devices():
    vm = FakeVm({0: bytes([0b10, 0x80]), 1: bytes([0b11])})  # pages 1, 15; the slot's 0 and 1
    log = device_log([3, 16])
    tracker = DirtyTracker(vm, SLOTS, [log], 24 * PAGE)

    written = tracker.take()

    assert written == [(1 * PAGE, PAGE), (3 * PAGE, PAGE), (15 * PAGE, 3 * PAGE)]
    assert log[:] == bytes(PAGE)  # taken: the device's marks begin again


def test_tracker_start_reads_kvms_logs_so_they_begin_then_and_keeps_the_devices():
    """start() empties KVM's logs (writes before it are the first pass's to copy); a device's
    bitmap is cleared only by take(), in the pause: the module docstring."""
    vm = FakeVm({0: bytes([0xFF, 0xFF]), 1: bytes([0xFF])})
    log = device_log([5])
    tracker = DirtyTracker(vm, SLOTS, [log], 24 * PAGE)

    tracker.start()

    assert vm.calls == [(0, 16 * PAGE), (1, 8 * PAGE)]
    assert tracker.take() == [(5 * PAGE, PAGE)]


def test_tracker_ignores_a_device_bitmaps_bits_past_the_end_of_ram():
    """A device bitmap is whole pages of bits; the bits past the RAM's pages map nothing."""
    tracker = DirtyTracker(FakeVm({}), SLOTS, [device_log([23, 24, 1000])], 24 * PAGE)

    assert tracker.take() == [(23 * PAGE, PAGE)]


@given(st.binary(max_size=64))
def test_dirty_runs_are_the_runs_of_set_bits(bitmap: bytes) -> None:
    bits = [bitmap[i // 8] >> (i % 8) & 1 for i in range(len(bitmap) * 8)]
    expected, start = [], None
    for i, bit in enumerate([*bits, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            expected.append((start, i - start))
            start = None

    assert dirty_runs(bitmap) == expected


def test_tracker_between_passes_keeps_what_was_not_copied_for_the_pause():
    """written() reads KVM's logs (which begin again) and the devices' bitmaps without
    clearing them; what the vCPUs wrote stays owed until copying() says it is copied now,
    and the pause's take() gives it with the rest."""
    vm = FakeVm({0: bytes([0b100])})  # the vCPUs wrote page 2
    log = device_log([20])
    tracker = DirtyTracker(vm, SLOTS, [log], 24 * PAGE)

    assert tracker.written() == [(2 * PAGE, PAGE), (20 * PAGE, PAGE)]  # not copied: owed
    vm.logs[0] = bytes([0b1000])  # then page 3
    assert tracker.written() == [(2 * PAGE, 2 * PAGE), (20 * PAGE, PAGE)]
    tracker.copying()  # pages 2, 3 and 20 copied now, the VM running
    assert log[:] != bytes(PAGE)  # the device's marks stay until it or the pause clears them
    vm.logs[1] = bytes([0b1])  # page 16, during that pass

    assert tracker.take() == [(16 * PAGE, PAGE), (20 * PAGE, PAGE)]
