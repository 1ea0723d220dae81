"""struct boot_params, the Linux x86 zero page, with its layout from <asm/bootparam.h>.

The monitor's bootparams.py decides what goes in (boot.rst); this module only
knows where each field lives, so no offset there is typed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from splitvmm.native._kvm import ffi, lib

ZERO_PAGE_SIZE: int = ffi.sizeof("struct boot_params")
SETUP_HEADER_SIZE: int = ffi.sizeof("struct setup_header")
SETUP_HEADER_OFFSET = ffi.offsetof("struct boot_params", "hdr")
E820_MAX_ENTRIES_ZEROPAGE: int = lib.E820_MAX_ENTRIES_ZEROPAGE
CAN_USE_HEAP: int = lib.CAN_USE_HEAP  # setup_header.loadflags
LOADED_HIGH: int = lib.LOADED_HIGH  # setup_header.loadflags: protected mode at 1 MiB
XLF_KERNEL_64: int = lib.XLF_KERNEL_64  # setup_header.xloadflags


def setup_header(raw: bytes) -> Any:
    """A zero-padded struct setup_header holding the first bytes of `raw` (a kernel's
    header from file offset 0x1f1); its fields read by their <asm/bootparam.h> names."""
    hdr = ffi.new("struct setup_header *")
    n = min(len(raw), SETUP_HEADER_SIZE)
    ffi.memmove(hdr, raw[:n], n)
    return hdr


class ZeroPage:
    """A zero-filled struct boot_params (boot.rst asks for zeros in every field a loader
    does not set), filled by field name and handed out as bytes."""

    def __init__(self) -> None:
        self.params: Any = ffi.new("struct boot_params *")  # fields by their header names
        self.hdr: Any = self.params.hdr

    def copy_setup_header(self, raw: bytes) -> None:
        """The kernel's own header bytes, placed at hdr; they may run past our struct
        setup_header (newer kernels' fields), up to the end of the page."""
        if SETUP_HEADER_OFFSET + len(raw) > ZERO_PAGE_SIZE:
            raise ValueError(f"a setup header of {len(raw)} bytes does not fit the zero page")
        ffi.memmove(ffi.cast("char *", self.params) + SETUP_HEADER_OFFSET, raw, len(raw))

    def set_e820(self, table: Sequence[tuple[int, int, int]]) -> None:
        """e820_table from (addr, size, type) entries."""
        if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
            raise ValueError(
                f"e820 map has {len(table)} entries; the zero page holds at most "
                f"{E820_MAX_ENTRIES_ZEROPAGE}"
            )
        self.params.e820_entries = len(table)
        for i, (addr, size, kind) in enumerate(table):
            slot = self.params.e820_table[i]
            slot.addr, slot.size, slot.type = addr, size, kind

    def to_bytes(self) -> bytes:
        return bytes(ffi.buffer(self.params))
