"""A PCI device left dead (on_crash = "leave") against real KVM: the INTx interrupt raised for
its failure reaches the guest once the guest can take it. INTx is a level (PCI 3.0 2.2.6):
raised while the guest has the IOAPIC pin masked, it is delivered when the pin is unmasked,
as the IOAPIC samples a line still asserted. Through a level irqfd KVM lowers the line at
that unmasking (Linux 6.4+) and signals the resample fd, for whoever drives the line to
raise it again; the dead device was the one who did. The guest is real mode with a 4 GiB
DS limit (unreal mode, set through KVM_SET_SREGS) to reach the IOAPIC at 0xFEC00000."""

from __future__ import annotations

import pytest

from splitvmm.monitor.bus import Bus
from splitvmm.monitor.irqroutes import intx_gsi
from splitvmm.monitor.pci.function import PciFunctionHost
from splitvmm.monitor.supervisor import Supervisor
from splitvmm.native.exits import PioOut
from splitvmm.native.kvm import IOAPIC_REDIRTBL_OFFSET, IRQCHIP_IOAPIC, VcpuFd, VmFd
from splitvmm.protocol.models import PciFunction
from tests.integration import test_native_kvm as native
from tests.integration.test_native_kvm import (
    DEBUG_PORT,
    MakeGuest,
    enable_lapic,
    lapic_irr_has,
    loop,
    wait_until,
)
from tests.unit import test_machine_stop as machine_stop
from tests.unit.test_machine_stop import leaving_blk0

kvm, make_guest = native.kvm, native.make_guest
blk_irq_fds = machine_stop.blk_irq_fds
pytestmark = pytest.mark.kvm

DEVICE = 1  # the dead function's PCI device number
PIN = intx_gsi(DEVICE)
VECTOR = 0x51
LEVEL, MASKED = 1 << 15, 1 << 16  # redirection entry: trigger mode, mask (82093AA 3.2.4)
IOAPIC_BASE = 0xFEC00000
IOWIN = 0x10  # IOREGSEL at the base, IOWIN 0x10 past it (82093AA 3.1)
IOREDTBL = 0x10  # pin n's entry: registers 0x10 + 2n (low dword) and 0x11 + 2n


def unmask(pin: int, low: int) -> bytes:
    """Write `low` to `pin`'s redirection entry (what Linux's unmask_ioapic_irq does), then
    out %al,$DEBUG_PORT. 32-bit operands and addresses through the 0x66 and 0x67 prefixes."""
    return (
        bytes([0x66, 0xBB]) + IOAPIC_BASE.to_bytes(4, "little")  # mov $IOAPIC_BASE,%ebx
        + bytes([0x67, 0x66, 0xC7, 0x03])  # movl $register,(%ebx)
        + (IOREDTBL + 2 * pin).to_bytes(4, "little")
        + bytes([0x67, 0x66, 0xC7, 0x43, IOWIN])  # movl $low,IOWIN(%ebx)
        + low.to_bytes(4, "little")
        + bytes([0xE6, DEBUG_PORT])
    )  # fmt: skip


def unreal_mode(vcpu: VcpuFd) -> None:
    sregs = vcpu.get_sregs()
    sregs.ds.base, sregs.ds.selector, sregs.ds.limit, sregs.ds.g = 0, 0, 0xFFFFFFFF, 1
    vcpu.set_sregs(sregs)


def set_entry(vm: VmFd, pin: int, entry: int) -> None:
    chip = bytearray(vm.get_irqchip(IRQCHIP_IOAPIC))
    at = IOAPIC_REDIRTBL_OFFSET + 8 * pin
    chip[at : at + 8] = entry.to_bytes(8, "little")
    vm.set_irqchip(IRQCHIP_IOAPIC, bytes(chip))


def test_left_device_intx_raised_while_its_pin_is_masked_is_delivered_at_unmask(
    make_guest: MakeGuest, blk_irq_fds: dict[str, int]
) -> None:
    g = make_guest(loop(unmask(PIN, VECTOR | LEVEL)))
    unreal_mode(g.vcpu)
    enable_lapic(g.vcpu)
    set_entry(g.vm, PIN, VECTOR | LEVEL | MASKED)  # as Linux leaves a pin whose IRQ is disabled
    g.vm.register_irqfd(blk_irq_fds["intx"], PIN, resample_fd=blk_irq_fds["intx_resample"])
    host = PciFunctionHost("blk0", PciFunction(bars=(), intx=True), (DEVICE, {}), Bus("mmio"), g.vm)
    m, slot = leaving_blk0(blk_irq_fds, host)
    m._supervisor = supervisor = Supervisor()
    supervisor.start()
    try:
        assert m._device_failed(slot, "killed by SIGKILL") is False  # type: ignore[arg-type]
        wait_until(lambda: bool(g.vm.ioapic_irr() >> PIN & 1), "the dead device's INTx raised")

        ex = g.vcpu.run()

        wait_until(lambda: lapic_irr_has(g.vcpu, VECTOR), "its delivery at the unmask")
    finally:
        supervisor.close()
        g.vm.unregister_irqfd(blk_irq_fds["intx"], PIN)
    assert ex == PioOut(DEBUG_PORT, 1, b"\0")  # the guest unmasked the pin (%al is 0)
