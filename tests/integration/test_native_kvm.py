"""The native layer against real KVM: typed exits, ioeventfd, irqfd (with resample), GSI
routing and MSIs.

Guests are a few real-mode instructions (KVM-HERE.md: CPL0 code is emulated here, fine for a
handful). Interrupts never reach a guest on these hosts, so interrupt paths are checked from
the host side, as KVM-HERE.md describes: the IOAPIC's IRR (KVM_GET_IRQCHIP) while a line is
held up, and the LAPIC's IRR (KVM_GET_LAPIC) once a vector was delivered to it.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator

import pytest

from splitvmm.errors import KvmError, KvmUnavailable
from splitvmm.monitor import layout
from splitvmm.native import kvm as kvm_module
from splitvmm.native.coalesced import CoalescedRing
from splitvmm.native.eventfd import EventFd
from splitvmm.native.exits import HLT, INTERRUPTED, MmioRead, MmioWrite, PioIn, PioOut
from splitvmm.native.kvm import (
    IOAPIC_REDIRTBL_OFFSET,
    IRQCHIP_IOAPIC,
    LAPIC_SIZE,
    REQUIRED_CAPS,
    Kvm,
    VcpuFd,
    VmFd,
)
from splitvmm.native.mem import mapping_address
from splitvmm.native.routing import MsiRoute, pc_default_routes
from splitvmm.record import Struct

pytestmark = pytest.mark.kvm

RAM_SIZE = 0x8000  # gpa 0x8000 and up is no memory slot: accesses there are MMIO exits
CODE = 0x1000
DATA = 0x2000
MMIO_GPA = 0x8000
PORT = 0x510  # no device, and not one of the ports the in-kernel irqchip serves
DEBUG_PORT = 0xF4  # the guests' "I got here" marker
VALUE = 0x2A
# Local APIC registers (SDM Vol. 3A table 11-1): spurious-interrupt vector register and IRR.
APIC_SPIV = 0xF0
APIC_SPIV_ENABLED = 1 << 8
APIC_IRR = 0x200
# MSI address for physical destination APIC ID 0 (SDM Vol. 3A 11.11.1); data is the vector
# with fixed delivery, edge triggered.
MSI_ADDRESS_APIC0 = 0xFEE0_0000
IOAPIC_ONLY_GSI = 20  # above the PICs' 16 lines: wired to the IOAPIC alone
LEGACY_GSI = 5  # wired to PIC master line 5 and IOAPIC pin 5
MSI_GSI = 24  # past the IOAPIC's 24 pins: only a route we add makes it mean anything
DEADLINE_S = 10.0


def loop(body: bytes) -> bytes:
    """`body` then `jmp` back to its start (16-bit code)."""
    return body + bytes([0xEB, (-(len(body) + 2)) & 0xFF])


# mov $PORT,%dx; mov $VALUE,%al; out %al,(%dx); out %al,$DEBUG_PORT; jmp back
PIO_WRITE_LOOP = loop(bytes([0xBA, *PORT.to_bytes(2, "little"), 0xB0, VALUE, 0xEE, 0xE6, 0xF4]))
# mov $VALUE,%al; mov %al,MMIO_GPA; out %al,$DEBUG_PORT; jmp back
MMIO_WRITE_LOOP = loop(bytes([0xB0, VALUE, 0xA2, *MMIO_GPA.to_bytes(2, "little"), 0xE6, 0xF4]))


class Guest(Struct):
    vm: VmFd
    vcpu: VcpuFd
    ram: mmap.mmap


MakeGuest = Callable[..., Guest]


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def make_guest(kvm: Kvm) -> Iterator[MakeGuest]:
    """Builds real-mode guests running `code` at CODE; closes them after the test."""
    made: list[Guest] = []

    def make(code: bytes, irqchip: bool = True, log_dirty: bool = False) -> Guest:
        vm = kvm.create_vm()
        vm.set_tss_addr(layout.KVM_TSS)
        if irqchip:
            vm.create_irqchip()
        ram = mmap.mmap(-1, RAM_SIZE)
        ram[CODE : CODE + len(code)] = code
        # SAFETY (test only): `ram` stays mapped until after the VM fd is closed below.
        vm.set_user_memory_region(0, 0, RAM_SIZE, mapping_address(ram), log_dirty=log_dirty)
        vcpu = vm.create_vcpu(0, kvm.vcpu_mmap_size())
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 2  # IF=0: nothing is ever delivered to the guest
        vcpu.set_regs(regs)
        made.append(Guest(vm, vcpu, ram))
        return made[-1]

    yield make
    for g in made:
        g.vcpu.close()
        g.vm.close()
        g.ram.close()


@pytest.fixture
def efd() -> Iterator[EventFd]:
    fd = EventFd()
    yield fd
    fd.close()


def enable_lapic(vcpu: VcpuFd) -> None:
    """Software-enable the LAPIC (SPIV bit 8): a disabled one accepts no fixed interrupt."""
    regs = vcpu.get_lapic()
    spiv = int.from_bytes(regs[APIC_SPIV : APIC_SPIV + 4], "little") | APIC_SPIV_ENABLED
    regs[APIC_SPIV : APIC_SPIV + 4] = spiv.to_bytes(4, "little")
    vcpu.set_lapic(bytes(regs))


def lapic_irr_has(vcpu: VcpuFd, vector: int) -> bool:
    """Whether `vector` is pending in the LAPIC (IRR: 8 registers of 32 bits, 16 bytes apart)."""
    reg = APIC_IRR + (vector // 32) * 0x10
    return bool(int.from_bytes(vcpu.get_lapic()[reg : reg + 4], "little") >> (vector % 32) & 1)


def unmask_ioapic_pin(vm: VmFd, pin: int, vector: int) -> None:
    """Redirection entry for `pin`: `vector`, fixed, physical destination APIC 0, edge, not
    masked (IOAPIC datasheet 3.2.4: all of those are zero bits but the vector)."""
    chip = bytearray(vm.get_irqchip(IRQCHIP_IOAPIC))
    entry = IOAPIC_REDIRTBL_OFFSET + 8 * pin
    chip[entry : entry + 8] = vector.to_bytes(8, "little")
    vm.set_irqchip(IRQCHIP_IOAPIC, bytes(chip))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """KVM injects an irqchip-routed irqfd from a kernel worker, and nothing tells us when:
    no fd to wait on, so poll the irqchip state, with a deadline so a failure is reported."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {DEADLINE_S} s")
        os.sched_yield()


# -- dirty log ------------------------------------------------------------------------------


def test_dirty_log_holds_the_pages_the_guest_wrote_once(make_guest):
    """A logged slot: KVM_GET_DIRTY_LOG gives the pages written since the last call, one bit
    each (monitor/dirtylog.py), and begins again."""
    # mov $VALUE,%al; mov %al,DATA; mov %al,0x5000; out %al,$DEBUG_PORT
    code = bytes([0xB0, VALUE, 0xA2, *DATA.to_bytes(2, "little"), 0xA2, 0x00, 0x50, 0xE6, 0xF4])
    g = make_guest(code, log_dirty=True)

    before = g.vm.get_dirty_log(0, RAM_SIZE)
    assert g.vcpu.run() == PioOut(DEBUG_PORT, 1, bytes([VALUE]))
    after = g.vm.get_dirty_log(0, RAM_SIZE)

    assert (before, after) == (bytes(1), bytes([1 << (DATA // 4096) | 1 << 5]))
    assert g.vm.get_dirty_log(0, RAM_SIZE) == bytes(1)


# -- typed exits ---------------------------------------------------------------------------


def test_vcpu_pio_in_completed_read_reaches_the_guest(make_guest: MakeGuest) -> None:
    # mov $PORT,%dx; in (%dx),%al; out %al,$DEBUG_PORT
    g = make_guest(bytes([0xBA, *PORT.to_bytes(2, "little"), 0xEC, 0xE6, 0xF4]))

    first = g.vcpu.run()
    g.vcpu.complete_read(b"\x5a")
    second = g.vcpu.run()

    assert (first, second) == (PioIn(PORT, 1, 1), PioOut(DEBUG_PORT, 1, b"\x5a"))


def test_vcpu_rep_outsb_gives_every_byte_in_order(make_guest: MakeGuest) -> None:
    # mov $PORT,%dx; mov $DATA,%si; mov $4,%cx; rep outsb; out %al,$DEBUG_PORT
    g = make_guest(
        bytes([0xBA, *PORT.to_bytes(2, "little"), 0xBE, *DATA.to_bytes(2, "little")])
        + bytes([0xB9, 4, 0, 0xF3, 0x6E, 0xE6, 0xF4])
    )
    g.ram[DATA : DATA + 4] = b"abcd"

    # KVM may hand the four writes over in one exit (count 4) or several: PVM's emulator
    # here gives one per exit. Either way they arrive in order, then the marker.
    marker = PioOut(DEBUG_PORT, 1, b"\x00")  # %al is still 0
    exits = [g.vcpu.run()]
    while exits[-1] != marker and len(exits) <= 4:
        exits.append(g.vcpu.run())

    written = b"".join(e.data for e in exits if isinstance(e, PioOut) and e.port == PORT)
    assert (written, exits[-1]) == (b"abcd", marker)


def test_vcpu_mmio_read_completed_read_reaches_the_guest(make_guest: MakeGuest) -> None:
    # mov MMIO_GPA,%al; out %al,$DEBUG_PORT
    g = make_guest(bytes([0xA0, *MMIO_GPA.to_bytes(2, "little"), 0xE6, 0xF4]))

    first = g.vcpu.run()
    g.vcpu.complete_read(b"\x66")
    second = g.vcpu.run()

    assert (first, second) == (MmioRead(MMIO_GPA, 1), PioOut(DEBUG_PORT, 1, b"\x66"))


def test_vcpu_mmio_write_gives_gpa_and_data(make_guest: MakeGuest) -> None:
    g = make_guest(MMIO_WRITE_LOOP)

    assert g.vcpu.run() == MmioWrite(MMIO_GPA, bytes([VALUE]))


def test_vcpu_immediate_exit_returns_interrupted_without_running(make_guest: MakeGuest) -> None:
    g = make_guest(PIO_WRITE_LOOP)
    g.vcpu.set_immediate_exit(True)

    stopped = g.vcpu.run()
    g.vcpu.set_immediate_exit(False)

    assert (stopped, g.vcpu.run()) == (INTERRUPTED, PioOut(PORT, 1, bytes([VALUE])))


def test_vcpu_hlt_without_irqchip_exits_hlt(make_guest: MakeGuest) -> None:
    g = make_guest(b"\xf4", irqchip=False)

    assert g.vcpu.run() is HLT


def test_set_lapic_of_wrong_length_raises_value_error(make_guest: MakeGuest) -> None:
    g = make_guest(b"")

    with pytest.raises(ValueError, match=f"KVM_SET_LAPIC: 16 bytes given, .* is {LAPIC_SIZE}"):
        g.vcpu.set_lapic(bytes(16))


MCE_BANKS = [0x400 + i for i in range(4 * 32)]  # KVM emulates 32 banks, listed or not
MTRRS = [*range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270), 0x2FF]


def test_msrs_more_than_one_kvm_call_takes_are_read_and_written_in_order(
    make_guest: MakeGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM refuses a KVM_GET/SET_MSRS of 256 MSRs or more (E2BIG): a host listing ~100 MSRs
    plus the MTRRs and machine-check banks passes that, and every snapshot failed. The
    calls are split; an MSR KVM cannot read ends the read there, as one call does."""
    g = make_guest(b"")
    many = {i: 0 for i in MCE_BANKS + MTRRS} | {0x404: (1 << 64) - 1, 0x2FF: 0x806}

    g.vcpu.set_msrs(many)  # 155 MSRs: one call; then the same 3 at a time
    assert g.vcpu.get_msrs(list(many) * 2) == many  # 310 MSRs: E2BIG in one call
    monkeypatch.setattr(kvm_module, "MSRS_PER_CALL", 3)
    g.vcpu.set_msrs({**many, 0x404: 0})
    assert g.vcpu.get_msrs([0x404, 0x2FF, 0x400, 0x401, 0xDEAD0000, 0x402]) == {
        0x404: 0, 0x2FF: 0x806, 0x400: 0, 0x401: 0
    }  # fmt: skip
    with pytest.raises(KvmError, match="KVM_SET_MSRS \\(MSR 0xdead0000 refused\\)"):
        g.vcpu.set_msrs({0x400: 0, 0x401: 0, 0x402: 0, 0x403: 0, 0xDEAD0000: 1})


# -- ioeventfd -----------------------------------------------------------------------------

IOEVENTFD_CASES = pytest.mark.parametrize(
    ("code", "addr", "pio", "exit_without"),
    [
        (PIO_WRITE_LOOP, PORT, True, PioOut(PORT, 1, bytes([VALUE]))),
        (MMIO_WRITE_LOOP, MMIO_GPA, False, MmioWrite(MMIO_GPA, bytes([VALUE]))),
    ],
    ids=["pio", "mmio"],
)


@IOEVENTFD_CASES
def test_ioeventfd_write_signals_eventfd_without_exit(
    make_guest: MakeGuest, efd: EventFd, code: bytes, addr: int, pio: bool, exit_without: object
) -> None:
    g = make_guest(code)
    g.vm.register_ioeventfd(efd.fd, addr, 1, pio)

    ex = g.vcpu.run()

    assert (ex, efd.drain()) == (PioOut(DEBUG_PORT, 1, bytes([VALUE])), 1)


@IOEVENTFD_CASES
def test_ioeventfd_unregistered_write_exits_to_userspace(
    make_guest: MakeGuest, efd: EventFd, code: bytes, addr: int, pio: bool, exit_without: object
) -> None:
    g = make_guest(code)
    g.vm.register_ioeventfd(efd.fd, addr, 1, pio)
    g.vcpu.run()  # the write went to the eventfd; this is the marker after it
    efd.drain()

    g.vm.unregister_ioeventfd(efd.fd, addr, 1, pio)
    ex = g.vcpu.run()

    assert (ex, efd.drain()) == (exit_without, 0)


def test_ioeventfd_datamatch_other_value_exits_to_userspace(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(PIO_WRITE_LOOP)
    g.vm.register_ioeventfd(efd.fd, PORT, 1, pio=True, datamatch=VALUE + 1)

    ex = g.vcpu.run()

    assert (ex, efd.drain()) == (PioOut(PORT, 1, bytes([VALUE])), 0)


def test_ioeventfd_unregister_of_unknown_raises_kvm_error(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(b"")

    with pytest.raises(KvmError, match="KVM_IOEVENTFD"):
        g.vm.unregister_ioeventfd(efd.fd, PORT, 1, pio=True)


# -- irqfd ---------------------------------------------------------------------------------


def test_irqfd_raises_ioapic_pin_which_delivers_to_lapic(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(b"")
    enable_lapic(g.vcpu)
    unmask_ioapic_pin(g.vm, IOAPIC_ONLY_GSI, 0x41)
    g.vm.register_irqfd(efd.fd, IOAPIC_ONLY_GSI)

    efd.trigger()
    g.vm.unregister_irqfd(efd.fd, IOAPIC_ONLY_GSI)  # returns once the injection is done

    assert lapic_irr_has(g.vcpu, 0x41)


def test_irqfd_resample_holds_line_until_guest_ack_then_signals(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    # xor %al,%al; out %al,$0x21 (OCW1: unmask every PIC master line); mov $0x0c,%al;
    # out %al,$0x20 (OCW3: poll); in $0x20,%al (poll: 0x80 | the line, and acknowledge it);
    # out %al,$DEBUG_PORT. The PIC's poll mode acknowledges without delivering an interrupt,
    # which never reaches a guest on these hosts.
    g = make_guest(bytes.fromhex("30c0 e621 b00c e620 e420 e6f4"))
    resample = EventFd()
    g.vm.register_irqfd(efd.fd, LEGACY_GSI, resample_fd=resample.fd)
    efd.trigger()
    wait_until(lambda: bool(g.vm.ioapic_irr() >> LEGACY_GSI & 1), "GSI 5 asserted")
    before = resample.drain()

    ex = g.vcpu.run()

    after = (resample.drain(), g.vm.ioapic_irr() >> LEGACY_GSI & 1)
    g.vm.unregister_irqfd(efd.fd, LEGACY_GSI)
    resample.close()
    assert (before, ex, after) == (0, PioOut(DEBUG_PORT, 1, bytes([0x80 | LEGACY_GSI])), (1, 0))


# -- GSI routing and MSIs ------------------------------------------------------------------


def test_gsi_routing_msi_route_irqfd_sets_lapic_irr(make_guest: MakeGuest, efd: EventFd) -> None:
    g = make_guest(b"")
    enable_lapic(g.vcpu)
    g.vm.set_gsi_routing([*pc_default_routes(), MsiRoute(MSI_GSI, MSI_ADDRESS_APIC0, 0x42)])
    g.vm.register_irqfd(efd.fd, MSI_GSI)

    efd.trigger()
    g.vm.unregister_irqfd(efd.fd, MSI_GSI)  # returns once the injection is done

    assert lapic_irr_has(g.vcpu, 0x42)


def test_gsi_routing_with_default_routes_keeps_ioapic_pins(make_guest: MakeGuest) -> None:
    g = make_guest(b"")
    g.vm.set_gsi_routing([*pc_default_routes(), MsiRoute(MSI_GSI, MSI_ADDRESS_APIC0, 0x42)])

    g.vm.irq_line(IOAPIC_ONLY_GSI, 1)

    assert g.vm.ioapic_irr() == 1 << IOAPIC_ONLY_GSI


def test_signal_msi_sets_lapic_irr(make_guest: MakeGuest) -> None:
    g = make_guest(b"")
    enable_lapic(g.vcpu)

    delivered = g.vm.signal_msi(MSI_ADDRESS_APIC0, 0x43)

    assert (delivered, lapic_irr_has(g.vcpu, 0x43)) == (True, True)


def test_signal_msi_to_disabled_lapic_is_not_delivered(make_guest: MakeGuest) -> None:
    g = make_guest(b"")  # a fresh LAPIC is software-disabled (SPIV bit 8 clear)

    assert g.vm.signal_msi(MSI_ADDRESS_APIC0, 0x43) is False


def test_this_host_has_every_required_capability(kvm: Kvm) -> None:
    kvm.require_caps()


@pytest.mark.parametrize("missing", ["KVM_CAP_VCPU_EVENTS", "KVM_CAP_ADJUST_CLOCK"])
def test_a_capability_a_snapshot_needs_is_required_at_start(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """Refused where the VM starts, in one sentence naming it, not at its first snapshot."""
    real = kvm.check_extension
    monkeypatch.setattr(
        kvm, "check_extension", lambda cap: 0 if cap == REQUIRED_CAPS[missing] else real(cap)
    )
    with pytest.raises(KvmUnavailable, match=f"lacks {missing}$"):
        kvm.require_caps()


def test_pit_reinject_switches_off_and_on_again(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        vm.set_pit_reinject(False)
        vm.set_pit_reinject(False)  # already off: nothing to switch
        vm.set_pit_reinject(True)


def test_pit_reinject_without_a_pit_raises_kvm_error(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(KvmError, match="KVM_REINJECT_CONTROL") as raised:
            vm.set_pit_reinject(False)
    assert raised.value.errno == errno.ENXIO


# -- coalesced port writes (native/coalesced.py, monitor/writebehind.py) ------------------------
# mov $PORT,%dx; mov $1,%al; out %al,(%dx); mov $2,%al; out; mov $3,%al; out;
# out %al,$DEBUG_PORT; mov $0x4241,%ax; out %ax,(%dx) (two bytes: past a one-byte zone)
COALESCED_WRITES = bytes([0xBA, *PORT.to_bytes(2, "little")]) + bytes(
    [0xB0, 1, 0xEE, 0xB0, 2, 0xEE, 0xB0, 3, 0xEE, 0xE6, 0xF4, 0xB8, 0x41, 0x42, 0xEF]
)


def coalescing(g: Guest) -> CoalescedRing:
    """The ring, once PORT's one-byte writes go there (skips where KVM coalesces none)."""
    page = g.vm.coalesced_pio_page()
    if not page:
        pytest.skip("this host's KVM does not coalesce port writes (no KVM_CAP_COALESCED_PIO)")
    ring = g.vcpu.coalesced_ring(page)
    g.vm.register_coalesced_pio(PORT, 1)
    return ring


def test_coalesced_port_writes_wait_in_the_ring_without_exits(make_guest: MakeGuest) -> None:
    g = make_guest(COALESCED_WRITES)
    ring = coalescing(g)

    first = g.vcpu.run()  # the three writes to PORT cost no exit
    held = ring.take()
    second = g.vcpu.run()  # a write wider than the zone exits as any does

    assert first == PioOut(DEBUG_PORT, 1, b"\x03")
    assert held == [(PORT, b"\x01"), (PORT, b"\x02"), (PORT, b"\x03")]
    assert (second, ring.pending()) == (PioOut(PORT, 2, b"AB"), 0)


def test_coalesced_zone_unregistered_writes_exit_again(make_guest: MakeGuest) -> None:
    g = make_guest(PIO_WRITE_LOOP)
    ring = coalescing(g)
    g.vcpu.run()  # PORT's write held, then the marker
    held = ring.take()

    g.vm.unregister_coalesced_pio(PORT, 1)
    ex = g.vcpu.run()

    assert (held, ex, ring.pending()) == (
        [(PORT, bytes([VALUE]))],
        PioOut(PORT, 1, bytes([VALUE])),
        0,
    )
