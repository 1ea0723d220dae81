"""Kernel, initrd, command line and firmware loading (linux-loader's "loader" half).

Every input file is hostile until checked: each header field is validated before
it is used, every range is checked against guest RAM and our boot structures,
and each error names the file and what was wrong with it. The zero page itself
is built by bootparams.py (the "configurator" half).

Formats: ELF64 (System V gABI, "ELF Header" and "Program Header"), bzImage (Linux
Documentation/arch/x86/boot.rst, 64-bit boot protocol), and flat firmware images
(what QEMU's -bios maps, hw/i386/x86-common.c: x86_bios_rom_init).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from splitvmm.errors import BootError
from splitvmm.hostpath import HostFileError, open_host_file
from splitvmm.monitor import bootparams, layout
from splitvmm.native.bootparams import LOADED_HIGH, XLF_KERNEL_64
from splitvmm.record import Struct, replace


class GuestRam(Protocol):
    """What the loaders need of guest memory (GuestMemory and FakeGuestMemory both fit)."""

    size: int

    def write(self, gpa: int, data: bytes) -> None: ...


# Guest-physical ranges [start, end) our boot code writes; nothing may be loaded over them.
BOOT_STRUCTURES: tuple[tuple[str, int, int], ...] = (
    ("real-mode IVT and BIOS data area", 0, layout.BOOT_GDT),
    ("boot GDT and IDT", layout.BOOT_GDT, layout.BOOT_IDT + 8),
    ("zero page", layout.ZERO_PAGE, layout.ZERO_PAGE + layout.PAGE_SIZE),
    ("boot stack", layout.BOOT_STACK_TOP & ~(layout.PAGE_SIZE - 1), layout.PML4),
    ("boot page tables", layout.PML4, layout.PD_BASE + 4 * layout.PAGE_SIZE),
    ("command line", layout.CMDLINE, layout.CMDLINE + layout.CMDLINE_MAX),
    ("EBDA, MP table, ACPI tables and BIOS area", layout.EBDA_START, layout.HIMEM_START),
)

COPY_CHUNK = 16 << 20  # copy files into guest RAM this many bytes at a time

# ELF64 (gABI): e_ident, then e_type .. e_shstrndx; program header p_type .. p_align.
ELF_MAGIC = b"\x7fELF"
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_EXEC, EM_X86_64, PT_LOAD = 2, 62, 1
ELF_MAX_PHDRS = 64  # vmlinux has ~5; more is a malformed or hostile file
KERNEL_VIRT_BASE = 0xFFFFFFFF80000000  # start of the x86-64 kernel text mapping

# bzImage (boot.rst): "HdrS" at 0x202, a short jump at 0x200 whose target ends the header.
BZ_MAGIC_OFFSET = 0x202
BZ_JUMP_OFFSET = 0x200
JMP_SHORT = 0xEB
BZ_VERSION_END = 0x208  # the header's version field, u16 at 0x206
BZ_HEADER_READ = 0x1000  # read first: the setup header ends by 0x281 (0x202 + a short jump)
MIN_BZ_PROTOCOL = 0x0206  # cmdline_size exists from 2.06
XLOADFLAGS_PROTOCOL = 0x020C  # xloadflags (and so XLF_KERNEL_64) exists from 2.12
ENTRY_64_OFFSET = 0x200  # boot.rst: 64-bit entry is the load address + 0x200
BOOT_FLAG_OFFSET, BOOT_FLAG = 0x1FE, b"\x55\xaa"  # boot.rst: boot_flag, always 0xAA55
# boot.rst: the setup header's fields by the protocol that added them; a header whose jump
# at 0x200 ends it before the last field of the version it claims is malformed (its missing
# init_size and pref_address would read as 0 and misplace the initrd).
HEADER_END_BY_PROTOCOL = ((0x020F, 0x26C), (0x020B, 0x268), (0x020A, 0x264))  # (from, end)
# x86 Linux's COMMAND_LINE_SIZE: head64.c copies exactly this much from cmd_line_ptr. A
# bzImage says its own limit (cmdline_size); a vmlinux (ELF) has no header to say it.
ELF_CMDLINE_MAX = 2048 - 1
SECTOR = 512

# QEMU x86_bios_rom_init refuses a BIOS whose size is not a multiple of 64 KiB; so do we.
FIRMWARE_GRANULE = 64 * layout.KIB


class LoadedKernel(Struct, frozen=True):
    entry: int  # guest-physical 64-bit entry point
    kind: str  # "elf" or "bzimage"
    kernel_end: int  # first byte above all the kernel may use (incl. bzImage init_size)
    kernel_start: int
    setup_header: bytes | None = None  # bzImage: header bytes from file offset 0x1f1
    cmdline_max: int = ELF_CMDLINE_MAX  # longest command line it takes, NUL excluded
    initrd_addr_max: int = layout.FOUR_GIB - 1  # highest byte the initrd may occupy
    initrd_gpa: int = 0
    initrd_size: int = 0


class FirmwareSlot(Struct, frozen=True):
    gpa: int  # where it goes: mapped (the ROM) or copied into RAM (the shadow)
    size: int
    offset: int  # offset of this window in the image


class FirmwareImage(Struct, frozen=True):
    """A flat firmware image: its ROM (a read-only memslot) and its shadow (the window of it
    a boot copies into guest RAM below 1 MiB: layout.FIRMWARE_SHADOW)."""

    path: str
    data: bytes
    rom: FirmwareSlot
    shadow: FirmwareSlot

    def shadow_bytes(self) -> bytes:
        return self.data[self.shadow.offset : self.shadow.offset + self.shadow.size]


def _open(path: Path, what: str) -> tuple[BinaryIO, int]:
    """The regular file at path (hostpath: no symlink, FIFO or device), opened to read."""
    try:
        fd = open_host_file(path, f"boot.{what}")
    except HostFileError as e:
        raise BootError(str(e)) from None
    f = open(fd, "rb")  # the caller closes it (with-block)
    return f, os.fstat(fd).st_size


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """An I/O error reading a boot file (EIO or ESTALE from its storage) is a BootError naming
    it, as a snapshot's file's is (snapshot/reader.py): never a bare OSError."""
    try:
        yield
    except OSError as e:
        raise BootError(f"{path}: cannot read it: {e.strerror or e}") from None


def _pread(f: BinaryIO, offset: int, length: int) -> bytes:
    return os.pread(f.fileno(), length, offset)


def _copy(mem: GuestRam, f: BinaryIO, path: Path, offset: int, gpa: int, length: int) -> None:
    """Copy file bytes [offset, offset+length) to guest gpa, in bounded chunks."""
    done = 0
    while done < length:
        chunk = _pread(f, offset + done, min(COPY_CHUNK, length - done))
        if not chunk:
            raise BootError(f"{path}: file shrank while it was being loaded")
        mem.write(gpa + done, chunk)
        done += len(chunk)


def _zero(mem: GuestRam, gpa: int, length: int) -> None:
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        mem.write(gpa + done, bytes(n))
        done += n


def _low_ram_end(mem: GuestRam) -> int:
    return layout.ram_ranges(mem.size)[0][1]


def _check_placement(path: Path, what: str, start: int, end: int, ram_size: int) -> None:
    """[start, end) must be one piece of RAM and clear of every boot structure."""
    if not any(gpa <= start and end <= gpa + size for gpa, size in layout.ram_ranges(ram_size)):
        raise BootError(f"{path}: {what} at [{start:#x}, {end:#x}) is not inside guest RAM")
    for name, lo, hi in BOOT_STRUCTURES:
        if start < hi and lo < end:
            raise BootError(f"{path}: {what} at [{start:#x}, {end:#x}) overlaps the {name}")


def load_kernel(mem: GuestRam, path: Path) -> LoadedKernel:
    """Load an ELF64 vmlinux/test guest or a bzImage, chosen by content, not by name."""
    f, size = _open(path, "kernel")
    with f, _reading(path):
        if size == 0:
            raise BootError(f"{path}: the kernel file is empty")
        head = _pread(f, 0, BZ_MAGIC_OFFSET + 4)
        if head[:4] == ELF_MAGIC:
            return _load_elf(mem, path, f, size)
        if head[BZ_MAGIC_OFFSET:] == b"HdrS":
            return _load_bzimage(mem, path, f, size)
    raise BootError(
        f"{path}: not an ELF or bzImage kernel (starts with {head[:4].hex()}, "
        f"bytes at 0x202 are {head[BZ_MAGIC_OFFSET:].hex() or 'missing'})"
    )


def _elf_header(path: Path, f: BinaryIO, size: int) -> tuple[int, int, int]:
    """Validate the ELF header; return (e_entry, e_phoff, e_phnum)."""
    raw = _pread(f, 0, ELF64_EHDR.size)
    if len(raw) < ELF64_EHDR.size:
        raise BootError(f"{path}: truncated ELF header ({len(raw)} of {ELF64_EHDR.size} bytes)")
    ident, e_type, machine, version, entry, phoff, _, _, _, phentsize, phnum, *_ = (
        ELF64_EHDR.unpack(raw)
    )
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise BootError(f"{path}: ELF class {ident[4]}/data {ident[5]}, need ELF64 little-endian")
    if machine != EM_X86_64 or version != EV_CURRENT:
        raise BootError(f"{path}: ELF machine {machine} version {version}, need x86-64 (62) v1")
    if e_type != ET_EXEC:
        raise BootError(f"{path}: ELF type {e_type}, need an executable (ET_EXEC)")
    if phentsize != ELF64_PHDR.size or not 0 < phnum <= ELF_MAX_PHDRS:
        raise BootError(f"{path}: bad program header table ({phnum} entries of {phentsize} bytes)")
    if phoff + phnum * ELF64_PHDR.size > size:
        raise BootError(f"{path}: program header table at {phoff:#x} runs past the end of file")
    return entry, phoff, phnum


class _Segment(Struct, frozen=True):
    index: int  # program header number, for error messages
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


def _check_segment(path: Path, seg: _Segment, size: int, ram_size: int) -> None:
    what = f"segment {seg.index}"
    if seg.filesz > seg.memsz:
        raise BootError(
            f"{path}: {what} has file size {seg.filesz:#x}, more than its memory size "
            f"{seg.memsz:#x}"
        )
    if seg.memsz > ram_size:
        raise BootError(
            f"{path}: {what} has memory size {seg.memsz:#x}, more than guest RAM ({ram_size:#x})"
        )
    if seg.paddr + seg.memsz > layout.FOUR_GIB:  # boot.rst 64-bit protocol: identity-mapped
        raise BootError(
            f"{path}: {what} at {seg.paddr:#x}+{seg.memsz:#x} reaches past 4 GiB, beyond the "
            "identity map the 64-bit entry gets (monitor/boot64.py)"
        )
    if seg.offset + seg.filesz > size:
        raise BootError(
            f"{path}: {what} reads {seg.offset:#x}+{seg.filesz:#x}, past the end of file"
        )
    _check_placement(path, what, seg.paddr, seg.paddr + seg.memsz, ram_size)


def _elf_segments(path: Path, f: BinaryIO, size: int, ram_size: int) -> tuple[int, list[_Segment]]:
    """e_entry and the PT_LOAD segments, each one checked."""
    entry, phoff, phnum = _elf_header(path, f, size)
    table = _pread(f, phoff, phnum * ELF64_PHDR.size)
    if len(table) != phnum * ELF64_PHDR.size:
        raise BootError(f"{path}: file shrank while it was being loaded")
    segments: list[_Segment] = []
    for i in range(phnum):
        p_type, _, *fields, _ = ELF64_PHDR.unpack_from(table, i * ELF64_PHDR.size)
        seg = _Segment(i, *fields)
        if p_type != PT_LOAD or seg.memsz == 0:
            continue
        _check_segment(path, seg, size, ram_size)
        for other in segments:
            if seg.paddr < other.paddr + other.memsz and other.paddr < seg.paddr + seg.memsz:
                raise BootError(f"{path}: segment {i} overlaps segment {other.index}")
        segments.append(seg)
    if not segments:
        raise BootError(f"{path}: ELF file has no loadable segment")
    return entry, segments


def _elf_entry(path: Path, e_entry: int, segments: list[_Segment]) -> int:
    """Physical entry: vmlinux's e_entry is already physical; a virtual one is translated."""
    entry = e_entry
    if e_entry >= KERNEL_VIRT_BASE:
        hits = [s.paddr + e_entry - s.vaddr for s in segments if 0 <= e_entry - s.vaddr < s.memsz]
        if not hits:
            raise BootError(f"{path}: virtual entry {e_entry:#x} is in no loadable segment")
        entry = hits[0]
    if not any(0 <= entry - s.paddr < s.filesz for s in segments):
        raise BootError(f"{path}: entry point {entry:#x} is not in a loaded segment's file data")
    return entry


def _load_elf(mem: GuestRam, path: Path, f: BinaryIO, size: int) -> LoadedKernel:
    e_entry, segments = _elf_segments(path, f, size, mem.size)
    entry = _elf_entry(path, e_entry, segments)
    for s in segments:
        _copy(mem, f, path, s.offset, s.paddr, s.filesz)
        _zero(mem, s.paddr + s.filesz, s.memsz - s.filesz)  # gABI: the rest of p_memsz is 0
    return LoadedKernel(
        entry=entry,
        kind="elf",
        kernel_start=min(s.paddr for s in segments),
        kernel_end=max(s.paddr + s.memsz for s in segments),
    )


def _bz_header(path: Path, data: bytes) -> tuple[bytes, bootparams.SetupHeader]:
    """The raw setup header (0x1f1 up to the end the jump at 0x200 marks), validated."""
    if data[BOOT_FLAG_OFFSET : BOOT_FLAG_OFFSET + 2] != BOOT_FLAG:
        raise BootError(f"{path}: bzImage boot_flag at 0x1fe is not 0xAA55")
    if len(data) <= BZ_JUMP_OFFSET + 2 or data[BZ_JUMP_OFFSET] != JMP_SHORT:
        raise BootError(f"{path}: bzImage has no short jump at 0x200 to end its setup header")
    end = BZ_JUMP_OFFSET + 2 + data[BZ_JUMP_OFFSET + 1]
    if data[BZ_JUMP_OFFSET + 1] >= 0x80:
        raise BootError(f"{path}: bzImage setup header end {end:#x} is invalid (a jump back)")
    if end > len(data):
        raise BootError(f"{path}: truncated bzImage: its setup header runs to {end:#x}")
    if end < BZ_VERSION_END:
        raise BootError(
            f"{path}: bzImage setup header ends at {end:#x} (the jump at 0x200), before its "
            f"version field ends at {BZ_VERSION_END:#x}"
        )
    raw = data[bootparams.SETUP_HEADER_OFFSET : end]
    hdr = bootparams.parse_setup_header(raw)
    protocol = f"{hdr.version >> 8}.{hdr.version & 0xFF:02}"
    if hdr.version < MIN_BZ_PROTOCOL:
        raise BootError(f"{path}: boot protocol {protocol} is older than 2.06")
    need = next((e for since, e in HEADER_END_BY_PROTOCOL if hdr.version >= since), 0)
    if end < need:
        raise BootError(
            f"{path}: bzImage setup header ends at {end:#x}, short of {need:#x} where "
            f"protocol {protocol}'s fields end"
        )
    if hdr.version < XLOADFLAGS_PROTOCOL:
        raise BootError(
            f"{path}: boot protocol {protocol} predates xloadflags (2.12, Linux 3.8): the "
            "bzImage cannot say it has a 64-bit entry point, and splitvmm enters 64-bit only"
        )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError(
            f"{path}: bzImage loadflags has LOADED_HIGH clear: its protected-mode code is "
            "meant for 0x10000 (a zImage), and splitvmm loads it at 1 MiB"
        )
    return raw, hdr


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def _bz_run_address(path: Path, hdr: bootparams.SetupHeader, load: int) -> int:
    """Where the decompressor will run: its init_size window starts there. For a
    relocatable kernel, arch/x86/boot/compressed/head_64.S (startup_64) aligns the load
    address up, then raises it to pref_address; boot.rst (init_size) raises it first, then
    aligns. They differ only for a pref_address that is not a multiple of
    kernel_alignment (never so in a kernel's build), and the window is kept clear for the
    later of the two."""
    if not hdr.relocatable_kernel:
        run = hdr.pref_address or load  # a fixed kernel moves itself to pref_address
    else:
        align = hdr.kernel_alignment
        if align < layout.PAGE_SIZE or align & (align - 1) or align > layout.FOUR_GIB:
            raise BootError(f"{path}: kernel_alignment {align:#x} is not a sane power of two")
        head_64 = max(_align_up(load, align), hdr.pref_address)
        run = max(head_64, _align_up(max(load, hdr.pref_address), align))
    if run < layout.HIMEM_START:
        raise BootError(f"{path}: kernel wants to run at {run:#x}, below 1 MiB")
    return run


def _load_bzimage(mem: GuestRam, path: Path, f: BinaryIO, size: int) -> LoadedKernel:
    low_end = _low_ram_end(mem)
    if size > low_end - layout.HIMEM_START:
        raise BootError(f"{path}: bzImage of {size:#x} bytes is larger than guest low RAM")
    head = _pread(f, 0, min(size, BZ_HEADER_READ))
    if len(head) != min(size, BZ_HEADER_READ):
        raise BootError(f"{path}: file shrank while it was being loaded")
    raw, hdr = _bz_header(path, head)
    setup_size = ((hdr.setup_sects or 4) + 1) * SECTOR  # boot.rst: setup_sects 0 means 4
    if setup_size >= size:
        raise BootError(
            f"{path}: bzImage setup_sects {hdr.setup_sects} puts its protected-mode code at "
            f"{setup_size:#x}, at or past the end of the {size:#x}-byte file"
        )
    kernel_size = size - setup_size
    if hdr.syssize * 16 > kernel_size:
        raise BootError(
            f"{path}: truncated bzImage: syssize says {hdr.syssize * 16:#x} bytes of "
            f"protected-mode code, the file has {kernel_size:#x} after the setup code"
        )
    if kernel_size <= ENTRY_64_OFFSET:
        raise BootError(
            f"{path}: bzImage's 64-bit entry point (+{ENTRY_64_OFFSET:#x}) lies past its "
            f"{kernel_size:#x} bytes of protected-mode code"
        )
    # The decompressor copies the compressed kernel to the end of its init_size buffer
    # (head_64.S): a smaller one is no kernel's, and the guest would crash where it ran.
    if hdr.init_size < hdr.syssize * 16:
        raise BootError(
            f"{path}: bzImage init_size {hdr.init_size:#x} is smaller than its own "
            f"{hdr.syssize * 16:#x} bytes of protected-mode code"
        )
    load = layout.HIMEM_START
    run = _bz_run_address(path, hdr, load)
    end = max(load + kernel_size, run + max(hdr.init_size, kernel_size))
    if end > low_end:
        raise BootError(
            f"{path}: kernel needs RAM up to {end:#x} (init_size {hdr.init_size:#x} at "
            f"{run:#x}), but guest low RAM ends at {low_end:#x}"
        )
    # In bounded chunks straight from the file: a whole read would hold the image twice
    # (bytes, then the copy), and one read returns at most 0x7ffff000 bytes on Linux.
    _copy(mem, f, path, setup_size, load, kernel_size)
    return LoadedKernel(
        entry=load + ENTRY_64_OFFSET,
        kind="bzimage",
        kernel_start=load,
        kernel_end=end,
        setup_header=raw,
        cmdline_max=min(hdr.cmdline_size, layout.CMDLINE_MAX - 1),
        initrd_addr_max=hdr.initrd_addr_max,
    )


def load_initrd(mem: GuestRam, path: Path, kernel: LoadedKernel) -> LoadedKernel:
    """Put the initrd page-aligned as high as the kernel allows, clear of the kernel."""
    f, size = _open(path, "initrd")
    with f, _reading(path):
        if size == 0:
            raise BootError(f"{path}: the initrd is empty")
        limit = min(kernel.initrd_addr_max + 1, _low_ram_end(mem))
        floor = max(kernel.kernel_end, layout.HIMEM_START)
        gpa = (limit - size) & ~(layout.PAGE_SIZE - 1)
        if size > limit or gpa < floor:
            raise BootError(
                f"{path}: initrd of {size:#x} bytes does not fit between the kernel's end "
                f"{floor:#x} and {limit:#x}"
            )
        _copy(mem, f, path, 0, gpa, size)
    return replace(kernel, initrd_gpa=gpa, initrd_size=size)


def load_cmdline(mem: GuestRam, cmdline: str, kernel: LoadedKernel) -> None:
    """Write the NUL-terminated command line at CMDLINE."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("the kernel command line contains a NUL byte")
    if len(raw) > kernel.cmdline_max:
        raise BootError(
            f"the kernel command line is {len(raw)} bytes; this kernel takes at most "
            f"{kernel.cmdline_max} (its cmdline_size, and never more than the "
            f"{layout.CMDLINE_MAX - 1} splitvmm has room for)"
        )
    mem.write(layout.CMDLINE, raw + b"\0")


def load_linux(
    mem: GuestRam,
    kernel_path: Path,
    initrd_path: Path | None = None,
    cmdline: str = "",
    acpi_rsdp_addr: int = 0,
) -> LoadedKernel:
    """Kernel, initrd, command line and zero page: all a 64-bit entry needs in memory
    (the ACPI tables, if any, are already there at acpi_rsdp_addr)."""
    kernel = load_kernel(mem, kernel_path)
    if initrd_path is not None:
        kernel = load_initrd(mem, initrd_path, kernel)
    load_cmdline(mem, cmdline, kernel)
    setup = bootparams.BootSetup(
        ram_size=mem.size,
        cmdline_size=kernel.cmdline_max,
        setup_header=kernel.setup_header,
        initrd_gpa=kernel.initrd_gpa,
        initrd_size=kernel.initrd_size,
        acpi_rsdp_addr=acpi_rsdp_addr,
    )
    mem.write(layout.ZERO_PAGE, bootparams.build_zero_page(setup))
    return kernel


def load_firmware(path: Path) -> FirmwareImage:
    """A flat image ending at 4 GiB, its last 128 KiB also below 1 MiB (QEMU -bios): there in
    guest RAM, the shadow a boot copies (layout.FIRMWARE_SHADOW)."""
    f, size = _open(path, "firmware")
    with f, _reading(path):
        if size == 0 or size % FIRMWARE_GRANULE or size > layout.FIRMWARE_MAX:
            raise BootError(
                f"{path}: firmware is {size:#x} bytes; it must be a non-zero multiple of "
                f"64 KiB and at most {layout.FIRMWARE_MAX >> 20} MiB"
            )
        data = _pread(f, 0, size)
    if len(data) != size:
        raise BootError(f"{path}: firmware changed size while it was being read")
    # QEMU x86_isa_bios_init: the ISA BIOS is MIN(bios_size, 128 KiB), ending at 1 MiB,
    # so the reset vector at 0xFFFF0 (F000:FFF0 in real mode) sees the image's tail.
    shadow = min(size, layout.FIRMWARE_SHADOW)
    return FirmwareImage(
        path=str(path),
        data=data,
        rom=FirmwareSlot(gpa=layout.FOUR_GIB - size, size=size, offset=0),
        shadow=FirmwareSlot(gpa=layout.HIMEM_START - shadow, size=shadow, offset=size - shadow),
    )
