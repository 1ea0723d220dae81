"""The Linux x86 zero page (struct boot_params) for the 64-bit boot protocol.

Layout comes from <asm/bootparam.h> through native/bootparams.py, so no offset
here is typed by hand. What goes in follows Documentation/arch/x86/boot.rst ("64-bit Boot
Protocol": zero-fill a boot_params, copy the kernel's setup header into it at
0x1f1, fill the loader fields) and, for an ELF vmlinux or a test guest, the
minimal header Firecracker and crosvm write.
"""

from __future__ import annotations

from splitvmm.errors import BootError
from splitvmm.monitor.layout import (
    CMDLINE,
    EBDA_START,
    FOUR_GIB,
    HIMEM_START,
    KVM_IDENTITY_MAP,
    KVM_PAGES_END,
    MMIO32_START,
    PCIE_ECAM_BASE,
    PCIE_ECAM_SIZE,
)
from splitvmm.native import bootparams as zero_page
from splitvmm.native.bootparams import ZeroPage
from splitvmm.record import Struct

# e820 address range types (ACPI 6.5 table 15.4, "Address Range Types").
E820_RAM = 1
E820_RESERVED = 2

# Setup header constants, boot.rst "The Real-Mode Kernel Header".
SETUP_HEADER_OFFSET = 0x1F1  # where the setup header starts, in the file and the zero page
# boot.rst "The Zero Page": edd_mbr_sig_buffer starts at 0x290, so a header copy stops there.
SETUP_HEADER_MAX = 0x290 - SETUP_HEADER_OFFSET
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
MIN_PROTOCOL_ELF = 0x020F  # what we claim for the minimal header of an ELF guest
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: "0xFF: undefined" (no assigned loader ID)
VID_MODE_NORMAL = 0xFFFF  # boot.rst vid_mode: 0xFFFF means "normal"
# boot.rst "Sample Boot Configuration": heap_end = 0xe000, heap_end_ptr = heap_end - 0x200.
HEAP_END_PTR = 0xE000 - 0x200
# Firecracker and crosvm put 16 MiB here for vmlinux (CONFIG_PHYSICAL_ALIGN upper bound).
ELF_KERNEL_ALIGNMENT = 0x1000000

ZERO_PAGE_SIZE = zero_page.ZERO_PAGE_SIZE


class E820Entry(Struct, frozen=True):
    addr: int
    size: int
    type: int


class SetupHeader(Struct, frozen=True):
    """The fields of a bzImage setup header the loader decides on (boot.rst field names)."""

    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    cmdline_size: int
    pref_address: int
    init_size: int


class BootSetup(Struct, frozen=True):
    """What the zero page says about this boot, all already placed in guest memory."""

    ram_size: int
    cmdline_size: int  # the longest command line the kernel takes, NUL excluded (ELF only)
    setup_header: bytes | None = None  # bzImage header bytes from file offset 0x1f1
    initrd_gpa: int = 0
    initrd_size: int = 0
    acpi_rsdp_addr: int = 0  # 0: no ACPI tables


def e820_map(ram_size: int) -> list[E820Entry]:
    """The guest's memory map: what Linux reads as the firmware's INT 15h E820 answer.

    Base memory up to the EBDA is RAM; the EBDA, VGA hole and BIOS area up to 1 MiB
    are reserved (our MP table and ACPI tables live there); RAM resumes at 1 MiB up
    to the 32-bit PCI hole and continues above 4 GiB. The ECAM window in the hole is
    reserved too: Linux uses an MCFG region only if the firmware reserved it. So are the
    pages KVM keeps for itself in the hole (its identity map and TSS, layout.py), as QEMU
    says: nothing the guest places there (a BAR it moves) would be what it reads back.
    """
    if ram_size <= HIMEM_START:
        raise BootError(
            f"guest RAM of {ram_size:#x} bytes is too small: Linux needs more than 1 MiB"
        )
    low_end = min(ram_size, MMIO32_START)
    table = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        E820Entry(HIMEM_START, low_end - HIMEM_START, E820_RAM),
        E820Entry(PCIE_ECAM_BASE, PCIE_ECAM_SIZE, E820_RESERVED),
        E820Entry(KVM_IDENTITY_MAP, KVM_PAGES_END - KVM_IDENTITY_MAP, E820_RESERVED),
    ]
    if ram_size > low_end:
        table.append(E820Entry(FOUR_GIB, ram_size - low_end, E820_RAM))
    return table


def parse_setup_header(raw: bytes) -> SetupHeader:
    """Read a bzImage setup header (the bytes from file offset 0x1f1 on)."""
    h = zero_page.setup_header(raw)
    return SetupHeader(
        version=h.version,
        setup_sects=h.setup_sects,
        syssize=h.syssize,
        loadflags=h.loadflags,
        xloadflags=h.xloadflags,
        initrd_addr_max=h.initrd_addr_max,
        kernel_alignment=h.kernel_alignment,
        relocatable_kernel=h.relocatable_kernel,
        cmdline_size=h.cmdline_size,
        pref_address=h.pref_address,
        init_size=h.init_size,
    )


def _fill_bzimage_header(bp: ZeroPage, raw: bytes) -> None:
    """Copy the kernel's header in, then set the fields boot.rst marks write/modify."""
    if len(raw) > SETUP_HEADER_MAX:
        raise BootError(f"setup header of {len(raw)} bytes runs past zero-page offset 0x290")
    bp.copy_setup_header(raw)
    hdr = bp.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.vid_mode = VID_MODE_NORMAL
    # The real-mode setup code never runs under the 64-bit protocol, but boot.rst asks
    # every loader with protocol >= 2.01 to declare a heap; QEMU and GRUB do the same.
    hdr.loadflags |= zero_page.CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    # The loader's fields, whatever the file holds there: no setup_data chain (a value from
    # the file would send the kernel walking one at a guest address of the file's choosing;
    # "write (special)"), and the default PC subarchitecture ("write (optional)").
    hdr.setup_data = 0
    hdr.hardware_subarch = 0
    hdr.hardware_subarch_data = 0
    # cmdline_size stays the kernel's own limit: the field is read-only for loaders.


def _fill_elf_header(bp: ZeroPage, cmdline_size: int) -> None:
    """The minimal header a vmlinux entered at startup_64 looks for (Firecracker, crosvm)."""
    hdr = bp.hdr
    hdr.boot_flag = BOOT_FLAG
    hdr.header = HDRS_MAGIC
    hdr.version = MIN_PROTOCOL_ELF
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT
    # boot.rst: "the maximum size of the command line without the terminating zero", as a
    # bzImage's own header holds it (COMMAND_LINE_SIZE - 1), not this line's length
    hdr.cmdline_size = cmdline_size


def build_zero_page(setup: BootSetup) -> bytes:
    """The struct boot_params to write at ZERO_PAGE (rsi points at it on entry)."""
    bp = ZeroPage()  # zero-filled, as boot.rst requires
    if setup.setup_header is None:
        _fill_elf_header(bp, setup.cmdline_size)
    else:
        _fill_bzimage_header(bp, setup.setup_header)
    hdr = bp.hdr
    hdr.cmd_line_ptr = CMDLINE
    bp.params.ext_cmd_line_ptr = 0  # CMDLINE is below 4 GiB
    # The loader keeps the initrd below 4 GiB, so the ext_ (high 32 bits) fields stay 0.
    if setup.initrd_gpa + setup.initrd_size > FOUR_GIB:
        raise BootError(f"initrd at {setup.initrd_gpa:#x} ends above 4 GiB")
    hdr.ramdisk_image = setup.initrd_gpa
    hdr.ramdisk_size = setup.initrd_size
    # Boot protocol 2.14's field; Linux reads it whatever version the header claims, and
    # an older kernel finds the same RSDP by scanning the BIOS area.
    bp.params.acpi_rsdp_addr = setup.acpi_rsdp_addr
    bp.set_e820([(e.addr, e.size, e.type) for e in e820_map(setup.ram_size)])
    return bp.to_bytes()
