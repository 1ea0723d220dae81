"""An Intel MultiProcessor Specification 1.4 table: how Linux finds the vCPUs and IOAPIC.

Without ACPI, Linux (arch/x86/kernel/mpparse.c) scans the last KiB of base memory
for the floating pointer "_MP_", follows it to the configuration table "PCMP"
and reads one entry per processor, bus, I/O APIC and interrupt source. No
kernel UAPI header describes these records, so the layouts below are the spec's
own (MP spec 1.4 chapter 4, tables 4-1 to 4-12), each a packed little-endian
struct of the size the spec gives.

Wiring described here is the PC's (MP spec 5.1 "virtual wire" default, as
Firecracker and crosvm do): ISA IRQ n -> IOAPIC pin n (KVM's default GSI routing),
the 8259 on the BSP's LINT0 (ExtINT) and NMI on LINT1 of every local APIC. Each PCI
device's INTA# has its own entry too (4.3.4: one per connected IOAPIC input), from the
PCI bus, whose ID is its bus number (0, as Linux's IO_APIC_get_PCI_irq_vector matches
it); the ISA bus then takes ID 1, as SeaBIOS numbers them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from splitvmm.config import MAX_VCPUS
from splitvmm.errors import ConfigError
from splitvmm.monitor.layout import HIMEM_START, IOAPIC_BASE, IOAPIC_ID, LAPIC_BASE, MPTABLE

if TYPE_CHECKING:
    from splitvmm.monitor.loader import GuestRam
    from splitvmm.native.kvm import CpuidEntry

# Table 4-1: signature, physical pointer, length (16-byte units), spec rev, checksum,
# feature bytes 1-5. Feature byte 1 = 0: a configuration table is present.
MPF_INTEL = struct.Struct("<4sIBBB5s")
# Table 4-2: signature, base table length, spec rev, checksum, OEM id, product id,
# OEM table pointer and size, entry count, LAPIC address, extended length/checksum, reserved.
MPC_TABLE = struct.Struct("<4sHBB8s12sIHHIHBB")
MPC_CPU = struct.Struct("<BBBBII8s")  # table 4-4: processor entry, 20 bytes
MPC_BUS = struct.Struct("<BB6s")  # table 4-8: bus entry, 8 bytes
MPC_IOAPIC = struct.Struct("<BBBBI")  # table 4-10: I/O APIC entry, 8 bytes
MPC_INTSRC = struct.Struct("<BBHBBBB")  # table 4-11/4-12: interrupt entries, 8 bytes each

MP_SPEC_REV = 4  # 1.4
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = range(4)  # table 4-13: interrupt types
CPU_ENABLED, CPU_BSP = 1 << 0, 1 << 1
MPC_APIC_USABLE = 1 << 0
IRQ_FLAGS_CONFORM = 0  # polarity and trigger "conform to the bus" (table 4-11)
APIC_VERSION = 0x14  # what KVM's local APIC reports in its version register
IOAPIC_VERSION = 0x11  # 82093AA, the version KVM's IOAPIC reports
BUS_ISA = b"ISA   "  # table 4-9 bus type strings are blank-padded
BUS_PCI = b"PCI   "
ISA_BUS_ID = 0  # with no PCI interrupt; else PCI is bus 0 and ISA bus 1
PCI_BUS_ID = 0
PCI_INTA = 0  # source bus IRQ of a PCI interrupt: device << 2 | pin (INTA# = 0)
ISA_IRQS = 16
LINT0, LINT1 = 0, 1
ALL_LAPICS = 0xFF
BSP_APIC_ID = 0
OEM_ID = b"SPLITVMM"
PRODUCT_ID = b"SPLITVMM".ljust(12, b" ")
# With no CPUID given: family 6 and FPU|APIC, as Firecracker writes.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_FEATURE_FLAGS = (1 << 0) | (1 << 9)
CPU_SIGNATURE_MASK = 0xFFF  # table 4-5: stepping, model, family; bits 31:12 reserved


def _checksum(data: bytes) -> int:
    """The byte that makes the structure sum to 0 mod 256 (MP spec 4.1, 4.2)."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([_checksum(data)]) + data[at + 1 :]


def _entries(
    nvcpus: int, signature: int, features: int, pci_intx: Sequence[tuple[int, int]] = ()
) -> list[bytes]:
    isa = ISA_BUS_ID + 1 if pci_intx else ISA_BUS_ID
    buses = [MPC_BUS.pack(MP_BUS, PCI_BUS_ID, BUS_PCI)] if pci_intx else []
    buses.append(MPC_BUS.pack(MP_BUS, isa, BUS_ISA))
    cpus = [
        MPC_CPU.pack(
            MP_PROCESSOR, i, APIC_VERSION, CPU_ENABLED | (CPU_BSP if i == 0 else 0),
            signature, features, bytes(8),
        )
        for i in range(nvcpus)
    ]  # fmt: skip
    irqs = [
        MPC_INTSRC.pack(MP_INTSRC, MP_INT, IRQ_FLAGS_CONFORM, isa, irq, IOAPIC_ID, irq)
        for irq in range(ISA_IRQS)
    ]
    irqs += [
        MPC_INTSRC.pack(
            MP_INTSRC, MP_INT, IRQ_FLAGS_CONFORM, PCI_BUS_ID, device << 2 | PCI_INTA,
            IOAPIC_ID, gsi,
        )
        for device, gsi in pci_intx
    ]  # fmt: skip
    lints = [
        # The 8259's INTR reaches only the BSP (SeaBIOS and Firecracker say APIC 0 too).
        MPC_INTSRC.pack(MP_LINTSRC, MP_EXTINT, IRQ_FLAGS_CONFORM, isa, 0, BSP_APIC_ID, LINT0),
        MPC_INTSRC.pack(MP_LINTSRC, MP_NMI, IRQ_FLAGS_CONFORM, isa, 0, ALL_LAPICS, LINT1),
    ]
    return [
        *cpus,
        *buses,
        MPC_IOAPIC.pack(MP_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_BASE),
        *irqs,
        *lints,
    ]


def build_mptable(
    nvcpus: int,
    leaf1: CpuidEntry | None = None,
    base: int = MPTABLE,
    pci_intx: Sequence[tuple[int, int]] = (),
) -> bytes:
    """Floating pointer then configuration table, to be written at `base`.

    `leaf1` is the vCPUs' CPUID leaf 1; its signature and feature flags go into each
    processor entry (table 4-5, 4-6). `pci_intx`: (PCI device, GSI) of each INTA# on bus 0,
    as the DSDT's _PRT says.
    """
    if not 1 <= nvcpus <= MAX_VCPUS:
        raise ConfigError(f"an MP table describes 1 to {MAX_VCPUS} vCPUs, not {nvcpus}")
    signature, features = DEFAULT_CPU_SIGNATURE, DEFAULT_FEATURE_FLAGS
    if leaf1 is not None:
        signature, features = leaf1.eax & CPU_SIGNATURE_MASK, leaf1.edx
    entries = _entries(nvcpus, signature, features, pci_intx)
    body = b"".join(entries)
    length = MPC_TABLE.size + len(body)
    header = MPC_TABLE.pack(
        b"PCMP", length, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0, len(entries), LAPIC_BASE,
        0, 0, 0,
    )  # fmt: skip
    table = _with_checksum(header + body, 7)  # checksum is byte 7 of the header
    mpf = MPF_INTEL.pack(b"_MP_", base + MPF_INTEL.size, 1, MP_SPEC_REV, 0, bytes(5))
    out = _with_checksum(mpf, 10) + table  # checksum is byte 10 of the floating pointer
    if base + len(out) > HIMEM_START:
        raise ConfigError(f"the MP table for {nvcpus} vCPUs does not fit below 1 MiB")
    return out


def write_mptable(
    mem: GuestRam,
    nvcpus: int,
    leaf1: CpuidEntry | None = None,
    pci_intx: Sequence[tuple[int, int]] = (),
) -> int:
    """Write the MP table at MPTABLE; returns its size in bytes."""
    data = build_mptable(nvcpus, leaf1, pci_intx=pci_intx)
    mem.write(MPTABLE, data)
    return len(data)
