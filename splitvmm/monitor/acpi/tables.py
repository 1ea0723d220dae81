"""The fixed-layout ACPI tables (ACPI 6.3 chapter 5): RSDP, XSDT, FADT, MADT and MCFG.

Every table is a packed little-endian struct; the layouts and revisions are the spec's
(iasl 20200925, the acpica-tools Debian ships, knows ACPI 6.3, so that is what we claim).
Each table's checksum byte makes its bytes sum to zero.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from splitvmm.record import Struct

OEM_ID = b"SPLITV"
OEM_TABLE_ID = b"SPLITVMM"
OEM_REVISION = 1
CREATOR_ID = b"SPVM"
CREATOR_REVISION = 1

# 5.2.6 system description table header: signature, length, revision, checksum, OEM id,
# OEM table id, OEM revision, creator id, creator revision.
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_CHECKSUM_OFFSET = 9
# 5.2.5.3 RSDP (revision 2): signature, checksum, OEM id, revision, RSDT address, length,
# XSDT address, extended checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_V1_LENGTH = 20  # the ACPI 1.0 checksum covers these bytes
RSDP_REVISION = 2
# 5.2.3.2 Generic Address Structure: space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

XSDT_REVISION = 1
FADT_REVISION, FADT_MINOR = 6, 3
FADT_LENGTH = 276  # table 5-34
MADT_REVISION = 5
MCFG_REVISION = 1
DSDT_REVISION = 2  # 64-bit integers in AML

# FADT flags (table 5-35) and offsets of the fields we fill (table 5-34).
FADT_WBINVD = 1 << 0  # WBINVD works (table 5-35: MUST be set by new systems)
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button (set: a control method one, or none)
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (table 5-36): what legacy hardware an OS may not probe for.
# The 8042 flag stays clear: the monitor serves port 0x64 for a reset only.
BOOT_ARCH_LEGACY_DEVICES = 1 << 0  # user-visible ISA devices: an OS loads a driver (serial)
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5
FADT_IAPC_BOOT_ARCH = 109
# The RTC's CMOS index of the century (the MC146818 model's, devprocs/rtc.py CENTURY): 0 in
# the FADT says there is none, and Linux then reads years as 1970-2069, never writing it.
FADT_CENTURY = 108
CMOS_CENTURY = 0x32
FADT_X_DSDT = 140
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268

# MADT (5.2.12): local APIC address, flags; then interrupt controller structures.
MADT_PCAT_COMPAT = 1  # the dual 8259s are there too (KVM's in-kernel PIC)
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0: uid, APIC id, flags
MADT_IOAPIC = struct.Struct("<BBBBII")  # type 1: id, reserved, address, GSI base
MADT_ISO = struct.Struct("<BBBBIH")  # type 2: bus, source, GSI, flags
MADT_LAPIC_NMI = struct.Struct("<BBBHB")  # type 4: uid, flags, LINT#
MADT_TYPE_LAPIC, MADT_TYPE_IOAPIC, MADT_TYPE_ISO, MADT_TYPE_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF
MPS_INTI_CONFORMS = 0x0000  # polarity and trigger as the bus says (table 5-49)
MPS_INTI_ACTIVE_HIGH_LEVEL = 0x000D  # active high (01b), level triggered (11b << 2)
LINT1 = 1

# MCFG (PCI Firmware 3.2 4.1.2): 8 reserved bytes, then per segment: base, segment,
# start bus, end bus, reserved.
MCFG_ALLOCATION = struct.Struct("<QHBBI")


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte zero) sum to 0 mod 256 (5.2.6)."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A whole system description table: header, body, checksum filled in."""
    header = SDT_HEADER.pack(
        signature, SDT_HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
        OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )  # fmt: skip
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(bytes(table))
    return bytes(table)


def rsdp(xsdt_gpa: int) -> bytes:
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_gpa, 0, bytes(3)))  # fmt: skip
    raw[8] = checksum(bytes(raw[:RSDP_V1_LENGTH]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def xsdt(table_gpas: Sequence[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_gpas))


def io_register(port: int) -> bytes:
    """A GAS for one byte-wide I/O port register."""
    return GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


class PmPorts(Struct, frozen=True):
    """The hardware-reduced registers (4.8.3.7, 4.8.3.6): where they live, what resets."""

    sleep_control: int
    sleep_status: int
    reset: int
    reset_value: int


def fadt(dsdt_gpa: int, pm: PmPorts, rtc: bool, legacy: bool) -> bytes:
    """A hardware-reduced FADT: no SCI, no PM1 blocks, no fixed-feature buttons; the reset
    register and the sleep control and status registers are ports the monitor serves.
    `rtc`: the CMOS clock is there, with its century byte (else the OS is told not to look
    for one); `legacy`: the DSDT declares a user-visible ISA device (a serial port)."""
    body = bytearray(FADT_LENGTH - SDT_HEADER.size)

    def put(offset: int, data: bytes) -> None:
        body[offset - SDT_HEADER.size : offset - SDT_HEADER.size + len(data)] = data

    flags = FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
    put(FADT_FLAGS, struct.pack("<I", flags | FADT_HW_REDUCED_ACPI))
    boot_arch = BOOT_ARCH_VGA_NOT_PRESENT | (0 if rtc else BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
    boot_arch |= BOOT_ARCH_LEGACY_DEVICES if legacy else 0
    put(FADT_IAPC_BOOT_ARCH, struct.pack("<H", boot_arch))
    put(FADT_CENTURY, bytes([CMOS_CENTURY if rtc else 0]))
    put(FADT_RESET_REG, io_register(pm.reset))
    put(FADT_RESET_VALUE, bytes([pm.reset_value]))
    put(FADT_MINOR_VERSION, bytes([FADT_MINOR]))
    put(FADT_X_DSDT, struct.pack("<Q", dsdt_gpa))
    put(FADT_SLEEP_CONTROL_REG, io_register(pm.sleep_control))
    put(FADT_SLEEP_STATUS_REG, io_register(pm.sleep_status))
    put(FADT_HYPERVISOR_VENDOR, b"SPLITVMM")
    return sdt(b"FACP", FADT_REVISION, bytes(body))


class Override(Struct, frozen=True):
    """An ISA interrupt source override: ISA `irq` arrives at `gsi`, with these flags."""

    irq: int
    gsi: int
    flags: int


def madt(nvcpus: int, lapic_base: int, ioapic_id: int, ioapic_base: int,
         overrides: Sequence[Override]) -> bytes:  # fmt: skip
    """One local APIC per vCPU (APIC id = vCPU index), the IOAPIC from GSI 0, the
    overrides, and NMI on every local APIC's LINT1 (as the MP table says)."""
    entries = [
        MADT_LOCAL_APIC.pack(MADT_TYPE_LAPIC, MADT_LOCAL_APIC.size, i, i, LAPIC_ENABLED)
        for i in range(nvcpus)
    ]
    entries.append(MADT_IOAPIC.pack(MADT_TYPE_IOAPIC, MADT_IOAPIC.size, ioapic_id, 0, ioapic_base, 0))  # fmt: skip
    entries += [
        MADT_ISO.pack(MADT_TYPE_ISO, MADT_ISO.size, 0, o.irq, o.gsi, o.flags) for o in overrides
    ]
    entries.append(
        MADT_LAPIC_NMI.pack(
            MADT_TYPE_LAPIC_NMI, MADT_LAPIC_NMI.size, ALL_PROCESSORS, MPS_INTI_CONFORMS, LINT1
        )
    )
    body = struct.pack("<II", lapic_base, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)


def mcfg(ecam_base: int, first_bus: int, last_bus: int) -> bytes:
    body = bytes(8) + MCFG_ALLOCATION.pack(ecam_base, 0, first_bus, last_bus, 0)
    return sdt(b"MCFG", MCFG_REVISION, body)
