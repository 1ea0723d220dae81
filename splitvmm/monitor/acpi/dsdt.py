"""The DSDT: a processor device per vCPU, the PCI root bridge, the legacy devices the config
has, the power button behind a Generic Event Device, and the S5 sleep state.

The root bridge's _CRS hands out what layout.py gives PCI: bus 0 (what ECAM covers), all
of port space but the config ports, and the BAR window of the PCI hole. Its _PRT says which
GSI each PCI device's INTA# drives (the monitor's choice, monitor/irqroutes.py), in the
GSI form (ACPI 6.5 6.2.13: source 0, the GSI as the source index), as cloud-hypervisor
and Firecracker write it: no interrupt link devices to program. Legacy devices take their
ports, IRQ and PNP id from their model descriptors (protocol/models.py).

A hardware-reduced platform has no fixed power button (the FADT says so) and no SCI: its
events come through a Generic Event Device (ACPI 6.3 5.6.9), as on QEMU's virt machines and
cloud-hypervisor. The GED's _CRS names its interrupt, and its _EVT, which the OS runs when
that interrupt comes, reads the monitor's event register (monitor/platform.py AcpiGed) and
notifies the power button device, a control method button (4.8.3.1.2, PNP0C0C): Linux's
button driver then reports KEY_POWER, and the init system shuts down (ACPI S5).
"""

from __future__ import annotations

from collections.abc import Sequence

from splitvmm.monitor import layout
from splitvmm.monitor.acpi import aml
from splitvmm.monitor.acpi.tables import DSDT_REVISION, sdt
from splitvmm.monitor.platform import GED_POWER_BUTTON, AcpiGed, AcpiPm
from splitvmm.protocol.models import PortWindow

PCI_SEGMENT = 0
PORT_SPACE_END = 0xFFFF
# \_S5's SLP_TYPa: what the guest writes into SLP_TYPx of the sleep control register to
# power off (ACPI 6.3 7.4.2; any value will do, the monitor reads back the same one).
S5_SLEEP_TYPE = 5
PRT_ALL_FUNCTIONS = 0xFFFF  # a _PRT address: device << 16, any function
PRT_PIN_INTA = 0
PRT_GSI_SOURCE = 0  # no link device: the source index is the GSI itself
PROCESSOR_HID = "ACPI0007"  # a processor device (ACPI 6.5 8.4): _UID = its MADT processor UID
GED_HID = "ACPI0013"  # Generic Event Device (ACPI 6.3 5.6.9)
POWER_BUTTON_HID = "PNP0C0C"  # a control method power button (4.8.3.1.2)
POWER_BUTTON_PRESSED = 0x80  # its Notify value (5.6.6, table 5-168)

# _OSC of a PCI host bridge (PCI Firmware 3.3 4.5): the UUID, and what its buffer's dwords say.
PCI_OSC_UUID = "33db4d5b-1ff7-401c-9657-7441c03dd766"
PCI_OSC_REVISION = 1
OSC_DWORDS = 3  # status, support, control
OSC_FAILURE, OSC_BAD_UUID, OSC_BAD_REVISION, OSC_MASKED = 0x02, 0x04, 0x08, 0x10  # in dword 1
# Control (dword 3) the OS may take: native PCIe hot plug, SHPC hot plug, PME, AER and the PCIe
# capability structure (4.5.1 table 4-5), as QEMU's q35 grants. Firmware here does none of
# them, so the OS loses nothing by owning them; the later bits (LTR, DPC, ...) are masked.
OSC_GRANTED = 0x1F


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
        pci_osc(),
    )


def pci_osc() -> bytes:
    """_OSC (UUID, revision, count, buffer): a host bridge that originates a PCI Express
    hierarchy must have one (PCI Firmware 3.3 4.5.1; ACPI 6.5 6.2.11.3); without it Linux
    logs the failure and turns ASPM off, and Windows takes no native control. It grants what
    the OS asks for within OSC_GRANTED, says so (dword 1 bit 4) when it masked a request, and
    flags an unknown UUID or revision, or a buffer too short for the control dword."""
    cdw1, cdw3 = aml.ref("CDW1"), aml.ref("CDW3")
    granted = aml.local(0)
    return aml.method(
        "_OSC",
        4,
        aml.create_dword_field(aml.arg(3), 0, "CDW1"),
        aml.if_(
            aml.lequal(aml.arg(0), aml.uuid(PCI_OSC_UUID)),
            aml.if_(
                aml.lnot(aml.lequal(aml.arg(1), aml.integer(PCI_OSC_REVISION))),
                aml.or_(cdw1, aml.integer(OSC_BAD_REVISION), cdw1),
            ),
            aml.if_(
                aml.lless(aml.arg(2), aml.integer(OSC_DWORDS)),
                aml.or_(cdw1, aml.integer(OSC_FAILURE), cdw1),
                aml.return_(aml.arg(3)),
            ),
            aml.create_dword_field(aml.arg(3), 8, "CDW3"),
            aml.store(cdw3, granted),
            aml.and_(granted, aml.integer(OSC_GRANTED), granted),
            aml.if_(
                aml.lnot(aml.lequal(cdw3, granted)),
                aml.or_(cdw1, aml.integer(OSC_MASKED), cdw1),
            ),
            aml.store(granted, cdw3),
        ),
        aml.else_(aml.or_(cdw1, aml.integer(OSC_BAD_UUID), cdw1)),
        aml.return_(aml.arg(3)),
    )


def processors(nvcpus: int) -> list[bytes]:
    """A processor device per vCPU (ACPI 6.5 5.2.12.2: each Local APIC entry of the MADT has
    a processor object in the namespace, matched by its UID; 8.4): what an OS binds its
    per-CPU drivers to (Linux's acpi_processor). The MADT gives vCPU i UID i."""
    return [
        aml.device(
            f"C{i:03X}",
            aml.name("_HID", aml.string(PROCESSOR_HID)),
            aml.name("_UID", aml.integer(i)),
        )
        for i in range(nvcpus)
    ]


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


def generic_event_device() -> bytes:
    """The GED (its interrupt, its event register, _EVT) and the power button it notifies.
    _EVT's argument is the interrupt's number: there is one, so it is not looked at."""
    events = aml.local(0)
    pressed = aml.lequal(
        aml.and_(events, aml.integer(GED_POWER_BUTTON), aml.NULL_TARGET),
        aml.integer(GED_POWER_BUTTON),
    )
    ged = aml.device(
        "GED",
        aml.name("_HID", aml.string(GED_HID)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(aml.extended_interrupt(layout.ACPI_GED_GSI))),
        aml.operation_region("EREG", aml.REGION_SYSTEM_IO, layout.ACPI_GED_PORT, AcpiGed.WINDOW),
        aml.field(
            "EREG", aml.FIELD_DWORD_ACC | aml.FIELD_WRITE_AS_ZEROS, ("ESEL", 8 * AcpiGed.WINDOW)
        ),
        aml.method(
            "_EVT",
            1,
            aml.store(aml.ref("ESEL"), events),  # read once: the read clears what it returns
            # one segment, found up the scope (5.3): iasl shortens \_SB.PWRB to it
            aml.if_(pressed, aml.notify("PWRB", POWER_BUTTON_PRESSED)),
            serialized=True,
        ),
    )
    button = aml.device(
        "PWRB",
        aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)),
        aml.name("_UID", aml.integer(0)),
    )
    return ged + button


def motherboard_resources() -> bytes:
    """PNP0C02: ranges the platform decodes that no device claims, for the OS to leave alone.
    ECAM must be one (PCI Firmware 3.2 4.1.2: the MCFG's range is reserved here, else Linux
    warns and stricter OSes fall back to 0xCF8), the ACPI PM ports and the GED's register."""
    return aml.device(
        "MRES",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.memory32_fixed(layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE),
                aml.io(layout.ACPI_PM_PORT, AcpiPm.WINDOW),
                aml.io(layout.ACPI_GED_PORT, AcpiGed.WINDOW),
            ),
        ),
    )


def dsdt(
    nvcpus: int, windows: Sequence[PortWindow], pci_intx: Sequence[tuple[int, int]] = ()
) -> bytes:
    """`windows`: the configured devices' port windows that have an ACPI id; `pci_intx`:
    (PCI device, GSI) of each PCI device's INTA#."""
    devices = [legacy_device(i, w) for i, w in enumerate(windows)]
    board = motherboard_resources()
    buses = (pci_root_bridge(pci_intx), board, generic_event_device())
    namespace = (*processors(nvcpus), *buses, *devices)
    body = aml.scope("_SB", *namespace) + aml.name(
        "_S5", aml.package(aml.integer(S5_SLEEP_TYPE), aml.integer(0))
    )
    return sdt(b"DSDT", DSDT_REVISION, body)
