"""A live snapshot of a VM that tracks its dirty pages, through the coordinator's real _write and
the real writer: RAM copied first while the VM runs, the VM stopped inside the copy, then what
was written meanwhile (monitor/dirtylog.py, snapshot/ram.py sparse-v2). The VM and its state
saves are fakes (tests/unit/test_coordinator_commit.py)."""

from __future__ import annotations

import errno
import mmap
import time
from collections.abc import Iterator

import pytest

from splitvmm.devprocs.virtio.guestram import GuestRam
from splitvmm.errors import DeviceFailure, KvmError
from splitvmm.monitor import coordinator as coordinator_module
from splitvmm.monitor import vmstate
from splitvmm.monitor.control import ControlError
from splitvmm.monitor.dirtylog import DirtyTracker
from splitvmm.monitor.memory import GuestMemory
from splitvmm.monitor.platform import AcpiGed
from splitvmm.native.mem import Region
from splitvmm.protocol.dirtybits import dirty_log_size
from splitvmm.record import field
from splitvmm.snapshot import Snapshot, SnapshotError
from splitvmm.snapshot import ram as ram_module
from tests.unit.snapshot_support import CPUID, PAGE, VCPU, VM, VM_CONFIG, memory
from tests.unit.test_coordinator_commit import FakeSlot, coordinator


class FakeTracker:
    """Says the guest wrote page `page` while the first pass ran (written at take(), which
    comes once the VM is stopped: as if just before)."""

    def __init__(self, events: list[str], mem: GuestMemory, page: int = 0x5000) -> None:
        self.events, self.mem, self.page = events, mem, page

    def start(self, harvested: set[str]) -> None:
        self.events.append("log start")

    def take(self) -> list[tuple[int, int]]:
        self.events.append("take")
        self.mem.map[self.page : self.page + PAGE] = b"\x77" * PAGE
        return [(self.page, PAGE)]

    def written(self, harvested: set[str]) -> list[tuple[int, int]]:
        self.events.append("written")
        return []

    def copying(self) -> None:
        self.events.append("copying")


class Busy(FakeTracker):
    """A guest that writes `sizes[i]` bytes during pass i + 1 (from page 0x100 on)."""

    def __init__(self, events: list[str], mem: GuestMemory, sizes: list[int]) -> None:
        super().__init__(events, mem)
        self.sizes = sizes

    def written(self, harvested: set[str]) -> list[tuple[int, int]]:
        self.events.append("written")
        return [(0x100 * PAGE, self.sizes.pop(0))]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = memory()
    yield m
    m.close()


def live(tmp_path, monkeypatch, mem):
    """A coordinator whose VM tracks its dirty pages; its events."""
    coord, events = coordinator(tmp_path, monkeypatch)
    monkeypatch.undo()  # the real _write
    m = coord.machine
    m.mem, m.vm, m.kvm, m.firmware_id, m.ged = mem, None, None, None, AcpiGed(lambda: None)
    m.functions, m.routes, m.config_ports = [], None, None
    m.dirty_tracker = lambda: FakeTracker(events, mem)
    monkeypatch.setattr(coordinator_module, "config_to_dict", lambda cfg: VM_CONFIG)
    monkeypatch.setattr(vmstate, "save_vm", lambda vm, firmware, ged_events: "vm")
    monkeypatch.setattr(vmstate.VcpuHost, "probe", staticmethod(lambda kvm, vm: None))
    monkeypatch.setattr(vmstate, "save_vcpu", lambda fd, host: "vcpu")
    monkeypatch.setattr(
        vmstate, "to_dict", lambda s: dict(VM) if s == "vm" else dict(VCPU, cpuid=CPUID)
    )
    monkeypatch.setattr(coordinator_module.pcistate, "save", lambda *args: {})
    return coord, events


def test_live_snapshot_copies_first_then_stops_and_holds_memory_as_it_was_stopped(
    tmp_path, monkeypatch, mem
):
    coord, events = live(tmp_path, monkeypatch, mem)

    coord.snapshot(tmp_path / "snap")

    assert events[:4] == ["log start", "written", "pause", "take"] and not coord.paused
    snap = Snapshot.open(tmp_path / "snap")
    snap.verify()
    fresh = memory(pages={})
    snap.load_ram(fresh)
    assert (snap.ram_chunk.encoding, fresh.map[:] == mem.map[:]) == ("sparse-v2", True)
    assert snap.manifest.cpuid == CPUID
    fresh.close()


def test_live_snapshot_has_each_device_harvest_its_marks_before_the_first_pass(
    tmp_path, monkeypatch, mem, caplog
):
    """What a device wrote before the first pass is in it: its marks since the VM started
    would only lengthen the pause. One that cannot harvest them keeps them (more to copy in
    the pause, nothing lost), and the snapshot goes on; the tracker is told who answered."""
    coord, events = live(tmp_path, monkeypatch, mem)
    blk, net = Unharvesting("blk0"), Slot("net0")
    coord.machine.slots = [blk, net]
    started: list[object] = []
    coord.machine.dirty_tracker = lambda: Started(events, mem, started, [blk, net])

    coord.snapshot(tmp_path / "snap")

    # both asked before the log began
    assert started == [["harvest_dirty"], ["harvest_dirty"], {"net0"}]
    assert "device blk0 keeps its dirty marks" in caplog.text


def test_live_snapshot_harvesting_marks_leaves_the_pause_its_whole_device_deadline(
    tmp_path, monkeypatch, mem
):
    """The devices' harvests come while the VM runs: one slow to answer there (a host I/O
    call) must not leave the quiesce, save and resume in the pause less of their deadline."""
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.device_deadline_s = 0.2
    coord.machine.slots = [SlowToHarvest("blk0")]

    coord.snapshot(tmp_path / "snap")

    harvests = ["harvest_dirty"] * 2  # before the first pass, and before the look for another
    assert coord.machine.slots[0].ops == [*harvests, "quiesce", "save", "resume"]


def test_live_snapshot_asks_no_device_to_harvest_with_too_little_time_left(
    tmp_path, monkeypatch, mem
):
    """A device slow to harvest (a host I/O call) used most of the round's deadline: the next
    is not asked with what is left, as one that missed that timeout would be failed (its
    on_crash policy: the VM stopped, by default) for a request the snapshot can do without.
    It keeps its marks for the pause."""
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.device_deadline_s = 0.6  # 0.3 s left after the first device's answer
    coord.machine.slots = [SlowToHarvest("blk0"), Slot("net0")]

    coord.snapshot(tmp_path / "snap")

    assert coord.machine.slots[1].ops == ["quiesce", "save", "resume"]


class SlowToHarvest(FakeSlot):
    model: str = "serial"

    def control(self, op: str, timeout_ms: int) -> dict[str, object]:
        if op == "harvest_dirty":
            time.sleep(0.3)  # past the whole deadline of 0.2 s
        return super().control(op, timeout_ms)


class Slot(FakeSlot):
    model: str = "serial"  # what the writer files its (empty) state under


class Unharvesting(Slot):
    def control(self, op: str, timeout_ms: int) -> dict[str, object]:
        result = super().control(op, timeout_ms)
        if op == "harvest_dirty":
            raise DeviceFailure(f"device {self.name}: did not answer harvest_dirty")
        return result


class Started(FakeTracker):
    """Notes what each slot was asked when the tracker starts."""

    def __init__(self, events, mem, started, slots) -> None:
        super().__init__(events, mem)
        self.started, self.slots = started, slots

    def start(self, harvested: set[str]) -> None:
        self.started.extend(list(slot.ops) for slot in self.slots)
        self.started.append(harvested)
        super().start(harvested)


@pytest.mark.parametrize(
    ("sizes", "passes_running"),
    [
        ([1 << 20], 1),  # little enough for the pause at once
        ([6 << 20, 2 << 20], 2),  # too much, then little enough: one more pass
        ([6 << 20, 5 << 20], 2),  # not shrinking by half: the pause takes it
        ([12 << 20, 5 << 20], 3),  # the most passes the format takes, then the pause
    ],
    ids=["small", "converges", "not-shrinking", "at-most"],
)
def test_live_snapshot_copies_again_while_running_as_long_as_what_comes_shrinks(
    tmp_path, monkeypatch, sizes, passes_running
):
    """A pass is made again, the VM running, of what the guest wrote during the one before
    while that is more than the pause should copy (PAUSE_COPY_BYTES) and under half of it;
    the pause copies the rest. The first pass here held 40 MiB."""
    mem = memory(64 << 20, {offset: b"\x01" for offset in range(0, 40 << 20, PAGE)})
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.machine.dirty_tracker = lambda: Busy(events, mem, sizes)

    coord.snapshot(tmp_path / "snap")

    assert events.count("copying") == passes_running - 1
    assert events.count("written") == min(passes_running, ram_module.MAX_PASSES - 2)
    assert events.index("pause") > len(events) - 1 - events[::-1].index("written")
    snap = Snapshot.open(tmp_path / "snap")
    snap.verify()
    mem.close()


def test_live_snapshot_has_each_device_harvest_its_marks_before_each_look_at_the_log(
    tmp_path, monkeypatch
):
    """Each look for another pass, the VM running, asks the devices first: what a pass
    copies of theirs is what they wrote since the pass before began."""
    mem = memory(64 << 20, {offset: b"\x01" for offset in range(0, 40 << 20, PAGE)})
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.machine.slots = [Slot("blk0")]
    coord.machine.dirty_tracker = lambda: Busy(events, mem, [12 << 20, 5 << 20])

    coord.snapshot(tmp_path / "snap")

    harvests = ["harvest_dirty"] * 3  # the first pass, then two looks (MAX_PASSES)
    assert coord.machine.slots[0].ops == [*harvests, "quiesce", "save", "resume"]
    mem.close()


class Writing(Slot):
    """A virtio device's slot whose process serves guest requests into RAM (`ram`, its own
    view, with its dirty log) between answers: `writes[k]` (offset, length) right after its
    kth harvest, each filled with a byte of its own."""

    ram: object = None
    writes: list[tuple[int, int]] = field(default_factory=list)

    def control(self, op: str, timeout_ms: int) -> dict[str, object]:
        result = super().control(op, timeout_ms)
        if op == "harvest_dirty":
            self.ram.harvest_dirty()
            if self.writes:
                offset, length = self.writes.pop(0)
                self.ram.write(offset, bytes([0xA0 + len(self.writes)]) * length)
        return result


class Taking(DirtyTracker):
    """The real tracker; notes what the pause copies."""

    taken: list[tuple[int, int]] = []

    def take(self) -> list[tuple[int, int]]:
        self.taken = super().take()
        return self.taken


def test_live_snapshot_pause_copies_only_what_a_device_wrote_since_the_last_pass(
    tmp_path, monkeypatch
):
    """A guest reading its disk while its RAM is copied: the device writes 12 MiB during the
    first pass, 5 during the second, 2 during the third. Each pass copies what it wrote
    during the one before, and the pause the last 2 MiB, not all 19 (the marks it kept since
    the first pass, before harvest_dirty). Nothing is lost: the snapshot holds RAM as it was
    at the pause, with every page the device wrote."""
    size, mib = 64 << 20, 1 << 20
    mem = memory(size, {offset: b"\x01" for offset in range(0, 40 * mib, PAGE)})
    log = mmap.mmap(-1, dirty_log_size(size))
    coord, events = live(tmp_path, monkeypatch, mem)
    device_ram = GuestRam(mem.map, log, [[0, size, 0]])
    writes = [(40 * mib, 12 * mib), (52 * mib, 5 * mib), (57 * mib, 2 * mib)]
    coord.machine.slots = [Writing("blk0", ram=device_ram, writes=writes)]
    tracker = Taking(NoVcpuWrites(), [Region(0, size, 0)], {"blk0": log}, size)
    coord.machine.dirty_tracker = lambda: tracker

    coord.snapshot(tmp_path / "snap")

    assert tracker.taken == [(57 * mib, 2 * mib)]
    snap = Snapshot.open(tmp_path / "snap")
    snap.verify()
    fresh = memory(size, pages={})
    snap.load_ram(fresh)
    assert fresh.map[:] == mem.map[:]
    device_ram.close()
    for m in (fresh, mem):
        m.close()


class NoVcpuWrites:
    """KVM_GET_DIRTY_LOG of a VM whose vCPUs write nothing."""

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        return bytes(-(-size // PAGE // 8))


class Watching(FakeTracker):
    """Notes whether the coordinator says it is snapshotting (its devices asked nothing
    else: Machine._counters) as the passes run and as the pause takes the rest."""

    def __init__(self, events, mem, coord) -> None:
        super().__init__(events, mem)
        self.coord, self.seen = coord, []

    def written(self, harvested: set[str]) -> list[tuple[int, int]]:
        self.seen.append(("running", self.coord.snapshotting))
        return super().written(harvested)

    def take(self) -> list[tuple[int, int]]:
        self.seen.append(("paused", self.coord.snapshotting))
        return super().take()


def test_live_snapshot_devices_may_be_asked_their_counters_until_the_pause(
    tmp_path, monkeypatch, mem
):
    """While the copy runs with the VM (seconds for a large guest), `ctl devices` shows the
    devices' counters as at any other time; once they are quiesced, it asks them nothing."""
    coord, events = live(tmp_path, monkeypatch, mem)
    tracker = Watching(events, mem, coord)
    coord.machine.dirty_tracker = lambda: tracker

    coord.snapshot(tmp_path / "snap")

    assert tracker.seen == [("running", False), ("paused", True)]
    assert coord.snapshotting is False  # the VM runs on


def test_live_snapshot_failing_in_its_first_pass_never_paused_and_leaves_nothing(
    tmp_path, monkeypatch, mem
):
    coord, events = live(tmp_path, monkeypatch, mem)

    def full(fd: int, size: int) -> list[tuple[int, int]]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ram_module, "data_extents", full)
    with pytest.raises(SnapshotError, match="chunk ram: No space left on device"):
        coord.snapshot(tmp_path / "snap")

    assert ("pause" in events, coord.paused) == (False, False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_live_snapshot_whose_vcpu_save_fails_says_so_not_the_ram_chunk(tmp_path, monkeypatch, mem):
    """The vCPUs are saved inside the RAM copy's stop(): the RAM writer, which names its
    chunk in an OSError, must not take a KVM ioctl's failure for its own."""
    coord, events = live(tmp_path, monkeypatch, mem)

    def fails(fd: object, host: object) -> None:
        raise KvmError(errno.EINVAL, "KVM_GET_XSAVE")

    monkeypatch.setattr(vmstate, "save_vcpu", fails)
    with pytest.raises(KvmError) as raised:
        coord.snapshot(tmp_path / "snap")

    assert "chunk ram" not in str(raised.value) and "KVM_GET_XSAVE" in str(raised.value)
    assert (events.count("pause"), events.count("resume"), coord.paused) == (1, 1, False)


def test_live_snapshot_of_a_vm_that_stops_during_its_first_pass_ends_there(
    tmp_path, monkeypatch, mem
):
    """The first pass of a large guest takes seconds: a VM that stops meanwhile (a power-off,
    a failed device) does not wait for the rest of a copy nobody will use."""
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.machine.stopping = True  # as it comes while the copy runs

    with pytest.raises(ControlError, match="stopped while it was saved"):
        coord.snapshot(tmp_path / "snap")

    assert ("pause" in events, coord.paused) == (False, False)


class StopsDuringPass(Busy):
    """A busy guest whose VM stops (a power-off, a failed device) as a pass made while it
    runs begins."""

    def __init__(self, events, mem, sizes, machine) -> None:
        super().__init__(events, mem, sizes)
        self.machine = machine

    def copying(self) -> None:
        super().copying()
        self.machine.stopping = True


def test_live_snapshot_of_a_vm_that_stops_during_a_later_pass_ends_there(tmp_path, monkeypatch):
    """A pass made again while the VM runs holds up to half of its RAM: a VM that stops
    meanwhile does not wait for the rest of it, as in the first pass."""
    mem = memory(64 << 20, {offset: b"\x01" for offset in range(0, 40 << 20, PAGE)})
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.machine.dirty_tracker = lambda: StopsDuringPass(
        events, mem, [12 << 20, 1 << 20], coord.machine
    )

    with pytest.raises(ControlError) as raised:
        coord.snapshot(tmp_path / "snap")

    # not the rest of its 12 MiB, then another look at the log, then a pause refused
    assert events.count("written") == 1
    assert "stopped while it was saved" in str(raised.value) and not coord.paused
    mem.close()


class DirtyLogFails(FakeTracker):
    """KVM_GET_DIRTY_LOG fails at `read`: between the passes, or in the pause."""

    def __init__(self, events: list[str], mem: GuestMemory, read: str) -> None:
        super().__init__(events, mem)
        self.read = read

    def written(self, harvested: set[str]) -> list[tuple[int, int]]:
        self._fails("written")
        return super().written(harvested)

    def take(self) -> list[tuple[int, int]]:
        self._fails("take")
        return super().take()

    def _fails(self, read: str) -> None:
        if read == self.read:
            raise KvmError(errno.EINVAL, "KVM_GET_DIRTY_LOG")


@pytest.mark.parametrize("read", ["written", "take"])
def test_live_snapshot_whose_dirty_log_read_fails_says_so_not_the_ram_chunk(
    tmp_path, monkeypatch, mem, read
):
    """KVM's dirty log is read inside the RAM copy, between its passes and in the pause: the
    RAM writer, which names its chunk in an OSError, must not take that ioctl's failure for
    its own."""
    coord, events = live(tmp_path, monkeypatch, mem)
    coord.machine.dirty_tracker = lambda: DirtyLogFails(events, mem, read)

    with pytest.raises(KvmError) as raised:
        coord.snapshot(tmp_path / "snap")

    assert "chunk ram" not in str(raised.value) and "KVM_GET_DIRTY_LOG" in str(raised.value)
    assert coord.paused is False
