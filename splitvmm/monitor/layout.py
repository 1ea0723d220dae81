"""The guest-physical address map: where RAM, boot structures and holes live (x86_64).

Low memory follows what Linux expects from a PC (and what Firecracker and QEMU
use): boot structures in the first 640 KiB, the EBDA and BIOS area reserved,
RAM from 1 MiB up to the 32-bit PCI hole, the rest of RAM above 4 GiB.
"""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

PAGE_SIZE = 4096

# Boot structures written by the loader (all below 640 KiB, in RAM).
BOOT_GDT = 0x500  # GDT for the 64-bit entry
BOOT_IDT = 0x520  # empty IDT (limit 0): any exception before the kernel's own IDT is a triple fault
ZERO_PAGE = 0x7000  # struct boot_params
BOOT_STACK_TOP = 0x8FF0  # initial RSP
PML4 = 0x9000  # identity page tables: PML4, PDPT, then 4 page directories (4 GiB of 2 MiB pages)
PDPT = 0xA000
PD_BASE = 0xB000  # four pages: 0xB000..0xEFFF
CMDLINE = 0x20000
CMDLINE_MAX = 4096  # the area for the command line, NUL included (x86 Linux reads 2048 of it)
MPTABLE = 0x9FC00  # MP floating pointer + config table, in the last KiB of base memory
EBDA_START = 0x9FC00  # from here to 1 MiB is reserved in the e820 map
HIMEM_START = 0x100000  # 1 MiB: bzImage protected-mode kernel loads here

# ACPI tables (kernel boot only): in the BIOS area, reserved in the e820 map, where an OS
# that ignores the zero page's acpi_rsdp_addr still finds the RSDP (ACPI 6.5 5.2.5.1: a
# 16-byte aligned scan of 0xE0000-0xFFFFF). A firmware boot copies its image's tail here instead
# (FIRMWARE_SHADOW).
ACPI_TABLES = 0xE0000
ACPI_TABLES_END = HIMEM_START

# The 32-bit PCI hole: [MMIO32_START, 4 GiB) has no RAM.
MMIO32_START = 3 * GIB
FOUR_GIB = 4 * GIB
# Inside the hole: the window BARs are placed in (announced in the root bridge's _CRS),
# then the ECAM (PCI Express memory-mapped configuration) window, 1 MiB per bus, bus 0 only.
PCI_MMIO32_START = MMIO32_START
PCI_MMIO32_END = 0xE0000000
PCIE_ECAM_BASE = 0xE0000000
PCIE_ECAM_BUSES = 1
PCIE_ECAM_SIZE = PCIE_ECAM_BUSES * MIB
IOAPIC_BASE = 0xFEC00000
# The IOAPIC's ID in the MP table and the MADT: the one its ID register holds. KVM's in-kernel
# IOAPIC resets that register to 0 and keeps 4 bits of it, as the 82093AA does, so an ID
# after the vCPUs' APIC IDs (from 16 vCPUs on) could not even be written there. QEMU's MADT
# says 0 too. Linux wants I/O APIC IDs unique among I/O APICs only (io_apic_unique_id), but
# on a 32-bit kernel with a pre-xAPIC local APIC; ours report version 0x14, an xAPIC.
IOAPIC_ID = 0
LAPIC_BASE = 0xFEE00000
# KVM needs three pages for the TSS and one for the identity map, in no slot (QEMU's choice).
KVM_IDENTITY_MAP = 0xFEFFC000
KVM_TSS = 0xFEFFD000
KVM_PAGES_END = KVM_TSS + 3 * PAGE_SIZE  # 0xFF000000

# Firmware (flat binary, like QEMU -bios): its ROM, mapped read-only so that it ends at 4 GiB,
# and its shadow: its last 128 KiB (all of a smaller image) copied at boot into guest RAM just
# below 1 MiB, where the reset vector (F000:FFF0) reads it in real mode. A PC's firmware makes
# that range writable RAM before it runs from it (SeaBIOS keeps its variables there; without
# the i440FX's PAM registers, which we do not have, it finds it writable already, as on
# QEMU's isapc machine, whose BIOS is RAM), and as guest RAM it is in every snapshot.
FIRMWARE_MAX = 16 * MIB
FIRMWARE_SHADOW = 128 * KIB

# Legacy PC I/O ports.
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
DEBUG_EXIT_PORT = 0xF4  # QEMU isa-debug-exit: status (value << 1) | 1
PCI_CONFIG_PORT = 0xCF8  # PCI configuration mechanism #1: address 0xCF8, data 0xCFC-0xCFF
PCI_CONFIG_WINDOW = 8
# The hardware-reduced ACPI registers the FADT points at (sleep control, sleep status,
# reset), served by the monitor; 0x600 is free on a PC (cloud-hypervisor's choice too).
ACPI_PM_PORT = 0x600
# The Generic Event Device's event register (monitor/platform.py AcpiGed), after them, and
# the GSI of its interrupt: an ISA IRQ nothing else here uses (COM1 has 4, the RTC 8, PCI
# INTx 16-23), edge-triggered and active high as ISA IRQs are, so no MADT override is needed.
# 9 is the SCI's on a PC, which a hardware-reduced platform does not have.
ACPI_GED_PORT = 0x604
ACPI_GED_GSI = 9


def ram_ranges(ram_size: int) -> list[tuple[int, int]]:
    """(gpa, size) of guest RAM: below the PCI hole, then the rest above 4 GiB."""
    low = min(ram_size, MMIO32_START)
    ranges = [(0, low)]
    if ram_size > low:
        ranges.append((FOUR_GIB, ram_size - low))
    return ranges
