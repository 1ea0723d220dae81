"""Write-behind (monitor/writebehind.py) and KVM's ring of coalesced writes that it reads
(native/coalesced.py), against a ring page this test fills as KVM does, a fake VM that records
the zones it is given, and fake devices. tests/integration/test_native_kvm.py has the ring
filled by KVM itself; tests/integration/test_guests.py a guest through `splitvmm up`."""

from __future__ import annotations

import mmap
import time
from collections.abc import Iterator, Sequence

import pytest

from splitvmm.errors import KvmError
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.vcpu import VcpuThread, install_kick_handler
from splitvmm.monitor.writebehind import HELD_BATCH, WriteBehind, Zone
from splitvmm.native.coalesced import (
    DATA_OFFSET,
    ENTRIES_OFFSET,
    ENTRY_SIZE,
    LEN_OFFSET,
    CoalescedRing,
)
from splitvmm.native.exits import INTERRUPTED, PioIn, PioOut

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


def test_ring_one_port_counts_writes_at_one_port_and_none_for_several(kernel, ring):
    assert ring.one_port() == (0, -1)
    kernel.write(COM1, b"a")
    kernel.write(COM1, b"b")
    assert ring.one_port() == (2, COM1)
    kernel.write(COM2, b"c")
    assert ring.one_port() is None
    kernel.write(COM1, b"d")
    assert ring.one_port() is None  # still several, until they are taken
    ring.take()
    kernel.write(COM2, b"e")
    assert ring.one_port() == (1, COM2)


def test_ring_oldest_moves_only_when_writes_are_taken(kernel, ring):
    kernel.write(COM1, b"a")
    before = ring.oldest()
    kernel.write(COM1, b"b")
    assert ring.oldest() == before
    ring.take()
    assert ring.oldest() == before + 2


def test_ring_with_an_index_past_its_end_raises(kernel, ring):
    kernel.set_index(1, ring.size + 3)
    with pytest.raises(ValueError, match="not below"):
        ring.take()


def test_ring_page_outside_the_mapping_is_refused(kernel):
    with pytest.raises(ValueError, match="outside"):
        CoalescedRing(kernel.mapping, PAGE + 1)


# -- delivery --------------------------------------------------------------------------------
class Device:
    """A slot's two write-behind calls, recorded; read_held answers `answer`."""

    def __init__(self, name: str, answer: bytes | None = b"\x60") -> None:
        self.name = name
        self.answer = answer
        self.runs: list[list[tuple[int, bytes]]] = []
        self.reads: list[tuple[int, int, int, int]] = []

    def read_held(self, offset: int, size: int, held: int, held_at: int) -> bytes | None:
        self.reads.append((offset, size, held, held_at))
        return self.answer

    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self.runs.append(list(writes))


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

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        self.calls.append(f"unregister {port:#x}")
        self.zones.remove((port, size))


def make(
    ring: CoalescedRing, vm: Vm, *devices: Device, tick_s: float = 60.0, idle_ticks: int = 50
) -> WriteBehind:
    """THR of a UART at COM1 (and COM2) for each device, in order."""
    zones = [Zone(base, 1, d, base, 8) for base, d in zip((COM1, COM2), devices, strict=False)]
    return WriteBehind(vm, ring, zones, tick_s=tick_s, idle_ticks=idle_ticks)  # type: ignore[arg-type]


def test_flush_hands_each_device_its_writes_in_order_one_call_per_run(kernel, ring):
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    for port, data in ((COM1, b"a"), (COM1, b"b"), (COM2, b"x"), (COM1, b"c")):
        kernel.write(port, data)

    held.flush()

    assert com1.runs == [[(0, b"a"), (0, b"b")], [(0, b"c")]]
    assert com2.runs == [[(0, b"x")]]
    assert (held.pending(), held.delivered) == (False, 4)


def test_flush_skips_a_write_at_a_port_no_zone_has(kernel, ring, caplog):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    kernel.write(0x80, b"?")
    kernel.write(COM1, b"a")
    held.flush()
    assert com1.runs == [[(0, b"a")]]
    assert "no device registered" in caplog.text


def test_read_of_the_device_holding_the_writes_asks_its_mirror_with_them_counted(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    kernel.write(COM1, b"b")

    assert held.read(COM1 + 5, 1) == b"\x60"  # LSR
    assert (com1.reads, com1.runs, held.pending()) == ([(5, 1, 2, 0)], [], True)


def test_read_the_mirror_cannot_answer_leaves_the_writes_to_be_delivered(kernel, ring):
    com1 = Device("com1", answer=None)
    held = make(ring, Vm(), com1)
    kernel.write(COM1, b"a")
    assert (held.read(COM1 + 5, 1), held.pending()) == (None, True)


def test_read_of_another_device_than_the_one_holding_writes_is_not_answered(kernel, ring):
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    kernel.write(COM1, b"a")
    assert (held.read(COM2 + 5, 1), com1.reads, com2.reads) == (None, [], [])


def test_read_while_writes_of_two_devices_are_held_is_not_answered(kernel, ring):
    com1, com2 = Device("com1"), Device("com2")
    held = make(ring, Vm(), com1, com2)
    kernel.write(COM1, b"a")
    kernel.write(COM2, b"b")
    assert (held.read(COM1 + 5, 1), com1.reads) == (None, [])


def test_read_with_a_batch_held_is_not_answered_so_the_vcpu_delivers_it(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    for _ in range(HELD_BATCH):
        kernel.write(COM1, b"a")
    assert held.read(COM1 + 5, 1) is None


# -- arming, the flusher ---------------------------------------------------------------------
def test_arm_registers_every_zone_once(ring):
    vm = Vm()
    held = make(ring, vm, Device("com1"), Device("com2"))
    held.arm()
    held.arm()
    assert (held.armed, vm.zones, len(vm.calls)) == (True, {(COM1, 1), (COM2, 1)}, 2)


def test_arm_refused_by_kvm_turns_write_behind_off_and_lets_go_of_the_zones(ring, caplog):
    vm = Vm(refuse=COM2)
    held = make(ring, vm, Device("com1"), Device("com2"))
    held.arm()
    held.arm()
    assert (held.armed, vm.zones) == (False, set())
    assert vm.calls == ["register 0x3f8", "register 0x2f8", "unregister 0x3f8"]
    assert "write-behind off" in caplog.text


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
        held.arm()
        kernel.write(COM1, b"!")
        wait_for(lambda: com1.runs == [[(0, b"!")]], "the held write delivered")
    finally:
        held.close()


def test_flusher_disarms_after_idle_looks_and_delivers_what_came_meanwhile(kernel, ring):
    vm = Vm()
    com1 = Device("com1")
    held = make(ring, vm, com1, tick_s=0.001, idle_ticks=3)
    held.start()
    try:
        held.arm()
        wait_for(lambda: not held.armed, "disarmed")
        assert vm.zones == set()
        held.arm()  # the next write exits and arms again
        assert vm.zones == {(COM1, 1)}
    finally:
        held.close()


def test_close_stops_the_flusher_and_delivers_what_is_left(kernel, ring):
    com1 = Device("com1")
    held = make(ring, Vm(), com1)
    held.start()
    held.arm()
    kernel.write(COM1, b"z")
    held.close()
    assert (com1.runs, held._thread.is_alive()) == ([[(0, b"z")]], False)


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
    def __init__(self, log: list[str], pending: bool, answer: bytes | None) -> None:
        self.log, self._pending, self.answer = log, pending, answer
        self.armed = False
        self.ports = frozenset({COM1})

    def pending(self) -> bool:
        return self._pending

    def read(self, port: int, size: int) -> bytes | None:
        self.log.append(f"held read {port:#x}")
        return self.answer

    def flush(self) -> None:
        self.log.append("flush")
        self._pending = False

    def arm(self) -> None:
        self.log.append("arm")
        self.armed = True


class NoConfinement:
    def confine_vcpu_thread(self) -> None:
        pass


def vcpu_thread(pending: bool, answer: bytes | None = None) -> tuple[VcpuThread, list[str]]:
    recorder = Recorder()
    pio = Bus("pio")
    pio.insert(COM1, 8, recorder)
    held = FakeWriteBehind(recorder.log, pending, answer)
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
    thread, log = vcpu_thread(pending=True, answer=b"\x60")
    thread._handle_exit(PioIn(COM1 + 5, 1, 1))
    assert log == ["held read 0x3fd", "complete b'`'"]


def test_vcpu_read_the_mirror_cannot_answer_comes_after_the_held_writes():
    thread, log = vcpu_thread(pending=True, answer=None)
    thread._handle_exit(PioIn(COM1 + 5, 1, 1))
    assert log == ["held read 0x3fd", "flush", "read 5", "complete b'\\x01'"]


def test_vcpu_any_other_exit_comes_after_the_held_writes():
    thread, log = vcpu_thread(pending=True)
    thread._handle_exit(PioOut(COM1 + 1, 1, b"\x02"))
    assert log == ["flush", "write 1 b'\\x02'"]


def test_vcpu_write_exit_at_a_write_behind_port_arms_it_after_serving_it():
    thread, log = vcpu_thread(pending=False)
    thread._handle_exit(PioOut(COM1, 1, b"A"))
    thread._handle_exit(PioOut(COM1 + 1, 1, b"B"))
    assert log == ["write 0 b'A'", "arm", "write 1 b'B'"]


def test_vcpu_delivers_the_held_writes_before_it_parks():
    """A snapshot quiesces the devices once every vCPU parked: nothing may be left held."""
    install_kick_handler()  # (as the machine does before its vCPUs start)
    thread, log = vcpu_thread(pending=True)
    thread.start()
    try:
        thread.request_pause()
        assert thread.wait_parked(DEADLINE_S)
        assert log == ["flush"]
    finally:
        thread.request_stop()
        thread.join(DEADLINE_S)
