"""GSI routes for KVM_SET_GSI_ROUTING: what an irqfd or KVM_IRQ_LINE on a GSI raises.

KVM_CREATE_IRQCHIP installs the PC wiring (pc_default_routes); KVM_SET_GSI_ROUTING
replaces the whole table, so a caller that adds MSI routes passes the default
routes along with them or legacy interrupts (the serial's IRQ 4) stop arriving.
"""

from __future__ import annotations

from splitvmm.native._kvm import lib
from splitvmm.record import Struct

IRQCHIP_PIC_MASTER: int = lib.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE: int = lib.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC: int = lib.KVM_IRQCHIP_IOAPIC
IOAPIC_NUM_PINS: int = lib.KVM_IOAPIC_NUM_PINS
PIC_LINES = 16  # two cascaded 8259As, 8 lines each (ISA IRQ 0-15)
PIC_CHIP_LINES = 8


class IrqchipRoute(Struct, frozen=True):
    """GSI `gsi` drives `pin` of an in-kernel interrupt controller (IRQCHIP_*)."""

    gsi: int
    irqchip: int
    pin: int


class MsiRoute(Struct, frozen=True):
    """GSI `gsi` sends the message `data` to `address` (a 64-bit MSI address)."""

    gsi: int
    address: int
    data: int


GsiRoute = IrqchipRoute | MsiRoute


def pc_default_routes() -> list[GsiRoute]:
    """The table KVM_CREATE_IRQCHIP sets up (arch/x86/kvm/irq_comm.c, default_routing):
    GSI 0-15 to both the IOAPIC pin and the PIC line of the same number, GSI 16-23 to the
    IOAPIC alone."""
    routes: list[GsiRoute] = []
    for gsi in range(IOAPIC_NUM_PINS):
        routes.append(IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi))
        if gsi < PIC_LINES:
            chip = IRQCHIP_PIC_MASTER if gsi < PIC_CHIP_LINES else IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % PIC_CHIP_LINES))
    return routes
