"""Synthetic kernel images for loader tests, written from the specs, not from loader.py.

ELF64: System V gABI (Elf64_Ehdr is 64 bytes, Elf64_Phdr 56). bzImage: the setup
header offsets of Documentation/arch/x86/boot.rst.
"""

from __future__ import annotations

import struct

from splitvmm.record import Struct

MIB = 1 << 20

# gABI: e_ident (magic, class, data, version, pad), then the rest of Elf64_Ehdr.
EHDR = struct.Struct("<4sBBB9sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


class Seg(Struct, frozen=True):
    paddr: int
    data: bytes
    memsz: int | None = None  # default: len(data)
    vaddr: int | None = None  # default: paddr
    p_type: int = 1  # PT_LOAD


def make_elf(
    segments: list[Seg],
    entry: int,
    *,
    elf_class: int = 2,
    machine: int = 62,
    e_type: int = 2,
) -> bytes:
    """An ELF64 executable whose segment data follows the program header table."""
    offset = EHDR.size + PHDR.size * len(segments)
    phdrs, blobs = b"", b""
    for s in segments:
        memsz = len(s.data) if s.memsz is None else s.memsz
        vaddr = s.paddr if s.vaddr is None else s.vaddr
        phdrs += PHDR.pack(s.p_type, 5, offset, vaddr, s.paddr, len(s.data), memsz, 0x1000)
        blobs += s.data
        offset += len(s.data)
    ehdr = EHDR.pack(
        b"\x7fELF", elf_class, 1, 1, bytes(9), e_type, machine, 1, entry,
        EHDR.size, 0, 0, EHDR.size, PHDR.size, len(segments), 64, 0, 0,
    )  # fmt: skip
    return ehdr + phdrs + blobs


# boot.rst "The Real-Mode Kernel Header": offset -> (struct format, field).
BZ_FIELDS = {
    "setup_sects": (0x1F1, "<B"),
    "syssize": (0x1F4, "<I"),
    "boot_flag": (0x1FE, "<H"),
    "jump": (0x200, "<H"),
    "header": (0x202, "<4s"),
    "version": (0x206, "<H"),
    "loadflags": (0x211, "<B"),
    "code32_start": (0x214, "<I"),
    "initrd_addr_max": (0x22C, "<I"),
    "kernel_alignment": (0x230, "<I"),
    "relocatable_kernel": (0x234, "<B"),
    "xloadflags": (0x236, "<H"),
    "cmdline_size": (0x238, "<I"),
    "hardware_subarch": (0x23C, "<I"),
    "hardware_subarch_data": (0x240, "<Q"),
    "setup_data": (0x250, "<Q"),
    "pref_address": (0x258, "<Q"),
    "init_size": (0x260, "<I"),
}
HEADER_END = 0x26C  # protocol 2.15 ends with kernel_info_offset at 0x268


def make_bzimage(payload: bytes = b"\x90" * 4096, **overrides: int | bytes) -> bytes:
    """A bzImage: setup sectors with a protocol 2.15 header, then `payload` as the kernel."""
    fields: dict[str, int | bytes] = {
        "setup_sects": 4,
        "syssize": len(payload) // 16,
        "boot_flag": 0xAA55,
        "jump": 0xEB | (HEADER_END - 0x202) << 8,  # jmp short to the end of the header
        "header": b"HdrS",
        "version": 0x020F,
        "loadflags": 0x01,  # LOADED_HIGH
        "code32_start": 0x100000,
        "initrd_addr_max": 0x7FFFFFFF,
        "kernel_alignment": 0x200000,
        "relocatable_kernel": 1,
        "xloadflags": 0x03,  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        "cmdline_size": 2047,
        "pref_address": 0x1000000,
        "init_size": 8 * MIB,
    }
    fields.update(overrides)
    sects = int(fields["setup_sects"]) or 4
    image = bytearray((sects + 1) * 512)
    for name, value in fields.items():
        offset, fmt = BZ_FIELDS[name]
        struct.pack_into(fmt, image, offset, value)
    return bytes(image) + payload
