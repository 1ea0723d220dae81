"""Kernel, initrd, command line and firmware loading into a fake guest memory."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from splitvmm.errors import BootError
from splitvmm.monitor import loader
from splitvmm.monitor.layout import CMDLINE, HIMEM_START, ZERO_PAGE
from splitvmm.monitor.loader import (
    LoadedKernel,
    load_cmdline,
    load_firmware,
    load_initrd,
    load_kernel,
    load_linux,
)
from tests.fakes import FakeGuestMemory
from tests.unit.images import MIB, Seg, make_bzimage, make_elf

CODE = bytes.fromhex("89f0 66baf400 ef f4")  # mov %esi,%eax; mov $0xf4,%dx; out; hlt


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- ELF ---------------------------------------------------------------------------------


def test_load_kernel_elf_copies_segments_and_zeroes_bss(tmp_path: Path) -> None:
    mem = FakeGuestMemory(32 * MIB)
    mem.write(0x200000 + len(CODE), b"\xff" * 16)  # stale bytes where .bss will be
    path = write(tmp_path, "guest.elf", make_elf([Seg(0x200000, CODE, memsz=0x1000)], 0x200000))

    kernel = load_kernel(mem, path)

    assert (kernel.kind, kernel.entry, kernel.kernel_end) == ("elf", 0x200000, 0x201000)
    assert mem.read(0x200000, len(CODE)) == CODE
    assert mem.read(0x200000 + len(CODE), 16) == bytes(16)


def test_load_kernel_elf_in_free_low_memory_is_accepted(tmp_path: Path) -> None:
    mem = FakeGuestMemory(32 * MIB)
    path = write(tmp_path, "low.elf", make_elf([Seg(0x10000, CODE)], 0x10000))

    kernel = load_kernel(mem, path)

    assert kernel.kernel_start == 0x10000


def test_load_kernel_elf_virtual_entry_is_translated_through_its_segment(tmp_path: Path) -> None:
    mem = FakeGuestMemory(32 * MIB)
    seg = Seg(0x1000000, CODE, vaddr=0xFFFFFFFF81000000)
    path = write(tmp_path, "vmlinux", make_elf([seg], 0xFFFFFFFF81000002))

    kernel = load_kernel(mem, path)

    assert kernel.entry == 0x1000002


def test_load_kernel_truncated_elf_header_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "short.elf", make_elf([Seg(0x200000, CODE)], 0x200000)[:40])

    with pytest.raises(BootError, match=r"short\.elf: truncated ELF header"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_segment_past_end_of_file_is_refused(tmp_path: Path) -> None:
    image = make_elf([Seg(0x200000, CODE * 100)], 0x200000)
    path = write(tmp_path, "cut.elf", image[:-10])

    with pytest.raises(BootError, match=r"cut\.elf: segment 0 .* past the end of file"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf32_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "c32.elf", make_elf([Seg(0x200000, CODE)], 0x200000, elf_class=1))

    with pytest.raises(BootError, match="need ELF64"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_wrong_machine_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "arm.elf", make_elf([Seg(0x200000, CODE)], 0x200000, machine=183))

    with pytest.raises(BootError, match=r"arm\.elf: ELF machine 183"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_shared_object_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "dyn.elf", make_elf([Seg(0x200000, CODE)], 0x200000, e_type=3))

    with pytest.raises(BootError, match="ET_EXEC"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_segment_outside_ram_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "high.elf", make_elf([Seg(64 * MIB, CODE)], 64 * MIB))

    with pytest.raises(BootError, match=r"high\.elf: segment 0 .* not inside guest RAM"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_segment_past_4gib_is_refused(tmp_path: Path) -> None:
    """The 64-bit entry gets an identity map of the first 4 GiB only (monitor/boot64.py)."""
    path = write(tmp_path, "hi.elf", make_elf([Seg(5 << 30, CODE)], 5 << 30))

    with pytest.raises(BootError, match=r"hi\.elf: segment 0 .* reaches past 4 GiB"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_over_zero_page_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "zp.elf", make_elf([Seg(ZERO_PAGE + 0x100, CODE)], ZERO_PAGE + 0x100))

    with pytest.raises(BootError, match="overlaps the zero page"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_straddling_1mib_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x.elf", make_elf([Seg(0xFF000, CODE * 1000)], 0x100000))

    with pytest.raises(BootError, match="overlaps the EBDA, MP table, ACPI tables and BIOS area"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_overlapping_segments_are_refused(tmp_path: Path) -> None:
    segs = [Seg(0x200000, CODE, memsz=0x2000), Seg(0x201000, CODE)]
    path = write(tmp_path, "ov.elf", make_elf(segs, 0x200000))

    with pytest.raises(BootError, match="segment 1 overlaps segment 0"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_elf_entry_outside_segments_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "e.elf", make_elf([Seg(0x200000, CODE)], 0x300000))

    with pytest.raises(BootError, match="entry point 0x300000"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_empty_file_is_refused_as_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.bin", b"")

    with pytest.raises(BootError, match=r"empty\.bin: the kernel file is empty$"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


def test_load_kernel_unknown_format_names_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", b"hello world" * 100)

    with pytest.raises(BootError, match=r"notes\.txt: not an ELF or bzImage .*68656c6c"):
        load_kernel(FakeGuestMemory(32 * MIB), path)


def test_load_kernel_missing_file_is_a_boot_error(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"boot\.kernel: .*absent does not exist"):
        load_kernel(FakeGuestMemory(32 * MIB), tmp_path / "absent")


# --- bzImage -----------------------------------------------------------------------------


def test_load_kernel_bzimage_loads_at_1mib_with_64bit_entry(tmp_path: Path) -> None:
    mem = FakeGuestMemory(64 * MIB)
    path = write(tmp_path, "bzImage", make_bzimage(payload=b"\xcc" * 8192))

    kernel = load_kernel(mem, path)

    assert (kernel.kind, kernel.entry) == ("bzimage", HIMEM_START + 0x200)
    assert mem.read(HIMEM_START, 8192) == b"\xcc" * 8192
    assert kernel.kernel_end == 0x1000000 + 8 * MIB  # pref_address + init_size


@pytest.mark.parametrize(
    "pref_address,run",
    [(0x1000000, 0x1000000), (0x1100000, 0x1200000), (0x100000, 0x200000)],
    ids=["aligned", "unaligned-pref", "below-alignment"],
)
def test_load_kernel_bzimage_init_size_window_starts_where_boot_rst_says(
    tmp_path: Path, pref_address: int, run: int
) -> None:
    """boot.rst (init_size): a relocatable kernel's load address raised to pref_address,
    then aligned up to kernel_alignment (head_64.S aligns first: the same for any aligned
    pref_address). The initrd goes above the window's end."""
    path = write(
        tmp_path, "bzImage",
        make_bzimage(kernel_alignment=0x200000, pref_address=pref_address, init_size=8 * MIB),
    )  # fmt: skip
    assert load_kernel(FakeGuestMemory(64 * MIB), path).kernel_end == run + 8 * MIB


def test_load_kernel_bzimage_keeps_its_setup_header_bytes(tmp_path: Path) -> None:
    image = make_bzimage()
    path = write(tmp_path, "bzImage", image)

    kernel = load_kernel(FakeGuestMemory(64 * MIB), path)

    assert kernel.setup_header == image[0x1F1:0x26C]


def test_load_kernel_bzimage_setup_sects_zero_means_four(tmp_path: Path) -> None:
    mem = FakeGuestMemory(64 * MIB)
    image = make_bzimage(payload=b"\xab" * 4096, setup_sects=0)
    path = write(tmp_path, "bzImage", image)

    load_kernel(mem, path)

    assert mem.read(HIMEM_START, 16) == b"\xab" * 16


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (make_bzimage(version=0x0204), r"boot protocol 2\.04 is older than 2\.06"),
        (make_bzimage(boot_flag=0), "boot_flag at 0x1fe is not 0xAA55"),
        (make_bzimage()[:0x220], "truncated bzImage: its setup header runs to 0x26c"),
        # a 2.15 header whose jump ends it before pref_address and init_size
        (make_bzimage(jump=0xEB | (0x240 - 0x202) << 8), "short of 0x26c where protocol 2.15"),
        # a jump that ends the header before its version: not "protocol 0.00"
        (make_bzimage(jump=0xEB), r"header ends at 0x202 \(the jump at 0x200\), before its ver"),
        # before 2.12 nothing says whether the entry is 64-bit
        (make_bzimage(version=0x020B), r"protocol 2\.11 predates xloadflags \(2\.12"),
        (make_bzimage(loadflags=0), "loadflags has LOADED_HIGH clear"),
        (
            make_bzimage(payload=b""),
            r"setup_sects 4 puts its protected-mode code at 0xa00, at "
            r"or past the end of the 0xa00-byte file",
        ),  # fmt: skip
        # the 64-bit entry, +0x200, would run zeroed RAM past what was loaded
        (make_bzimage(payload=b"\x90" * 0x200), r"64-bit entry point \(\+0x200\) lies past"),
        (make_bzimage(init_size=0), r"init_size 0x0 is smaller than its own 0x1000 bytes"),
    ],
    ids=[
        "old-protocol",
        "boot-flag",
        "truncated-header",
        "short-header",
        "no-version",
        "2.11",
        "zimage",
        "no-payload",
        "entry-past-payload",
        "init-size",
    ],  # fmt: skip
)
def test_load_kernel_bad_bzimage_header_is_refused(tmp_path: Path, image: bytes, match: str):
    path = write(tmp_path, "bad", image)

    with pytest.raises(BootError, match=f"bad: .*{match}"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


def test_load_kernel_bzimage_without_xlf_kernel_64_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "k32", make_bzimage(xloadflags=0))

    with pytest.raises(BootError, match="no 64-bit entry point"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


@pytest.mark.parametrize(
    ("filesz", "memsz", "match"),
    [
        (0x2000, 0x1000, "file size 0x2000, more than its memory size 0x1000"),
        (0x1000, 1 << 40, r"memory size 0x10000000000, more than guest RAM \(0x4000000\)"),
    ],
    ids=["file-over-memory", "memory-over-ram"],
)
def test_load_kernel_elf_segment_sizes_name_the_limit_broken(
    tmp_path: Path, filesz: int, memsz: int, match: str
) -> None:
    path = write(
        tmp_path, "seg.elf", make_elf([Seg(0x200000, b"\x90" * filesz, memsz=memsz)], 0x200000)
    )

    with pytest.raises(BootError, match=match):
        load_kernel(FakeGuestMemory(64 * MIB), path)


def test_load_kernel_bzimage_init_size_beyond_ram_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "big", make_bzimage(init_size=60 * MIB))

    with pytest.raises(BootError, match=r"big: kernel needs RAM up to 0x4c00000"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


def test_load_kernel_bzimage_truncated_payload_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "trunc", make_bzimage(syssize=0x10000))

    with pytest.raises(BootError, match="truncated bzImage"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


def test_load_kernel_bzimage_bad_alignment_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "align", make_bzimage(kernel_alignment=0x300000))

    with pytest.raises(BootError, match="kernel_alignment 0x300000"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


# --- initrd and command line -------------------------------------------------------------


def test_load_initrd_goes_page_aligned_to_top_of_low_ram(tmp_path: Path) -> None:
    mem = FakeGuestMemory(64 * MIB)
    kernel = LoadedKernel(entry=0x200000, kind="elf", kernel_end=0x300000, kernel_start=0x200000)
    path = write(tmp_path, "initrd", b"\x5a" * 5000)

    loaded = load_initrd(mem, path, kernel)

    assert (loaded.initrd_gpa, loaded.initrd_size) == (64 * MIB - 0x2000, 5000)
    assert mem.read(loaded.initrd_gpa, 5000) == b"\x5a" * 5000


def test_load_initrd_respects_initrd_addr_max(tmp_path: Path) -> None:
    kernel = LoadedKernel(
        entry=0x200000, kind="elf", kernel_end=0x300000, kernel_start=0x200000,
        initrd_addr_max=32 * MIB - 1,
    )  # fmt: skip
    path = write(tmp_path, "initrd", bytes(4096))

    loaded = load_initrd(FakeGuestMemory(64 * MIB), path, kernel)

    assert loaded.initrd_gpa == 32 * MIB - 4096


def test_load_initrd_empty_is_refused_as_empty(tmp_path: Path) -> None:
    kernel = load_kernel(FakeGuestMemory(64 * MIB), write(tmp_path, "bz", make_bzimage()))

    with pytest.raises(BootError, match="initrd: the initrd is empty"):
        load_initrd(FakeGuestMemory(64 * MIB), write(tmp_path, "initrd", b""), kernel)


def test_load_initrd_that_would_overlap_kernel_is_refused(tmp_path: Path) -> None:
    kernel = LoadedKernel(entry=0x200000, kind="elf", kernel_end=60 * MIB, kernel_start=0x200000)
    path = write(tmp_path, "initrd.img", bytes(8 * MIB))

    with pytest.raises(BootError, match=r"initrd\.img: initrd of 0x800000 bytes does not fit"):
        load_initrd(FakeGuestMemory(64 * MIB), path, kernel)


def test_load_cmdline_writes_nul_terminated_string(tmp_path: Path) -> None:
    mem = FakeGuestMemory(1 * MIB + 4096)
    kernel = LoadedKernel(entry=0x200000, kind="elf", kernel_end=0x300000, kernel_start=0x200000)

    load_cmdline(mem, "console=ttyS0", kernel)

    assert mem.read(CMDLINE, 14) == b"console=ttyS0\0"


def test_load_cmdline_longer_than_kernel_limit_is_refused() -> None:
    kernel = LoadedKernel(
        entry=0x200000, kind="bzimage", kernel_end=0x300000, kernel_start=0x100000, cmdline_max=10
    )

    with pytest.raises(BootError, match="is 11 bytes; this kernel takes at most 10"):
        load_cmdline(FakeGuestMemory(2 * MIB), "x" * 11, kernel)


def test_load_cmdline_of_an_elf_kernel_is_limited_to_what_x86_linux_reads() -> None:
    """x86 Linux's COMMAND_LINE_SIZE is 2048 (head64.c copies that much, NUL included); a
    vmlinux has no cmdline_size to say so, and a longer line would lose its tail silently."""
    kernel = LoadedKernel(entry=0x200000, kind="elf", kernel_end=0x300000, kernel_start=0x200000)

    with pytest.raises(BootError, match="takes at most 2047"):
        load_cmdline(FakeGuestMemory(2 * MIB), "x" * 2048, kernel)


def test_load_linux_bzimage_writes_zero_page_with_initrd_and_cmdline(tmp_path: Path) -> None:
    mem = FakeGuestMemory(64 * MIB)
    kernel_path = write(tmp_path, "bzImage", make_bzimage())
    initrd_path = write(tmp_path, "initrd", bytes(4096))

    loaded = load_linux(mem, kernel_path, initrd_path, "quiet")

    zero_page = mem.read(ZERO_PAGE, 4096)
    assert struct.unpack_from("<I", zero_page, 0x228)[0] == CMDLINE  # cmd_line_ptr
    assert struct.unpack_from("<II", zero_page, 0x218) == (loaded.initrd_gpa, 4096)
    assert zero_page[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", zero_page, 0x238)[0] == 2047  # kernel's cmdline_size kept


def test_load_linux_elf_zero_page_cmdline_size_is_the_kernel_limit(tmp_path: Path) -> None:
    """boot.rst: cmdline_size is "the maximum size of the command line without the
    terminating zero", what the same kernel's bzImage header says (COMMAND_LINE_SIZE - 1).
    A vmlinux has no header, so the loader writes it: it wrote this line's length with its
    NUL, 6 here."""
    mem = FakeGuestMemory(64 * MIB)
    kernel_path = write(tmp_path, "vmlinux", make_elf([Seg(0x200000, CODE)], 0x200000))

    load_linux(mem, kernel_path, None, "quiet")

    zero_page = mem.read(ZERO_PAGE, 4096)
    assert struct.unpack_from("<I", zero_page, 0x238)[0] == 2047


def test_load_linux_bzimage_zero_page_takes_no_loader_field_from_the_file(tmp_path: Path):
    """setup_data ("write (special)") and hardware_subarch ("write (optional)") are the
    loader's: a file's values would send the kernel down a setup_data chain at an address
    the file chose, or boot it as another subarchitecture."""
    mem = FakeGuestMemory(64 * MIB)
    image = make_bzimage(setup_data=0x200000, hardware_subarch=3, hardware_subarch_data=0x1000)
    load_linux(mem, write(tmp_path, "bzImage", image), None, "")
    zero_page = mem.read(ZERO_PAGE, 4096)
    assert struct.unpack_from("<IQ", zero_page, 0x23C) == (0, 0)
    assert struct.unpack_from("<Q", zero_page, 0x250)[0] == 0


def test_load_kernel_elf_shrinking_under_its_program_headers_is_a_boot_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is read a piece at a time: one truncated meanwhile is named, no traceback."""
    path = write(tmp_path, "vmlinux", make_elf([Seg(0x200000, CODE)], 0x200000))
    real = loader._pread

    def short(f, offset: int, size: int) -> bytes:
        return real(f, offset, size)[: size // 2] if offset else real(f, offset, size)

    monkeypatch.setattr(loader, "_pread", short)
    with pytest.raises(BootError, match="vmlinux: file shrank while it was being loaded"):
        load_kernel(FakeGuestMemory(64 * MIB), path)


# --- firmware ----------------------------------------------------------------------------


def test_load_firmware_maps_image_below_4g_and_shadows_its_tail_below_1mib(
    tmp_path: Path,
) -> None:
    image = bytes(range(256)) * 1024  # 256 KiB, each offset telling where it came from
    path = write(tmp_path, "bios.bin", image)

    fw = load_firmware(path)

    assert (fw.rom.gpa, fw.rom.size, fw.rom.offset) == (0xFFFC0000, 0x40000, 0)
    assert (fw.shadow.gpa, fw.shadow.size, fw.shadow.offset) == (0xE0000, 0x20000, 0x20000)
    assert fw.shadow_bytes() == image[0x20000:]


def test_load_firmware_of_64k_shadows_only_64k(tmp_path: Path) -> None:
    path = write(tmp_path, "flat.bin", bytes(64 * 1024))

    fw = load_firmware(path)

    assert (fw.shadow.gpa, fw.shadow.size, fw.shadow.offset) == (0xF0000, 0x10000, 0)


def test_load_firmware_size_not_multiple_of_64k_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "odd.bin", bytes(4096))

    with pytest.raises(BootError, match=r"odd\.bin: firmware is 0x1000 bytes"):
        load_firmware(path)


def test_load_firmware_larger_than_16mib_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "huge.bin", bytes(17 * MIB))

    with pytest.raises(BootError, match="at most 16 MiB"):
        load_firmware(path)


def test_load_firmware_empty_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.bin", b"")

    with pytest.raises(BootError, match="non-zero multiple of 64 KiB"):
        load_firmware(path)


@pytest.mark.parametrize("what", ["kernel", "firmware"])
def test_boot_file_that_cannot_be_read_is_a_boot_error_naming_it(tmp_path, monkeypatch, what):
    """A read error from the file's storage (EIO, ESTALE on NFS) was a bare OSError: `up`
    printed a traceback, or, once main() turned output errors into one line, "cannot write
    the output". It names the file."""
    path = tmp_path / what
    path.write_bytes(
        make_elf([Seg(0x200000, b"\xf4")], 0x200000) if what == "kernel" else bytes(64 << 10)
    )

    def eio(*args: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(loader.os, "pread", eio)
    with pytest.raises(BootError, match=f"{what}: cannot read it: Input/output error"):
        if what == "kernel":
            loader.load_kernel(FakeGuestMemory(32 * MIB), path)
        else:
            loader.load_firmware(path)
