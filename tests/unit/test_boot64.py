"""64-bit entry state: page tables walked by hand (SDM 4.5), descriptors decoded (SDM 3.4.5)."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

from splitvmm.monitor import boot
from splitvmm.monitor.boot64 import (
    BOOT_GDT_ENTRIES,
    MSR_IA32_MISC_ENABLE,
    Segment,
    boot_msrs,
    configure_regs,
    configure_sregs,
    gdt_entry,
    write_boot_tables,
)
from splitvmm.monitor.cpuid import CpuidMask
from splitvmm.monitor.layout import BOOT_GDT, BOOT_STACK_TOP, MPTABLE, PML4, ZERO_PAGE
from splitvmm.monitor.loader import load_firmware
from splitvmm.native._kvm import ffi
from splitvmm.native.kvm import CpuidEntry
from tests.fakes import FakeGuestMemory
from tests.unit.images import MIB, make_bzimage
from tests.unit.test_mptable import mp_pci_irq

ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def entry(mem: FakeGuestMemory, table: int, index: int) -> int:
    return struct.unpack("<Q", mem.read(table + index * 8, 8))[0]


def walk(mem: FakeGuestMemory, cr3: int, va: int) -> tuple[int, int]:
    """4-level walk to a 2 MiB page: (physical address, PDE flags)."""
    pml4e = entry(mem, cr3 & ADDR_MASK, (va >> 39) & 0x1FF)
    pdpte = entry(mem, pml4e & ADDR_MASK, (va >> 30) & 0x1FF)
    pde = entry(mem, pdpte & ADDR_MASK, (va >> 21) & 0x1FF)
    return (pde & ADDR_MASK & ~0x1FFFFF) | (va & 0x1FFFFF), pde & 0xFFF


def tables() -> FakeGuestMemory:
    mem = FakeGuestMemory(1 << 20)
    write_boot_tables(mem)
    return mem


def test_page_tables_map_0x12345678_to_itself() -> None:
    mem = tables()

    assert walk(mem, PML4, 0x12345678)[0] == 0x12345678


def test_page_tables_map_last_byte_below_4gib_to_itself() -> None:
    mem = tables()

    assert walk(mem, PML4, 0xFFFFFFFF)[0] == 0xFFFFFFFF


def test_page_tables_use_present_writable_2mib_pages() -> None:
    mem = tables()

    assert walk(mem, PML4, 0x12345678)[1] == 0x83  # P | RW | PS


def test_gdt_entry_code64_matches_linux_boot_gdt() -> None:
    # Linux's compressed/head_64.S __KERNEL_CS is 0x00af9a000000ffff; ours is pre-accessed (0x9b).
    assert gdt_entry(0x9B, 0xA, 0, 0xFFFFF) == 0x00AF9B000000FFFF


def test_gdt_entry_data_matches_linux_boot_gdt() -> None:
    assert gdt_entry(0x93, 0xC, 0, 0xFFFFF) == 0x00CF93000000FFFF


def test_gdt_in_memory_has_code_at_0x10_and_data_at_0x18() -> None:
    mem = tables()

    gdt = struct.unpack("<4Q", mem.read(BOOT_GDT, 32))

    assert gdt == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def test_segment_from_code_descriptor_decodes_flat_64bit_code() -> None:
    seg = Segment.from_descriptor(BOOT_GDT_ENTRIES[2], 0x10)

    assert (seg.base, seg.limit, seg.type, seg.s, seg.present) == (0, 0xFFFFFFFF, 0xB, 1, 1)
    assert (seg.l, seg.db, seg.g, seg.dpl) == (1, 0, 1, 0)


def test_segment_from_data_descriptor_decodes_flat_data() -> None:
    seg = Segment.from_descriptor(BOOT_GDT_ENTRIES[3], 0x18)

    assert (seg.base, seg.limit, seg.type, seg.l, seg.db, seg.g) == (0, 0xFFFFFFFF, 0x3, 0, 1, 1)


def test_segment_with_base_and_byte_limit_decodes_back() -> None:
    seg = Segment.from_descriptor(gdt_entry(0x93, 0x4, 0x12345678, 0xABCDE), 0x8)

    assert (seg.base, seg.limit, seg.g) == (0x12345678, 0xABCDE, 0)


def test_configure_sregs_enters_long_mode_with_paging() -> None:
    sregs = ffi.new("struct kvm_sregs *")

    configure_sregs(sregs)

    assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (0x80000031, PML4, 0x20, 0x500)


def test_configure_sregs_loads_boot_selectors() -> None:
    sregs = ffi.new("struct kvm_sregs *")

    configure_sregs(sregs)

    assert (sregs.cs.selector, sregs.cs.l, sregs.ds.selector, sregs.ss.selector) == (
        0x10, 1, 0x18, 0x18,
    )  # fmt: skip
    assert (sregs.gdt.base, sregs.gdt.limit, sregs.tr.type) == (BOOT_GDT, 31, 0xB)


def test_configure_regs_points_rsi_at_zero_page() -> None:
    regs = ffi.new("struct kvm_regs *", {"rdx": 0x600})

    configure_regs(regs, 0x1000000)

    assert (regs.rip, regs.rsi, regs.rsp, regs.rflags, regs.rdx) == (
        0x1000000, ZERO_PAGE, BOOT_STACK_TOP, 2, 0,
    )  # fmt: skip


def test_boot_msrs_enable_fast_strings_and_keep_kvms_bts_pebs_unavailable() -> None:
    msrs = boot_msrs()

    assert msrs[MSR_IA32_MISC_ENABLE] == 1 | 1 << 11 | 1 << 12


class FakeVcpu:
    """What boot.prepare asks of a vCPU; records the MSRs set."""

    def __init__(self, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        self.msrs: dict[int, int] | None = None

    def set_cpuid(self, entries: object) -> None:
        pass

    def get_lapic(self) -> bytearray:
        return bytearray(1024)

    def set_lapic(self, lapic: object) -> None:
        pass

    def get_sregs(self) -> object:
        return ffi.new("struct kvm_sregs *")

    def set_sregs(self, sregs: object) -> None:
        pass

    def get_regs(self) -> object:
        return ffi.new("struct kvm_regs *")

    def set_regs(self, regs: object) -> None:
        pass

    def get_fpu(self) -> object:
        return ffi.new("struct kvm_fpu *")

    def set_fpu(self, fpu: object) -> None:
        pass

    def set_msrs(self, msrs: dict[int, int]) -> None:
        self.msrs = msrs


def prepared_linux(
    tmp_path: Path, nvcpus: int, pci_intx: list[tuple[int, int]] | None = None
) -> tuple[FakeGuestMemory, list[FakeVcpu]]:
    """A Linux boot made ready by load_kernel() and prepare() on fakes; `pci_intx`: the
    (PCI device, GSI) of each INTA#, as the machine passes both."""
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    cfg = SimpleNamespace(
        vm=SimpleNamespace(cpuid_mask=()),
        boot=SimpleNamespace(kernel=kernel, initrd=None, cmdline="console=ttyS0"),
        devices=[],
    )
    kvm = SimpleNamespace(
        supported_cpuid=lambda: [CpuidEntry(1, 0, 0, 0x906EA, 0, 0, 0)],
        check_extension=lambda cap: 1,
    )
    vcpus = [FakeVcpu(i) for i in range(nvcpus)]
    mem = FakeGuestMemory(256 * MIB)
    loaded = boot.load_kernel(cfg, mem, nvcpus, pci_intx or ())  # type: ignore[arg-type]
    mask = CpuidMask.parse(())
    boot.prepare(kvm, mem, vcpus, loaded, mask, pci_intx or ())  # type: ignore[arg-type]
    return mem, vcpus


def test_prepare_linux_sets_the_boot_msrs_on_every_vcpu(tmp_path) -> None:
    """Firmware sets up every CPU alike: APs left at KVM's reset values had fast strings off
    (Linux then clears ERMS for all CPUs) and MTRRs unlike the BSP's (Linux warns)."""
    _, vcpus = prepared_linux(tmp_path, 3)

    assert [v.msrs for v in vcpus] == [boot_msrs()] * 3


def test_prepare_linux_routes_in_the_mp_table_the_pci_intx_the_dsdt_routes(tmp_path) -> None:
    """The INTA# pins the DSDT's _PRT gets (load_kernel) reach the MP table too (a guest with
    acpi=off or acpi=noirq reads that one)."""
    mem, _ = prepared_linux(tmp_path, 2, pci_intx=[(1, 17)])

    assert mp_pci_irq(mem.read(MPTABLE, 4096), bus=0, device=1) == 17


def test_boot_msrs_enable_mtrrs_with_write_back_default() -> None:
    msrs = boot_msrs()

    assert msrs[0x2FF] == 0x806


class RecordingVcpu(FakeVcpu):
    """A FakeVcpu that keeps the registers set."""

    def __init__(self, vcpu_id: int) -> None:
        super().__init__(vcpu_id)
        self.regs = ffi.new("struct kvm_regs *")
        self.regs.rdx = 0x600  # KVM's RESET value before any CPUID table

    def get_regs(self) -> object:
        regs = ffi.new("struct kvm_regs *")
        regs[0] = self.regs[0]
        return regs

    def set_regs(self, regs: object) -> None:
        self.regs[0] = regs[0]  # type: ignore[index]


def test_prepare_firmware_gives_every_vcpu_the_sdms_power_on_edx_and_fast_strings(
    tmp_path,
) -> None:
    """SDM Vol. 3A "Processor State After Reset": EDX holds CPUID.01H:EAX, the processor
    signature (KVM puts 0x600 there, as it resets a vCPU before it has a CPUID table); Vol. 4
    table 2-2: IA32_MISC_ENABLE's fast strings default to on (KVM resets them off). QEMU's
    x86_cpu_reset_hold sets both."""
    image = tmp_path / "fw.bin"
    image.write_bytes(bytes(64 * 1024))
    kvm = SimpleNamespace(
        supported_cpuid=lambda: [CpuidEntry(1, 0, 0, 0x906EA, 0, 0, 0)],
        check_extension=lambda cap: 1,
    )
    vcpus = [RecordingVcpu(i) for i in range(2)]

    firmware, mask = load_firmware(image), CpuidMask.parse(())
    boot.prepare(kvm, FakeGuestMemory(16 * MIB), vcpus, firmware, mask)  # type: ignore[arg-type]

    assert [v.regs.rdx for v in vcpus] == [0x906EA, 0x906EA]
    assert [v.msrs and v.msrs[MSR_IA32_MISC_ENABLE] & 1 for v in vcpus] == [1, 1]
