"""The DSDT: the PCI root bridge, the legacy devices the config has, and the S5 sleep state.

The root bridge's _CRS hands out what layout.py gives PCI: bus 0 (what ECAM covers), all
of port space but the config ports, and the BAR window of the PCI hole. Legacy devices
take their ports, IRQ and PNP id from their model descriptors (protocol/models.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from splitvmm.monitor import layout
from splitvmm.monitor.acpi import aml
from splitvmm.monitor.acpi.tables import DSDT_REVISION, sdt
from splitvmm.protocol.models import PortWindow

PCI_SEGMENT = 0
PORT_SPACE_END = 0xFFFF
# \_S5's SLP_TYPa: what the guest writes into SLP_TYPx of the sleep control register to
# power off (ACPI 6.3 7.4.2; any value will do, the monitor reads back the same one).
S5_SLEEP_TYPE = 5


def pci_root_bridge() -> bytes:
    last_bus = layout.PCIE_ECAM_BUSES - 1
    config_end = layout.PCI_CONFIG_PORT + layout.PCI_CONFIG_WINDOW
    crs = aml.resource_template(
        aml.word_bus_number(0, last_bus),
        aml.dword_io(0, layout.PCI_CONFIG_PORT - 1),
        aml.io(layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_WINDOW),
        aml.dword_io(config_end, PORT_SPACE_END),
        aml.dword_memory(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - 1),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),  # PCI Express root bridge
        aml.name("_CID", aml.eisa_id("PNP0A03")),  # and a PCI root bridge, for older OSes
        aml.name("_SEG", aml.integer(PCI_SEGMENT)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
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


def dsdt(windows: Sequence[PortWindow]) -> bytes:
    """`windows`: the configured devices' port windows that have an ACPI id."""
    devices = [legacy_device(i, w) for i, w in enumerate(windows)]
    body = aml.scope("_SB", pci_root_bridge(), *devices) + aml.name(
        "_S5", aml.package(aml.integer(S5_SLEEP_TYPE), aml.integer(0))
    )
    return sdt(b"DSDT", DSDT_REVISION, body)
