"""pc_default_routes mirrors the table KVM_CREATE_IRQCHIP installs (irq_comm.c)."""

from __future__ import annotations

from splitvmm.native.routing import (
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    IrqchipRoute,
    pc_default_routes,
)


def test_pc_default_routes_wire_isa_irqs_to_pic_and_ioapic() -> None:
    routes = pc_default_routes()

    assert [r for r in routes if r.gsi in (4, 9)] == [
        IrqchipRoute(4, IRQCHIP_IOAPIC, 4),
        IrqchipRoute(4, IRQCHIP_PIC_MASTER, 4),
        IrqchipRoute(9, IRQCHIP_IOAPIC, 9),
        IrqchipRoute(9, IRQCHIP_PIC_SLAVE, 1),
    ]


def test_pc_default_routes_wire_gsi_16_to_23_to_the_ioapic_alone() -> None:
    routes = pc_default_routes()

    assert [r for r in routes if r.gsi >= 16] == [
        IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi) for gsi in range(16, 24)
    ]
