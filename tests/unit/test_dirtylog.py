"""monitor/dirtylog.py: the pages a live snapshot copies again, from KVM's dirty log of each RAM
slot and the devices' bitmaps, against a fake VM."""

from __future__ import annotations

import mmap

from splitvmm.monitor.dirtylog import DirtyTracker
from splitvmm.native.mem import Region

PAGE = 4096


class FakeVm:
    """KVM_GET_DIRTY_LOG: each slot's bitmap once, then empty (KVM clears what it returns)."""

    def __init__(self, logs: dict[int, bytes]) -> None:
        self.logs, self.calls = dict(logs), []

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        self.calls.append((slot, size))
        return self.logs.pop(slot, bytes(-(-size // PAGE // 8)))


def device_log(pages: list[int], harvest: tuple[int, ...] = (), size: int = PAGE) -> mmap.mmap:
    """A device's dirty log memfd as the monitor maps it: its live bitmap (`pages` marked),
    then its harvest (`harvest` marked), `size` bytes each."""
    log = mmap.mmap(-1, 2 * size)
    for base, marked in ((0, pages), (size, harvest)):
        for page in marked:
            log[base + page // 8] |= 1 << (page % 8)
    return log


def live(log: mmap.mmap) -> bytes:
    return log[: len(log) // 2]


def harvest(log: mmap.mmap) -> bytes:
    return log[len(log) // 2 :]


# Two slots around a hole, as GuestMemory makes them: RAM memfd pages 0-15 and 16-23
SLOTS = [Region(0, 16 * PAGE, 0), Region(1 << 32, 8 * PAGE, 16 * PAGE)]


def test_tracker_maps_each_slots_log_to_ram_offsets_and_merges_the_devices():
    """The pause's take(): the vCPUs' pages, and a device's live bitmap and harvest, whether it
    answered harvest_dirty or not (it is quiesced now); all of them begin again."""
    vm = FakeVm({0: bytes([0b10, 0x80]), 1: bytes([0b11])})  # pages 1, 15; the slot's 0 and 1
    log = device_log([3, 16], harvest=(7,))
    tracker = DirtyTracker(vm, SLOTS, {"blk0": log}, 24 * PAGE)

    written = tracker.take()

    assert written == [(1 * PAGE, PAGE), (3 * PAGE, PAGE), (7 * PAGE, PAGE), (15 * PAGE, 3 * PAGE)]
    assert log[:] == bytes(2 * PAGE)  # taken: the device's marks begin again


def test_tracker_start_begins_kvms_logs_and_the_marks_of_the_devices_that_harvested():
    """start() empties KVM's logs (writes before it are the first pass's to copy) and the
    harvests of the devices that have just answered harvest_dirty; a device that did not
    answer keeps its marks, live and harvested (it may harvest them still), for the pause."""
    vm = FakeVm({0: bytes([0xFF, 0xFF]), 1: bytes([0xFF])})
    answered, silent = device_log([10], harvest=(5,)), device_log([9], harvest=(6,))
    tracker = DirtyTracker(vm, SLOTS, {"blk0": answered, "net0": silent}, 24 * PAGE)

    tracker.start({"blk0", "serial0"})  # serial0: a device without guest RAM has no log

    assert vm.calls == [(0, 16 * PAGE), (1, 8 * PAGE)]
    assert harvest(answered) == bytes(PAGE) and harvest(silent) != bytes(PAGE)
    assert tracker.take() == [(6 * PAGE, PAGE), (9 * PAGE, 2 * PAGE)]


def test_tracker_ignores_a_device_bitmaps_bits_past_the_end_of_ram():
    """A device bitmap is whole pages of bits; the bits past the RAM's pages map nothing."""
    log = device_log([23, 24, 1000], harvest=(25, 2000))
    tracker = DirtyTracker(FakeVm({}), SLOTS, {"blk0": log}, 24 * PAGE)

    assert tracker.take() == [(23 * PAGE, PAGE)]


def test_tracker_between_passes_keeps_what_was_not_copied_for_the_pause():
    """written() reads KVM's logs (which begin again) and the harvests of the devices that
    have just answered harvest_dirty (cleared); what it said stays owed until copying() says
    it is copied now, and the pause's take() gives it with the rest."""
    vm = FakeVm({0: bytes([0b100])})  # the vCPUs wrote page 2
    log = device_log([21], harvest=(20,))  # the device harvested page 20, then wrote page 21
    tracker = DirtyTracker(vm, SLOTS, {"blk0": log}, 24 * PAGE)

    assert tracker.written({"blk0"}) == [(2 * PAGE, PAGE), (20 * PAGE, PAGE)]  # not copied: owed
    assert harvest(log) == bytes(PAGE) and live(log) != bytes(PAGE)  # its own, until it harvests
    vm.logs[0] = bytes([0b1000])  # then page 3
    assert tracker.written(set()) == [(2 * PAGE, 2 * PAGE), (20 * PAGE, PAGE)]
    tracker.copying()  # pages 2, 3 and 20 copied now, the VM running
    vm.logs[1] = bytes([0b1])  # page 16, during that pass

    assert tracker.take() == [(16 * PAGE, PAGE), (21 * PAGE, PAGE)]


def test_tracker_reads_no_harvest_of_a_device_that_did_not_answer():
    """A device that did not answer harvest_dirty (slow, or its answer given up) may move its
    marks into its harvest at any time still: read and cleared by us meanwhile, a mark it
    added between our read and our clear would be lost. It is left to the pause."""
    vm = FakeVm({})
    slow, quick = device_log([], harvest=(4,)), device_log([], harvest=(8,))
    tracker = DirtyTracker(vm, SLOTS, {"blk0": slow, "net0": quick}, 24 * PAGE)

    assert tracker.written({"net0"}) == [(8 * PAGE, PAGE)]
    tracker.copying()

    assert harvest(slow) != bytes(PAGE)
    assert tracker.take() == [(4 * PAGE, PAGE)]
