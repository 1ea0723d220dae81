"""ACPI tables for a kernel boot, built by the monitor and written into guest RAM once.

They sit in the BIOS area (layout.ACPI_TABLES, reserved in the e820 map), RSDP first, so
Linux finds them through the zero page's acpi_rsdp_addr or by its own scan of
0xE0000-0xFFFFF. Modules: aml.py (the AML encoder), tables.py (the fixed-layout tables),
dsdt.py (the namespace).
"""

from __future__ import annotations

from collections.abc import Sequence

from splitvmm.errors import ConfigError
from splitvmm.monitor import layout
from splitvmm.monitor.acpi import tables
from splitvmm.monitor.acpi.dsdt import S5_SLEEP_TYPE, dsdt
from splitvmm.protocol.models import PortWindow
from splitvmm.record import Struct

__all__ = ["PM_PORTS", "S5_SLEEP_TYPE", "AcpiTables", "build"]

TABLE_ALIGN = 16  # the RSDP must be 16-byte aligned; the others keep the habit
# The PM registers (platform.AcpiPm): sleep control, sleep status, reset, in this order.
PM_PORTS = tables.PmPorts(
    sleep_control=layout.ACPI_PM_PORT,
    sleep_status=layout.ACPI_PM_PORT + 1,
    reset=layout.ACPI_PM_PORT + 2,
    reset_value=0x01,
)
# ISA IRQ n reaches IOAPIC pin n, edge-triggered, active high (KVM's default GSI routing, as
# the MP table states): no override. PCs make IRQ 9 level for the SCI; hardware-reduced ACPI
# has no SCI, and an override there would contradict the MP table.
OVERRIDES: tuple[tables.Override, ...] = ()
RTC_HID = "PNP0B00"  # the CMOS clock's id: without it, the FADT says there is none


class AcpiTables(Struct, frozen=True):
    base: int  # guest-physical address of `data`; the RSDP is its first bytes
    data: bytes


def _align(n: int) -> int:
    return -(-n // TABLE_ALIGN) * TABLE_ALIGN


def build(
    nvcpus: int,
    windows: Sequence[PortWindow],
    pci_intx: Sequence[tuple[int, int]] = (),
    base: int = layout.ACPI_TABLES,
) -> AcpiTables:
    """RSDP, then DSDT, FADT, MADT, MCFG and the XSDT pointing at the last three.
    `pci_intx`: (PCI device, GSI) of each PCI device's INTA# (the DSDT's _PRT); the MADT's
    IOAPIC covers GSIs 0-23, so pins 16-23 need no more."""
    blob = bytearray()
    rsdp_len = _align(tables.RSDP.size)

    def place(table: bytes) -> int:
        gpa = base + rsdp_len + len(blob)
        blob.extend(table.ljust(_align(len(table)), b"\x00"))
        return gpa

    dsdt_gpa = place(dsdt(nvcpus, windows, pci_intx))
    rtc = any(w.acpi_hid == RTC_HID for w in windows)
    legacy = any(w.acpi_hid not in (None, RTC_HID) for w in windows)  # the clock is no user's
    fadt_gpa = place(tables.fadt(dsdt_gpa, PM_PORTS, rtc, legacy))
    madt_gpa = place(
        tables.madt(nvcpus, layout.LAPIC_BASE, layout.IOAPIC_ID, layout.IOAPIC_BASE, OVERRIDES)
    )
    mcfg_gpa = place(tables.mcfg(layout.PCIE_ECAM_BASE, 0, layout.PCIE_ECAM_BUSES - 1))
    xsdt_gpa = place(tables.xsdt([fadt_gpa, madt_gpa, mcfg_gpa]))
    data = tables.rsdp(xsdt_gpa).ljust(rsdp_len, b"\x00") + bytes(blob)
    if base + len(data) > layout.ACPI_TABLES_END:
        raise ConfigError(f"the ACPI tables for {nvcpus} vCPUs do not fit below 1 MiB")
    return AcpiTables(base, data)
