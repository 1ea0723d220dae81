"""Write-behind (monitor/writebehind.py) and KVM's ring of coalesced writes that it reads
(native/coalesced.py), against a ring page this test fills as KVM does, a fake VM that records
the zones it is given, and fake devices. tests/integration/test_native_kvm.py has the ring
filled by KVM itself; tests/integration/test_guests.py a guest through `splitvmm up`."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from splitvmm.errors import KvmError
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import MAX_AHEAD, DeviceSlot, SlotState, Spawn
from splitvmm.monitor.vcpu import VcpuThread, install_kick_handler
from splitvmm.monitor.writebehind import HELD_BATCH, WriteBehind, Zone, kernel_holds_rep_outs_once
from splitvmm.native.coalesced import (
    DATA_OFFSET,
    DATA_SIZE,
    ENTRIES_OFFSET,
    ENTRY_SIZE,
    LEN_OFFSET,
    CoalescedRing,
)
from splitvmm.native.exits import INTERRUPTED, PioIn, PioOut
from splitvmm.protocol import wire
from splitvmm.protocol.models import MODELS

PAGE = 2  # the ring's page in a vCPU's mapping, as KVM_CAP_COALESCED_MMIO says on x86
COM1, COM2 = 0x3F8, 0x2F8
DEADLINE_S = 5.0


class Kernel:
    """Writes the ring page the way KVM's coalesced_mmio_write() does: the entry, then last."""

    def __init__(self) -> None:
        self.mapping = mmap.mmap(-1, (PAGE + 1) * mmap.PAGESIZE)
        self.base = PAGE * mmap.PAGESIZE
        self.size = (mmap.PAGESIZE - ENTRIES_OFFSET) // ENTRY_SIZE

    def index(self, which: int) -> int:
        at = self.base + 4 * which
        return int.from_bytes(self.mapping[at : at + 4], "little")

    def write(self, port: int, data: bytes) -> None:
        first, last = self.index(0), self.index(1)
        if (first - last - 1) % self.size == 0:
            raise AssertionError("the ring is full: KVM would exit instead")
        at = self.base + ENTRIES_OFFSET + last * ENTRY_SIZE
        self.mapping[at : at + 8] = port.to_bytes(8, "little")
        self.mapping[at + LEN_OFFSET : at + LEN_OFFSET + 4] = len(data).to_bytes(4, "little")
        self.mapping[at + DATA_OFFSET : at + DATA_OFFSET + len(data)] = data
        self.set_index(1, (last + 1) % self.size)

    def set_index(self, which: int, value: int) -> None:
        at = self.base + 4 * which
        self.mapping[at : at + 4] = value.to_bytes(4, "little")


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    yield k
    k.mapping.close()


@pytest.fixture
def ring(kernel: Kernel) -> Iterator[CoalescedRing]:
    r = CoalescedRing(kernel.mapping, PAGE)
    yield r
    r.close()


# -- the ring ------------------------------------------------------------------------------
def test_ring_take_gives_each_write_once_in_order(kernel, ring):
    for i, data in enumerate((b"a", b"bc", b"defg")):
        kernel.write(COM1 + i, data)
    assert ring.pending() == 3
    assert ring.take() == [(COM1, b"a"), (COM1 + 1, b"bc"), (COM1 + 2, b"defg")]
    assert (ring.pending(), ring.take(), kernel.index(0)) == (0, [], 3)


def test_ring_take_follows_the_ring_around_its_end(kernel, ring):
    start = ring.size - 2
    kernel.set_index(0, start)
    kernel.set_index(1, start)
    for byte in b"wxyz":
        kernel.write(COM1, bytes([byte]))
    assert (ring.pending(), [d for _, d in ring.take()], kernel.index(0)) == (
        4,
        [b"w", b"x", b"y", b"z"],
        2,
    )


def test_ring_with_an_index_past_its_end_raises(kernel, ring):
    kernel.set_index(1, ring.size + 3)
    with pytest.raises(ValueError, match="not below"):
        ring.take()


@pytest.mark.parametrize("length", [0, DATA_SIZE + 1, 1 << 31])
def test_ring_entry_of_a_length_no_port_write_has_raises(kernel, ring, length):
    kernel.write(COM1, b"a")
    at = kernel.base + ENTRIES_OFFSET + LEN_OFFSET
    kernel.mapping[at : at + 4] = length.to_bytes(4, "little")
    with pytest.raises(ValueError, match=f"coalesced write of {length} bytes at port 0x3f8"):
        ring.take()


def test_ring_page_outside_the_mapping_is_refused(kernel):
    with pytest.raises(ValueError, match="outside"):
        CoalescedRing(kernel.mapping, PAGE + 1)


# -- delivery --------------------------------------------------------------------------------
class Device:
    """A slot's write-behind calls, recorded; read_held answers `answer`, its mirror says IER
    is `ier`; write_many may wait on `gate` (a delivery in progress)."""

    def __init__(self, name: str, answer: bytes | None = b"\x60", ier: int | None = 0) -> None:
        self.name = name
        self.answer = answer
        self.ier = ier  # None: no MIRROR yet (a process just restarted)
        self.lcr = 0
        self.asked: list[list[int]] = []  # the offsets of each mirrored_values()
        self.asking: Callable[[], None] | None = None  # what happens while it is asked
        self.runs: list[list[tuple[int, bytes]]] = []
        self.reads: list[tuple[int, int, int, int]] = []
        self.gate: threading.Event | None = None
        self.delivering = threading.Event()

    def read_held(self, offset: int, size: int, held: int, held_at: int) -> bytes | None:
        self.reads.append((offset, size, held, held_at))
        return self.answer

    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self.delivering.set()
        if self.gate is not None:
            self.gate.wait(DEADLINE_S)
        self.runs.append(list(writes))

    def mirrored_values(self, offsets: Sequence[int]) -> list[bytes] | None:
        self.asked.append(list(offsets))
        registers = {IER: self.ier, LCR: self.lcr}
        values = [registers.get(o) for o in offsets]
        if self.asking is not None:  # after the values are read: they are the older ones
            self.asking()
        if any(v is None for v in values):
            return None
        return [bytes([v]) for v in values if v is not None]


class Vm:
    """What write-behind asks of the VM: its zones, recorded; `refuse` fails a register."""

    def __init__(self, refuse: int | None = None) -> None:
        self.zones: set[tuple[int, int]] = set()
        self.calls: list[str] = []
        self.refuse = refuse

    def register_coalesced_pio(self, port: int, size: int) -> None:
        self.calls.append(f"register {port:#x}")
        if port == self.refuse:
            raise KvmError(22, "KVM_REGISTER_COALESCED_MMIO")
        self.zones.add((port, size))

    on_unregister: Callable[[], None] | None = None  # what KVM does during the grace period

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        self.calls.append(f"unregister {port:#x}")
        self.zones.remove((port, size))
        if self.on_unregister is not None:
            self.on_unregister()


IER, LCR, LSR, THRI, DLAB = 1, 3, 5, 0x02, 0x80
Failures = list[str]


def make(
    ring: CoalescedRing,
    vm: Vm,
    *devices: Device,
    tick_s: float = 60.0,
    idle_ticks: int = 50,
    failures: Failures | None = None,
) -> WriteBehind:
    """THR of a UART at COM1 (and COM2) for each device, in order, wanted while THRI is off."""
    when = ((IER, THRI, 0),)
    zones = [Zone(b, 1, d, b, 8, when) for b, d in zip((COM1, COM2), devices, strict=False)]
    fail = (failures if failures is not None else []).append
    return WriteBehind(vm, ring, zones, fail, tick_s=tick_s, idle_ticks=idle_ticks)  # type: ignore[arg-type]


def served(held: WriteBehind, port: int, size: int | None = None) -> bytes | None:
    """An exit at `port` as a vCPU serves it (vcpu.py), with nothing of its own to do: with
    `size`, a read, whose answer from the mirror this is (None: the read goes to the device)."""
    with held.serving(port, size) as answer:
        return answer


def test_flush_hands_each_device_its_writes_in_order_one_call_each(kernel, ring):
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    for port, data in ((COM1, b"a"), (COM1, b"b"), (COM2, b"x"), (COM1, b"c")):
        kernel.write(port, data)

    held.flush()

    assert com1.runs == [[(0, b"a"), (0, b"b"), (0, b"c")]]
    assert com2.runs == [[(0, b"x")]]
    assert (ring.pending(), held.collected) == (0, 4)


def test_flush_skips_a_write_at_a_port_no_zone_has(kernel, ring, caplog):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    kernel.write(0x80, b"?")
    kernel.write(COM1, b"a")
    held.flush()
    assert com1.runs == [[(0, b"a")]]
    assert "no device registered" in caplog.text


def test_access_to_a_device_delivers_its_writes_and_no_other_devices(kernel, ring):
    """Posted writes to two device processes were never ordered with each other: a device
    slow to take its writes holds up only accesses to itself."""
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    kernel.write(COM1, b"a")
    kernel.write(COM2, b"x")

    served(held, COM2 + IER)

    assert (com1.runs, com2.runs) == ([], [[(0, b"x")]])


def test_read_of_the_device_holding_the_writes_asks_its_mirror_with_them_counted(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    kernel.write(COM1, b"b")

    assert served(held, COM1 + LSR, 1) == b"\x60"
    assert (com1.reads, com1.runs) == ([(LSR, 1, 2, 0)], [])
    held.flush()
    assert com1.runs == [[(0, b"a"), (0, b"b")]]  # still held until then


def test_read_with_one_port_registered_counts_the_writes_in_the_ring_and_leaves_them(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)  # COM1's THR alone: every write in the ring is com1's
    kernel.write(COM1, b"a")
    kernel.write(COM1, b"b")
    assert served(held, COM1 + LSR, 1) == b"\x60"
    assert (ring.pending(), held.collected) == (2, 0)
    held._collect()  # the flusher's look moves them to com1's queue
    kernel.write(COM1, b"c")
    assert served(held, COM1 + LSR, 1) == b"\x60"
    assert com1.reads == [(LSR, 1, 2, 0), (LSR, 1, 3, 0)]  # queued and in the ring, together
    served(held, COM1 + IER)
    assert (com1.runs, ring.pending()) == ([[(0, b"a"), (0, b"b"), (0, b"c")]], 0)


def test_read_with_two_devices_registered_counts_only_its_own_writes(kernel, ring):
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    for port, data in ((COM2, b"x"), (COM1, b"a"), (COM2, b"y")):
        kernel.write(port, data)
    assert served(held, COM1 + LSR, 1) == b"\x60"
    assert (com1.reads, ring.pending(), held.collected) == ([(LSR, 1, 1, 0)], 0, 3)
    held.flush()
    assert (com1.runs, com2.runs) == ([[(0, b"a")]], [[(0, b"x"), (0, b"y")]])


def test_read_the_mirror_cannot_answer_comes_after_the_writes(kernel, ring):
    com1 = Device("com1", answer=None)
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    assert (served(held, COM1 + LSR, 1), com1.runs) == (None, [[(0, b"a")]])


def test_read_with_nothing_held_is_left_to_the_usual_way(ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    assert (served(held, COM1 + LSR, 1), com1.reads) == (None, [])


def test_read_with_writes_at_two_offsets_held_delivers_them(kernel, ring):
    com1 = Device("com1")
    zones = [Zone(COM1, 2, com1, COM1, 8)]  # THR and IER both write-behind
    held = WriteBehind(Vm(), ring, zones, [].append)  # type: ignore[arg-type]
    kernel.write(COM1, b"a")
    kernel.write(COM1 + 1, b"\x00")
    assert (served(held, COM1 + LSR, 1), com1.reads) == (None, [])
    assert com1.runs == [[(0, b"a"), (1, b"\x00")]]


def test_read_with_a_batch_held_is_not_answered_so_the_vcpu_delivers_it(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    for _ in range(HELD_BATCH):
        kernel.write(COM1, b"a")
    assert (served(held, COM1 + LSR, 1), len(com1.runs[0])) == (None, HELD_BATCH)


def test_access_during_a_delivery_waits_for_it(kernel, ring):
    """The flusher (or another vCPU) has taken the writes and is handing them over: an access
    to the same device must not overtake them (the ring looks empty meanwhile)."""
    com1 = Device("com1")
    com1.gate = threading.Event()
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    flusher = threading.Thread(target=held.flush)
    flusher.start()
    assert com1.delivering.wait(DEADLINE_S)
    order: list[str] = []
    access = threading.Thread(target=lambda: (served(held, COM1 + IER), order.append("access")))
    access.start()
    access.join(0.05)
    order.append("delivered")
    com1.gate.set()
    flusher.join(DEADLINE_S)
    access.join(DEADLINE_S)
    assert (order, com1.runs) == (["delivered", "access"], [[(0, b"a")]])


def test_access_with_nothing_held_keeps_the_device_until_it_is_served(kernel, ring):
    """Nothing held when the access came (serving() takes nothing, delivers nothing): a write
    held meanwhile (another vCPU's) still waits for the access to be served."""
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    with held.serving(COM1 + IER, 1) as answer:
        assert answer is None
        kernel.write(COM1, b"a")
        flusher = threading.Thread(target=held.flush)
        flusher.start()
        flusher.join(0.05)
        assert com1.runs == []  # not while the access is served
    flusher.join(DEADLINE_S)
    assert com1.runs == [[(0, b"a")]]


def test_access_while_the_flusher_moves_writes_from_the_ring_delivers_them_first(
    kernel, ring, monkeypatch
):
    """The flusher's look takes the writes from the ring, then queues them, under the ring's
    lock: the ring is empty and the queue too in between, and an access that looked then
    without that lock would overtake them."""
    com1 = Device("com1", answer=None)  # its mirror cannot answer: the writes go first
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    taken, go_on = threading.Event(), threading.Event()
    take = ring.take

    def slow_take() -> list[tuple[int, bytes]]:
        writes = take()
        if writes:  # the flusher's: the ring is empty now, the queue not yet filled
            taken.set()
            go_on.wait(DEADLINE_S)
        return writes

    monkeypatch.setattr(ring, "take", slow_take)
    flusher = threading.Thread(target=held._collect)
    flusher.start()
    assert taken.wait(DEADLINE_S)
    answers: list[bytes | None] = []
    access = threading.Thread(target=lambda: answers.append(served(held, COM1 + IER, 1)))
    access.start()
    access.join(0.05)
    go_on.set()
    flusher.join(DEADLINE_S)
    access.join(DEADLINE_S)
    assert com1.runs == [[(0, b"a")]]  # delivered by the access, before it was served
    assert (answers, len(com1.reads)) == ([None], 1)  # asked once, with the write counted


# -- arming, the flusher ---------------------------------------------------------------------
def test_arm_registers_every_zone_once(ring):
    vm = Vm()
    held = make(ring, vm, Device("com1"), Device("com2"))
    held.arm(COM1)
    held.arm(COM1)
    assert (held.armed, vm.zones, len(vm.calls)) == (True, {(COM1, 1), (COM2, 1)}, 2)


def test_arm_while_the_model_does_not_want_it_registers_nothing(ring):
    """An 8250 with THRI on: its driver waits for the THRE interrupt, not the flusher."""
    vm = Vm()
    held = make(ring, vm, Device("com1", ier=THRI))
    held.arm(COM1)
    assert (held.armed, vm.calls) == (False, [])


def test_arm_refused_by_kvm_keeps_what_it_registered_served_and_tries_no_more(ring, caplog):
    """No unregister on the vCPU's thread (its filter allows none): the zone registered
    before the refusal stays, and the flusher keeps delivering for it."""
    vm = Vm(refuse=COM2)
    held = make(ring, vm, Device("com1"), Device("com2"))
    held.arm(COM1)
    held.arm(COM1)
    assert (held.armed, vm.zones) == (True, {(COM1, 1)})
    assert vm.calls == ["register 0x3f8", "register 0x2f8"]
    assert "write-behind off" in caplog.text


def test_arm_refused_for_the_first_zone_leaves_it_off(ring):
    vm = Vm(refuse=COM1)
    held = make(ring, vm, Device("com1"))
    held.arm(COM1)
    held.arm(COM1)
    assert (held.armed, vm.calls) == (False, ["register 0x3f8"])


def test_arm_with_no_mirror_yet_asks_again_at_the_next_write(ring):
    """A device process just restarted has published no MIRROR: no answer is no refusal."""
    vm = Vm()
    com1 = Device("com1", ier=None)
    held = make(ring, vm, com1)
    held.written(COM1)
    com1.ier = 0  # its MIRROR came
    held.written(COM1)
    assert held.armed


def test_arm_asked_while_another_vcpu_turns_thri_off_asks_again(ring):
    """The wish a vCPU reads may be older than an IER write another vCPU makes meanwhile:
    that write wins, and the next THR write asks again."""
    vm = Vm()
    com1 = Device("com1", ier=THRI)
    held = make(ring, vm, com1)

    def other_vcpu() -> None:
        com1.asking = None
        held.written(COM1 + IER)  # served while the first vCPU waited for the old IER
        com1.ier = 0

    com1.asking = other_vcpu
    held.written(COM1)  # read THRI on: declined
    assert not held.armed
    held.written(COM1)
    assert held.armed


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {DEADLINE_S} s")
        time.sleep(0.001)


def test_flusher_delivers_a_write_nothing_else_takes(kernel, ring):
    """A guest that writes and then runs without an exit (or halts in the kernel)."""
    com1 = Device("com1")
    held = make(ring, Vm(), com1, tick_s=0.001)
    held.start()
    try:
        held.arm(COM1)
        kernel.write(COM1, b"!")
        wait_for(lambda: com1.runs == [[(0, b"!")]], "the held write delivered")
    finally:
        held.close()


def test_flusher_disarms_after_idle_looks_and_delivers_what_came_meanwhile(kernel, ring):
    """A write KVM took while the zone went (before its grace period ended) is delivered by
    the disarm itself: nothing arms again, no tick comes after."""
    vm = Vm()
    vm.on_unregister = lambda: kernel.write(COM1, b"z")
    com1 = Device("com1")
    held = make(ring, vm, com1, tick_s=0.001, idle_ticks=3)
    held.start()
    try:
        held.arm(COM1)
        wait_for(lambda: not held.armed, "disarmed")
        assert (vm.zones, com1.runs) == (set(), [[(0, b"z")]])
    finally:
        held.close()


def test_arm_while_the_flusher_disarms_does_not_wait_for_the_grace_period(ring):
    vm = Vm()
    held = make(ring, vm, Device("com1"))
    held._cond.acquire()  # the flusher, in KVM_UNREGISTER_COALESCED_MMIO
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (held.arm(COM1), done.set())).start()
        assert done.wait(DEADLINE_S)
    finally:
        held._cond.release()
    assert (held.armed, vm.calls) == (False, [])
    held.arm(COM1)  # the next write exit
    assert held.armed


def test_arm_the_model_declined_asks_again_only_after_another_register_is_written(ring):
    vm = Vm()
    com1 = Device("com1", ier=THRI)
    held = make(ring, vm, com1)
    held.written(COM1)
    held.written(COM1)  # THR again: not asked (a round with the device's channel each)
    assert (held.armed, com1.asked) == (False, [[IER]])
    com1.ier = 0
    held.written(COM1 + IER)  # the driver turned THRI off
    held.written(COM1)
    assert (held.armed, com1.asked) == (True, [[IER], [IER]])


def test_arm_reads_every_condition_from_one_mirror(ring):
    """The 8250's: DLAB clear (offset 1 mirrors DLM, not IER, while it is set) and THRI off,
    asked of one MIRROR together: from two, the THRI bit could be read from a DLM."""
    vm = Vm()
    com1 = Device("com1", ier=0)
    com1.lcr = DLAB  # a driver programming the divisor; its DLM has bit 1 clear
    zone = Zone(COM1, 1, com1, COM1, 8, ((LCR, DLAB, 0), (IER, THRI, 0)))
    held = WriteBehind(vm, ring, [zone], [].append, tick_s=60.0)  # type: ignore[arg-type]
    held.written(COM1)
    assert (held.armed, com1.asked) == (False, [[LCR, IER]])
    com1.lcr = 0
    held.written(COM1 + LCR)
    held.written(COM1)
    assert held.armed


def test_flusher_disarms_once_the_model_no_longer_wants_it(ring):
    vm = Vm()
    com1 = Device("com1")
    held = make(ring, vm, com1, tick_s=0.001, idle_ticks=10_000)
    held.start()
    try:
        held.arm(COM1)
        com1.ier = THRI  # the driver turned to the THRE interrupt
        wait_for(lambda: not held.armed, "disarmed")
        assert vm.zones == set()
    finally:
        held.close()


def test_flusher_failing_stops_the_vm(kernel, ring, monkeypatch):
    failures: Failures = []
    held = make(ring, Vm(), Device("com1"), tick_s=0.001, failures=failures)

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(held, "_collect", broken)
    held.start()
    held.arm(COM1)
    wait_for(lambda: failures, "the VM stopped")
    assert "internal error" in failures[0]


def test_close_stops_the_flusher_and_delivers_what_is_left(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    held.start()
    held.arm(COM1)
    kernel.write(COM1, b"z")
    held.close()
    assert (com1.runs, held._thread.is_alive()) == ([[(0, b"z")]], False)


class SerialChannel(list[bytes]):
    """A live 8250's channel as DeviceSlot uses it: its latest MIRROR (every register the
    descriptor mirrors: IER 0, LSR THRE|TEMT, THR credit `credit`), the messages posted."""

    def __init__(self, credit: int) -> None:
        super().__init__()
        registers = MODELS["serial"].mirrored
        self.mirror = RegisterMirror(registers)
        values = tuple(b"\x60" if off == LSR else b"\x00" for off, _ in registers)
        self.mirror.take(wire.Mirror(values, 0, credit, 0))
        self.messages: list[list[bytes]] = []

    def drain_events(self) -> None:
        pass

    def post_many(self, frames: list[bytes]) -> None:
        self.messages.append(list(frames))


def test_with_a_real_slot_reads_within_credit_are_answered_and_past_it_the_writes_go_first(
    kernel, ring, tmp_path
):
    """WriteBehind, DeviceSlot and RegisterMirror together: the 8250's THR credit decides."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, None, None)  # type: ignore[arg-type]
    channel = SerialChannel(credit=2)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    zone = Zone(COM1, 1, slot, COM1, 8, MODELS["serial"].write_behind_while)
    held = WriteBehind(Vm(), ring, [zone], [].append)  # type: ignore[arg-type]
    held.written(COM1)  # IER 0 in the mirror: the model wants it
    kernel.write(COM1, b"a")
    kernel.write(COM1, b"b")

    assert (held.armed, served(held, COM1 + LSR, 1), channel.messages) == (True, b"\x60", [])

    kernel.write(COM1, b"c")  # three held, credit for two: the device must see them
    assert served(held, COM1 + LSR, 1) is None
    sent = [wire.decode_access(f, 8).data for f in channel.messages[0]]
    assert (sent, slot.held_writes, slot.mirrored_reads) == ([b"a", b"b", b"c"], 3, 1)


@pytest.mark.parametrize(
    "release,holds",
    [
        ("6.1.0-27-amd64", True),
        ("6.0.0", True),
        ("6.18.3-pvm", True),
        ("5.15.0-91-generic", False),
        ("5.19", False),
        ("weird", False),
    ],
)
def test_write_behind_only_on_kernels_that_send_a_rep_outs_once(release, holds):
    assert kernel_holds_rep_outs_once(release) is holds


# -- the vCPU's side (monitor/vcpu.py) -------------------------------------------------------
class Recorder:
    """A bus device and a vCPU's exits, all in one log."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.name = "uart"

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(f"read {offset}")
        return b"\x01"

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(f"write {offset} {data!r}")


class FakeVcpu:
    vcpu_id = 0

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def run(self) -> object:
        return INTERRUPTED

    def set_immediate_exit(self, on: bool) -> None:
        pass

    def complete_read(self, data: bytes) -> None:
        self.log.append(f"complete {data!r}")


class FakeWriteBehind:
    def __init__(self, log: list[str], answer: bytes | None) -> None:
        self.log, self.answer = log, answer
        self.armed = False
        self.ports = frozenset(range(COM1, COM1 + 8))
        self.write_ports = frozenset({COM1})

    def read(self, port: int, size: int) -> bytes | None:
        self.log.append(f"held read {port:#x}")
        if self.answer is None:
            self.log.append("deliver")
        return self.answer

    def deliver(self, port: int) -> None:
        self.log.append("deliver")

    @contextlib.contextmanager
    def serving(self, port: int, size: int | None = None):  # type: ignore[no-untyped-def]
        yield self.read(port, size) if size is not None else self.deliver(port)

    def flush(self) -> None:
        self.log.append("flush")

    def written(self, port: int) -> None:
        if port in self.write_ports and not self.armed:
            self.log.append("arm")
            self.armed = True


class NoConfinement:
    def confine_vcpu_thread(self) -> None:
        pass


def vcpu_thread(answer: bytes | None = None) -> tuple[VcpuThread, list[str]]:
    recorder = Recorder()
    pio = Bus("pio")
    pio.insert(COM1, 8, recorder)
    pio.insert(COM2, 8, Recorder())
    held = FakeWriteBehind(recorder.log, answer)
    thread = VcpuThread(
        FakeVcpu(recorder.log),  # type: ignore[arg-type]
        pio,
        Bus("mmio"),
        None,  # type: ignore[arg-type]
        lambda outcome: None,
        NoConfinement(),  # type: ignore[arg-type]
        held,  # type: ignore[arg-type]
    )
    return thread, recorder.log


def test_vcpu_read_the_held_writes_leave_exact_is_answered_without_delivering_them():
    thread, log = vcpu_thread(answer=b"\x60")
    thread._handle_exit(PioIn(COM1 + 5, 1, 1))
    assert log == ["held read 0x3fd", "complete b'`'"]


def test_vcpu_read_the_mirror_cannot_answer_comes_after_the_held_writes():
    thread, log = vcpu_thread(answer=None)
    thread._handle_exit(PioIn(COM1 + 5, 1, 1))
    assert log == ["held read 0x3fd", "deliver", "read 5", "complete b'\\x01'"]


def test_vcpu_any_other_access_to_the_device_comes_after_its_held_writes():
    thread, log = vcpu_thread()
    thread._handle_exit(PioOut(COM1 + 1, 1, b"\x02"))
    thread._handle_exit(PioIn(COM1, 1, 2))  # rep insb
    assert log == [
        "deliver",
        "write 1 b'\\x02'",
        "deliver",
        "read 0",
        "read 0",
        "complete b'\\x01\\x01'",
    ]


def test_vcpu_access_to_another_device_does_not_wait_for_held_writes():
    thread, log = vcpu_thread()
    thread._handle_exit(PioOut(COM2 + 1, 1, b"\x02"))
    assert log == []


def test_vcpu_write_exit_at_a_write_behind_port_arms_it_after_serving_it():
    thread, log = vcpu_thread()
    thread._handle_exit(PioOut(COM1, 1, b"A"))
    thread._handle_exit(PioOut(COM1 + 1, 1, b"B"))
    assert log == ["deliver", "write 0 b'A'", "arm", "deliver", "write 1 b'B'"]


def test_vcpu_delivers_the_held_writes_before_it_parks():
    """A snapshot quiesces the devices once every vCPU parked: nothing may be left held."""
    install_kick_handler()  # (as the machine does before its vCPUs start)
    thread, log = vcpu_thread()
    thread.start()
    try:
        thread.request_pause()
        assert thread.wait_parked(DEADLINE_S)
        assert log == ["flush"]
    finally:
        thread.request_stop()
        thread.join(DEADLINE_S)


class UartOnTheBus(Device):
    """A Device that the port bus serves too: each access it serves is a run of its own."""

    def read(self, offset: int, size: int) -> bytes:
        self.runs.append([(offset, b"")])
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        self.runs.append([(offset, data)])


def vcpu_on(pio: Bus, held: WriteBehind) -> VcpuThread:
    """A vCPU thread serving exits on `pio`, with `held` write-behind (and no KVM)."""
    return VcpuThread(
        FakeVcpu([]),  # type: ignore[arg-type]
        pio,
        Bus("mmio"),
        None,  # type: ignore[arg-type]
        lambda outcome: None,
        NoConfinement(),  # type: ignore[arg-type]
        held,
    )


@pytest.mark.parametrize(
    "exit, served_as",
    [(PioOut(COM1 - 1, 2, b"\xffb"), (0, b"b")), (PioIn(COM1 - 3, 4, 1), (0, b""))],
    ids=["outw-0x3f7", "inl-0x3f5"],
)
def test_vcpu_access_that_runs_into_the_device_from_below_comes_after_its_held_writes(
    kernel, ring, exit, served_as
):
    """The bus gives the device its part of an access that begins below its window (`outw
    0x3f7` writes THR, monitor/bus.py): that part, too, reaches it after the held writes."""
    com1 = UartOnTheBus("com1")
    held = make(ring, Vm(), com1)
    pio = Bus("pio")
    pio.insert(COM1, 8, com1)
    thread = vcpu_on(pio, held)
    kernel.write(COM1, b"a")
    thread._handle_exit(exit)
    assert (com1.runs, com1.reads) == ([[(0, b"a")], [served_as]], [])


class PreemptedAt:
    """A slot behind the bus whose vCPU thread loses the CPU (the GIL) as it serves a write
    at `offset`: `entered` once there, it goes on at `go`."""

    def __init__(self, slot: DeviceSlot, offset: int) -> None:
        self.slot, self.name, self.offset = slot, slot.name, offset
        self.entered, self.go = threading.Event(), threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        return self.slot.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == self.offset:
            self.entered.set()
            assert self.go.wait(5)
        self.slot.write(offset, data)


def test_write_exit_and_a_write_held_meanwhile_reach_the_device_in_the_order_a_read_saw(
    kernel, ring, tmp_path
):
    """vCPU 2's write exit (MCR: loopback on) delivered the held writes, then let the lock go
    before its own write went out. vCPU 1 wrote THR meanwhile (held, no exit) and polled LSR:
    answered from the mirror with that write counted next (THRE|TEMT, no DR: 'A' went out
    before loopback), while the device got MCR first and looped 'A' back into RBR. The read
    now waits until the exit's write is out, and is then served with it counted."""
    mcr, loop_out2 = 4, b"\x18"
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, None, None)  # type: ignore[arg-type]
    channel = SerialChannel(credit=16)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    zone = Zone(COM1, 1, slot, COM1, 8, MODELS["serial"].write_behind_while)
    held = WriteBehind(Vm(), ring, [zone], [].append)  # type: ignore[arg-type]
    held.written(COM1)
    assert held.armed
    device = PreemptedAt(slot, mcr)
    pio = Bus("pio")
    pio.insert(COM1, 8, device)
    vcpu2 = vcpu_on(pio, held)
    exiting = threading.Thread(target=vcpu2._handle_exit, args=(PioOut(COM1 + mcr, 1, loop_out2),))
    exiting.start()
    assert device.entered.wait(5)
    kernel.write(COM1, b"A")  # vCPU 1's THR write: held
    answers: list[bytes | None] = []
    reader = threading.Thread(target=lambda: answers.append(served(held, COM1 + LSR, 1)))
    reader.start()
    reader.join(0.2)
    device.go.set()
    exiting.join(5)
    reader.join(5)
    held.flush()
    order = [(a.offset, a.data) for m in channel.messages for a in map(decode8, m)]
    assert answers == [None] and order == [(mcr, loop_out2), (0, b"A")]


def decode8(frame: bytes) -> wire.Access:
    return wire.decode_access(frame, 8)


def test_reads_answered_with_held_writes_counted_keep_within_max_ahead(kernel, ring, tmp_path):
    """On an output the slot cannot count (a pipe), no read is answered from the mirror once
    MAX_AHEAD frames went past the last checkpoint, so that a crash repeats at most that
    many frames' output. The writes held were not counted: 80 went before a read reached
    the device (up to MAX_AHEAD - 1 + HELD_BATCH)."""

    class CaughtUp(SerialChannel):
        forwarded = 0

        def read(self, offset: int, size: int) -> bytes:
            self.forwarded += 1
            return b"\x20"

    r, w = os.pipe()
    try:
        spawn = Spawn("serial0", "serial", 8, fds={"out": w})
        slot = DeviceSlot(spawn, tmp_path, None, None)  # type: ignore[arg-type]
        channel = CaughtUp(credit=0xFFFF)
        slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
        zone = Zone(COM1, 1, slot, COM1, 8, MODELS["serial"].write_behind_while)
        held = WriteBehind(Vm(), ring, [zone], [].append)  # type: ignore[arg-type]
        for _ in range(MAX_AHEAD - HELD_BATCH // 2):  # THR writes that exited before it armed
            slot.write(0, b"x")
        held.written(COM1)
        most = 0
        for _ in range(4 * MAX_AHEAD):  # a polled driver: a THR write, an LSR read
            kernel.write(COM1, b"x")
            answer = served(held, COM1 + LSR, 1)
            most = max(most, slot._frames - slot._checkpoint.applied)
            if answer is None:
                slot.read(LSR, 1)
            if channel.forwarded:
                break
        assert (channel.forwarded, most) == (1, MAX_AHEAD)
    finally:
        os.close(r)
        os.close(w)
