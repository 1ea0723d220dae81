"""A PCI function's monitor side against real KVM: its queue notify ioeventfds follow the
BAR and the command register's decode, an MSI-X irqfd raises nothing until its device
asked for a route (then its vector is in the LAPIC's IRR), and an INTx irqfd raises its
IOAPIC pin. Real-mode guests of a few instructions (KVM-HERE.md), RAM below 0x8000:
the function's BARs sit at 0x8000 (BAR 0, notify at 0xB000) and 0xC000 (BAR 1)."""

from __future__ import annotations

import struct
import time

import pytest

from splitvmm.monitor.bus import Bus
from splitvmm.monitor.irqroutes import GsiRoutes, MsiVectors, intx_gsi
from splitvmm.monitor.pci.function import PciFunctionHost
from splitvmm.monitor.pci.root import Ecam, PciRoot
from splitvmm.native.eventfd import EventFd
from splitvmm.native.exits import MmioWrite, PioOut
from splitvmm.native.kvm import IRQCHIP_IOAPIC, VmFd
from splitvmm.protocol.models import virtio_function
from tests.integration import test_native_kvm as native
from tests.integration.test_native_kvm import (
    DEBUG_PORT,
    MSI_ADDRESS_APIC0,
    VALUE,
    MakeGuest,
    enable_lapic,
    lapic_irr_has,
    loop,
)

# The real-mode guests and eventfds of the native layer's tests, as fixtures here too.
kvm, make_guest, efd = native.kvm, native.make_guest, native.efd

pytestmark = pytest.mark.kvm

BAR0, BAR1 = 0x8000, 0xC000
NOTIFY = BAR0 + 0x3000
MOVED_NOTIFY = BAR1 + 0x3000  # BAR 0 moved to 0xC000 once BAR 1 is out of the way
ECAM_DEV1 = 1 << 15


def write_al(gpa: int) -> bytes:
    return bytes([0xA2, *gpa.to_bytes(2, "little")])  # mov %al,gpa


def write_ax(gpa: int) -> bytes:
    return bytes([0xA3, *gpa.to_bytes(2, "little")])  # mov %ax,gpa


MARK = bytes([0xE6, DEBUG_PORT])  # out %al,$DEBUG_PORT
MOV_AX = bytes([0xB8, VALUE, 0])  # mov $VALUE,%ax


class Host:
    def __init__(self, vm: VmFd, notify: EventFd) -> None:
        self.mmio, root = Bus("mmio"), PciRoot()
        bases = {0: BAR0, 1: BAR1}
        self.function = PciFunctionHost(
            "blk0", virtio_function(1), (1, bases), self.mmio, vm, (notify.fd,)
        )
        self.function.plug(root)
        self.ecam = Ecam(root)

    def config_write(self, offset: int, value: bytes) -> None:
        self.ecam.write(ECAM_DEV1 + offset, value)


def test_notify_write_of_any_size_signals_ioeventfd_without_exit(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(MOV_AX + write_al(NOTIFY) + MARK + write_ax(NOTIFY) + MARK)
    Host(g.vm, efd)

    first, byte = g.vcpu.run(), efd.drain()
    second, word = g.vcpu.run(), efd.drain()

    assert (first, byte, second, word) == (PioOut(DEBUG_PORT, 1, bytes([VALUE])), 1) * 2


def test_notify_write_with_memory_decode_off_exits_to_userspace(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(MOV_AX + write_al(NOTIFY) + MARK)
    host = Host(g.vm, efd)
    host.config_write(0x04, b"\x00")

    assert (g.vcpu.run(), efd.drain()) == (MmioWrite(NOTIFY, bytes([VALUE])), 0)


def test_notify_follows_bar0_move_and_old_address_exits(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(MOV_AX + write_al(MOVED_NOTIFY) + MARK + write_al(NOTIFY) + MARK)
    host = Host(g.vm, efd)
    host.config_write(0x14, struct.pack("<I", 0xD000_0000))  # BAR 1 out of the way
    host.config_write(0x10, struct.pack("<I", BAR1))  # BAR 0 where BAR 1 was

    moved, signalled = g.vcpu.run(), efd.drain()
    old = g.vcpu.run()

    assert (moved, signalled, old) == (
        PioOut(DEBUG_PORT, 1, bytes([VALUE])),
        1,
        MmioWrite(NOTIFY, bytes([VALUE])),
    )


def test_msix_irqfd_raises_nothing_until_its_route_is_asked_for(
    make_guest: MakeGuest, efd: EventFd
) -> None:
    g = make_guest(loop(b""))
    enable_lapic(g.vcpu)
    routes = GsiRoutes(g.vm)
    vectors = MsiVectors("blk0", routes, routes.allocate(2, "blk0"))
    gsi = vectors.gsis[1]
    g.vm.register_irqfd(efd.fd, gsi)  # as the machine does at build time
    efd.trigger()
    g.vm.unregister_irqfd(efd.fd, gsi)  # returns once any injection is done
    before = lapic_irr_has(g.vcpu, 0x43)

    reason = vectors.route(1, MSI_ADDRESS_APIC0, 0x43)
    g.vm.register_irqfd(efd.fd, gsi)
    efd.trigger()
    g.vm.unregister_irqfd(efd.fd, gsi)

    assert (before, reason, lapic_irr_has(g.vcpu, 0x43)) == (False, "", True)


IOAPIC_IRR = 16  # struct kvm_ioapic_state: base_address u64, ioregsel u32, id u32, then irr


def ioapic_irr(vm: VmFd) -> int:
    chip = vm.get_irqchip(IRQCHIP_IOAPIC)
    return int.from_bytes(chip[IOAPIC_IRR : IOAPIC_IRR + 4], "little")


def test_intx_irqfd_with_resample_raises_its_ioapic_pin(make_guest: MakeGuest) -> None:
    """INTx as the monitor wires it (monitor/devicefds.py): a level irqfd with a resample fd on
    GSI 16 + device % 8. A device's write to it shows as that pin's bit in the IOAPIC's IRR
    (host side: no interrupt reaches a guest here), and only that pin's."""
    g = make_guest(MARK)
    pin = intx_gsi(1)
    intx, resample = EventFd(), EventFd()
    try:
        g.vm.register_irqfd(intx.fd, pin, resample_fd=resample.fd)
        before = ioapic_irr(g.vm)
        intx.trigger()
        after = ioapic_irr(g.vm)
        deadline = time.monotonic() + 2  # KVM injects from a work queue for an IOAPIC route
        while not after & (1 << pin) and time.monotonic() < deadline:
            time.sleep(0.001)
            after = ioapic_irr(g.vm)
        g.vm.unregister_irqfd(intx.fd, pin)
    finally:
        intx.close()
        resample.close()
    assert (before & (1 << pin), after & ~before) == (0, 1 << pin)
