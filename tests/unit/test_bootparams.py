"""The zero page: offsets checked against the numbers in Documentation/arch/x86/boot.rst."""

from __future__ import annotations

import struct

import pytest

from splitvmm.errors import BootError
from splitvmm.monitor.bootparams import (
    E820_RAM,
    E820_RESERVED,
    BootSetup,
    E820Entry,
    build_zero_page,
    e820_map,
    parse_setup_header,
)
from splitvmm.monitor.layout import CMDLINE, GIB, MIB
from tests.unit.images import make_bzimage


def u8(page: bytes, offset: int) -> int:
    return page[offset]


def u16(page: bytes, offset: int) -> int:
    return struct.unpack_from("<H", page, offset)[0]


def u32(page: bytes, offset: int) -> int:
    return struct.unpack_from("<I", page, offset)[0]


def e820_at(page: bytes, index: int) -> tuple[int, int, int]:
    """boot.rst: e820_table at 0x2d0, 20-byte packed entries (addr u64, size u64, type u32)."""
    return struct.unpack_from("<QQI", page, 0x2D0 + 20 * index)


def test_e820_map_64mib_has_low_ram_reserved_bios_area_high_ram_and_ecam() -> None:
    table = e820_map(64 * MIB)

    assert table == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 63 * MIB, E820_RAM),
        E820Entry(0xE0000000, 1 * MIB, E820_RESERVED),
        E820Entry(0xFEFFC000, 0x4000, E820_RESERVED),  # KVM's identity map and TSS
    ]


def test_e820_map_4gib_splits_around_pci_hole() -> None:
    table = e820_map(4 * GIB)

    assert table[2:] == [
        E820Entry(0x100000, 3 * GIB - 0x100000, E820_RAM),
        E820Entry(0xE0000000, 1 * MIB, E820_RESERVED),
        E820Entry(0xFEFFC000, 0x4000, E820_RESERVED),
        E820Entry(4 * GIB, 1 * GIB, E820_RAM),
    ]


def test_e820_map_below_1mib_is_refused() -> None:
    with pytest.raises(BootError, match="too small"):
        e820_map(512 * 1024)


def test_zero_page_is_one_page() -> None:
    page = build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=1))

    assert len(page) == 4096


def test_zero_page_cmd_line_ptr_is_at_0x228() -> None:
    page = build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=10))

    assert u32(page, 0x228) == CMDLINE


def test_zero_page_e820_entries_count_is_at_0x1e8() -> None:
    page = build_zero_page(BootSetup(ram_size=4 * GIB, cmdline_size=1))

    assert u8(page, 0x1E8) == 6


def test_zero_page_e820_table_is_at_0x2d0() -> None:
    page = build_zero_page(BootSetup(ram_size=4 * GIB, cmdline_size=1))

    assert e820_at(page, 5) == (4 * GIB, 1 * GIB, E820_RAM)


def test_zero_page_acpi_rsdp_addr_is_at_0x070() -> None:
    page = build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=1, acpi_rsdp_addr=0xE0000))

    assert int.from_bytes(page[0x70:0x78], "little") == 0xE0000


def test_zero_page_ramdisk_fields_are_at_0x218_and_0x21c() -> None:
    setup = BootSetup(ram_size=64 * MIB, cmdline_size=1, initrd_gpa=0x3000000, initrd_size=0x1234)

    page = build_zero_page(setup)

    assert (u32(page, 0x218), u32(page, 0x21C)) == (0x3000000, 0x1234)


def test_zero_page_for_elf_has_minimal_header() -> None:
    page = build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=42))

    assert (u16(page, 0x1FE), page[0x202:0x206], u16(page, 0x206)) == (0xAA55, b"HdrS", 0x020F)
    assert (u8(page, 0x210), u32(page, 0x230), u32(page, 0x238)) == (0xFF, 0x1000000, 42)


def test_zero_page_for_bzimage_copies_header_and_sets_loader_fields() -> None:
    header = make_bzimage()[0x1F1:0x26C]

    page = build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=6, setup_header=header))

    assert u32(page, 0x260) == 8 * MIB  # init_size copied from the kernel
    assert u8(page, 0x210) == 0xFF  # type_of_loader
    assert u8(page, 0x211) == 0x81  # LOADED_HIGH kept, CAN_USE_HEAP added
    assert u16(page, 0x224) == 0xDE00  # heap_end_ptr
    assert u32(page, 0x238) == 2047  # cmdline_size is the kernel's, read-only for us


def test_zero_page_oversized_setup_header_is_refused() -> None:
    with pytest.raises(BootError, match="runs past zero-page offset 0x290"):
        build_zero_page(BootSetup(ram_size=64 * MIB, cmdline_size=1, setup_header=bytes(0xA0)))


def test_parse_setup_header_reads_fields_at_spec_offsets() -> None:
    header = make_bzimage(version=0x020D, init_size=0x123000, pref_address=0x2000000)[0x1F1:]

    hdr = parse_setup_header(header)

    assert (hdr.version, hdr.init_size, hdr.pref_address) == (0x020D, 0x123000, 0x2000000)
