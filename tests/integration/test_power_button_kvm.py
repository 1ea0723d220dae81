"""The power button against real KVM: `ctl power-button` (Machine._power_button) sets the
GED's event and pulses its GSI through the irqfd the machine wires, which KVM's IOAPIC
delivers to the LAPIC when the guest has the pin unmasked, as Linux's acpi-ged driver
leaves it. The guest's _EVT then reads the event register once: it reads the event, then
nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitvmm.monitor import cpuid, layout, restore
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.control import ControlError
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.platform import GED_POWER_BUTTON, AcpiGed
from splitvmm.native.eventfd import EventFd
from splitvmm.native.kvm import Kvm, VmFd
from tests.integration import test_native_kvm as native
from tests.integration.test_native_kvm import (
    PIO_WRITE_LOOP,
    MakeGuest,
    enable_lapic,
    lapic_irr_has,
    loop,
    unmask_ioapic_pin,
    wait_until,
)
from tests.integration.test_snapshot_irq_order_kvm import OlderSnapshot, coordinator_saves

kvm, make_guest = native.kvm, native.make_guest
pytestmark = pytest.mark.kvm

VECTOR = 0x39
EVENT = GED_POWER_BUTTON.to_bytes(AcpiGed.WINDOW, "little")


def wired_machine(vm: VmFd, firmware: str | None = None) -> Machine:
    """A Machine as _create_platform leaves its GED: on the port bus, its irqfd on `vm`."""
    m = Machine.__new__(Machine)
    m.cfg = SimpleNamespace(vm=SimpleNamespace(name="t"), boot=SimpleNamespace(firmware=firmware))
    m.vm, m.pio, m._closables = vm, Bus("pio"), []
    m.ged = AcpiGed(m._ged_interrupt)
    m._wire_ged()
    return m


def test_power_button_reaches_the_lapic_of_a_guest_that_unmasked_the_geds_pin(
    make_guest: MakeGuest,
) -> None:
    g = make_guest(PIO_WRITE_LOOP)
    enable_lapic(g.vcpu)
    unmask_ioapic_pin(g.vm, layout.ACPI_GED_GSI, VECTOR)
    m = wired_machine(g.vm)
    try:
        assert m._power_button({"op": "power-button"}) == {"pressed": "power-button"}

        wait_until(lambda: lapic_irr_has(g.vcpu, VECTOR), "the GED's interrupt")
        assert m.pio.read(layout.ACPI_GED_PORT, AcpiGed.WINDOW) == EVENT
        assert m.pio.read(layout.ACPI_GED_PORT, AcpiGed.WINDOW) == bytes(AcpiGed.WINDOW)
    finally:
        for closable in m._closables:
            closable.close()


def test_power_button_of_a_guest_with_the_pin_masked_waits_in_the_event_register(
    make_guest: MakeGuest,
) -> None:
    """An edge on a masked IOAPIC pin is not delivered, as on a PC: the event stays for the
    next _EVT the guest runs, at a second press (Linux's acpi-ged does not run it when it
    unmasks the pin; QEMU's GED is the same)."""
    g = make_guest(PIO_WRITE_LOOP)
    enable_lapic(g.vcpu)
    m = wired_machine(g.vm)
    try:
        m._power_button({"op": "power-button"})

        assert not lapic_irr_has(g.vcpu, VECTOR)
        assert g.vm.ioapic_irr() >> layout.ACPI_GED_GSI & 1 == 0  # the pulse left no level
        assert m.pio.read(layout.ACPI_GED_PORT, AcpiGed.WINDOW) == EVENT
    finally:
        for closable in m._closables:
            closable.close()


def test_power_button_of_a_firmware_boot_is_refused_naming_why(make_guest: MakeGuest) -> None:
    g = make_guest(PIO_WRITE_LOOP)
    m = wired_machine(g.vm, firmware="/usr/share/seabios/bios.bin")
    try:
        with pytest.raises(ControlError, match="booted a firmware, whose ACPI tables"):
            m._power_button({"op": "power-button"})
        assert m.ged.events == 0
    finally:
        for closable in m._closables:
            closable.close()


def test_press_whose_edge_landed_after_the_save_gets_an_interrupt_once_restored(
    make_guest: MakeGuest, kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM injects an IOAPIC-routed irqfd from a kernel worker, after the eventfd write has
    returned (ms later on a loaded host: test_snapshot_irq_order_kvm.py). A `ctl suspend`
    right after `ctl power-button` can read the irqchip and the LAPIC before the edge lands:
    the snapshot then holds the event and no interrupt, and an edge pin keeps nothing. The
    restore raises the interrupt again for an unread event (AcpiGed.resend), once the LAPICs
    are set; a second edge is harmless (_EVT reads the register once)."""
    old = make_guest(loop(b""))
    old.vm.create_pit2()
    cpuid.setup_cpuid(kvm, old.vcpu, 1)
    enable_lapic(old.vcpu)
    unmask_ioapic_pin(old.vm, layout.ACPI_GED_GSI, VECTOR)  # acpi-ged's request_irq unmasked it
    irq = EventFd()
    old.vm.register_irqfd(irq.fd, layout.ACPI_GED_GSI)
    ged = AcpiGed(lambda: None)  # its edge comes late: late_edge() injects it
    ged.signal(GED_POWER_BUTTON)  # `ctl power-button`, answered before `ctl suspend`

    def late_edge() -> None:
        irq.trigger()  # the kernel worker injects the edge now, after both reads
        wait_until(lambda: lapic_irr_has(old.vcpu, VECTOR), "the late edge")

    try:
        saved = coordinator_saves(monkeypatch, kvm, old, ged, before_write=late_edge)
    finally:
        old.vm.unregister_irqfd(irq.fd, layout.ACPI_GED_GSI)
        irq.close()
    assert saved["vm"].ged_events == GED_POWER_BUTTON

    new = make_guest(loop(b""))
    new.vm.create_pit2()
    irq2 = EventFd()
    new.vm.register_irqfd(irq2.fd, layout.ACPI_GED_GSI)  # as Machine._wire_ged does at build
    ged2 = AcpiGed(irq2.trigger)
    try:
        m2 = SimpleNamespace(
            kvm=kvm, vm=new.vm, vcpu_fds=[new.vcpu], mem=None, firmware=None, ged=ged2
        )
        snap = OlderSnapshot([saved["vcpu"]], saved["vm"])
        restore.apply(snap, restore.decode_states(snap), m2)  # type: ignore[arg-type]
        assert ged2.events == GED_POWER_BUTTON  # what the guest's _EVT will read
        wait_until(lambda: lapic_irr_has(new.vcpu, VECTOR), "the restored press's interrupt")
    finally:
        new.vm.unregister_irqfd(irq2.fd, layout.ACPI_GED_GSI)
        irq2.close()
