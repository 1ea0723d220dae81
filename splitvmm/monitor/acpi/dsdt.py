"""The DSDT: the PCI root bridge, the legacy devices the config has, and the S5 sleep state.

The root bridge's _CRS hands out what layout.py gives PCI: bus 0 (what ECAM covers), all
of port space but the config ports, and the BAR window of the PCI hole. Its _PRT says which
GSI each PCI device's INTA# drives (the monitor's choice, monitor/irqroutes.py), in the
GSI form (ACPI 6.5 6.2.13: source 0, the GSI as the source index), as cloud-hypervisor
and Firecracker write it: no interrupt link devices to program. Legacy devices take their
ports, IRQ and PNP id from their model descriptors (protocol/models.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from splitvmm.monitor import layout
from splitvmm.monitor.acpi import aml
from splitvmm.monitor.acpi.tables import DSDT_REVISION, sdt
from splitvmm.monitor.platform import AcpiPm
from splitvmm.protocol.models import PortWindow

PCI_SEGMENT = 0
PORT_SPACE_END = 0xFFFF
# \_S5's SLP_TYPa: what the guest writes into SLP_TYPx of the sleep control register to
# power off (ACPI 6.3 7.4.2; any value will do, the monitor reads back the same one).
S5_SLEEP_TYPE = 5
PRT_ALL_FUNCTIONS = 0xFFFF  # a _PRT address: device << 16, any function
PRT_PIN_INTA = 0
PRT_GSI_SOURCE = 0  # no link device: the source index is the GSI itself


def prt_entry(device: int, gsi: int) -> bytes:
    """Package {address, pin, source, source index}: INTA# of `device` drives `gsi`."""
    return aml.package(
        aml.integer(device << 16 | PRT_ALL_FUNCTIONS),
        aml.integer(PRT_PIN_INTA),
        aml.integer(PRT_GSI_SOURCE),
        aml.integer(gsi),
    )


def pci_root_bridge(intx: Sequence[tuple[int, int]] = ()) -> bytes:
    """`intx`: (PCI device, GSI) of each device on bus 0 that has INTA#."""
    last_bus = layout.PCIE_ECAM_BUSES - 1
    config_end = layout.PCI_CONFIG_PORT + layout.PCI_CONFIG_WINDOW
    crs = aml.resource_template(
        aml.word_bus_number(0, last_bus),
        aml.dword_io(0, layout.PCI_CONFIG_PORT - 1),
        aml.io(layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_WINDOW),
        aml.dword_io(config_end, PORT_SPACE_END),
        aml.dword_memory(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - 1),
    )
    routing = [aml.name("_PRT", aml.package(*(prt_entry(d, g) for d, g in intx)))] if intx else []
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),  # PCI Express root bridge
        aml.name("_CID", aml.eisa_id("PNP0A03")),  # and a PCI root bridge, for older OSes
        aml.name("_SEG", aml.integer(PCI_SEGMENT)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
        *routing,
    )


def legacy_device(index: int, window: PortWindow) -> bytes:
    if window.acpi_hid is None:
        raise ValueError(f"port window at {window.base:#x} has no ACPI id")
    resources = [aml.io(window.base, window.size)]
    if window.irq is not None:
        resources.append(aml.irq_no_flags(window.irq))
    return aml.device(
        f"DV{index:02X}",
        aml.name("_HID", aml.eisa_id(window.acpi_hid)),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CRS", aml.resource_template(*resources)),
    )


def motherboard_resources() -> bytes:
    """PNP0C02: ranges the platform decodes that no device claims, for the OS to leave alone.
    ECAM must be one (PCI Firmware 3.2 4.1.2: the MCFG's range is reserved here, else Linux
    warns and stricter OSes fall back to 0xCF8), and the ACPI PM ports."""
    return aml.device(
        "MRES",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.memory32_fixed(layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE),
                aml.io(layout.ACPI_PM_PORT, AcpiPm.WINDOW),
            ),
        ),
    )


def dsdt(windows: Sequence[PortWindow], pci_intx: Sequence[tuple[int, int]] = ()) -> bytes:
    """`windows`: the configured devices' port windows that have an ACPI id; `pci_intx`:
    (PCI device, GSI) of each PCI device's INTA#."""
    devices = [legacy_device(i, w) for i, w in enumerate(windows)]
    board = motherboard_resources()
    body = aml.scope("_SB", pci_root_bridge(pci_intx), board, *devices) + aml.name(
        "_S5", aml.package(aml.integer(S5_SLEEP_TYPE), aml.integer(0))
    )
    return sdt(b"DSDT", DSDT_REVISION, body)
