"""A vCPU set up for the Linux 64-bit entry (boot.rst, "64-bit Boot Protocol").

The protocol asks for: long mode with paging on, an identity map covering the
kernel, zero page and command line, a GDT with __BOOT_CS (0x10) a flat 64-bit
code segment and __BOOT_DS (0x18) a flat data segment, interrupts off, and rsi
pointing at struct boot_params. We map the first 4 GiB with 2 MiB pages (Intel
SDM Vol. 3A 4.5, "4-Level Paging"), as Firecracker and crosvm do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from splitvmm.monitor.layout import (
    BOOT_GDT,
    BOOT_IDT,
    BOOT_STACK_TOP,
    FOUR_GIB,
    PAGE_SIZE,
    PD_BASE,
    PDPT,
    PML4,
    ZERO_PAGE,
)
from splitvmm.native.kvm import (
    X86_CR0_ET,
    X86_CR0_NE,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFLAGS_FIXED,
)
from splitvmm.record import Struct

if TYPE_CHECKING:
    from splitvmm.monitor.loader import GuestRam
    from splitvmm.native.kvm import CpuidEntry, VcpuFd

# Page-table entry bits (SDM Vol. 3A 4.5, tables 4-15 to 4-18).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PDE: maps a 2 MiB page
HUGE_PAGE = 2 << 20
ENTRIES_PER_TABLE = 512
PD_COUNT = FOUR_GIB // (HUGE_PAGE * ENTRIES_PER_TABLE)  # 4 page directories

# EFER (SDM Vol. 3A 2.2.1, "Extended Feature Enable Register"): not in any UAPI header.
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Segment descriptor fields (SDM Vol. 3A 3.4.5, figure 3-8).
ACCESS_CODE64 = 0x9B  # present, DPL 0, code/data, execute/read, accessed
ACCESS_DATA = 0x93  # present, DPL 0, code/data, read/write, accessed
FLAGS_CODE64 = 0xA  # G=1 (4 KiB granularity), L=1 (64-bit code)
FLAGS_DATA = 0xC  # G=1, D/B=1 (32-bit stack/operands)
FLAT_LIMIT = 0xFFFFF
TSS_TYPE_BUSY_64 = 0xB  # SDM 3.5, table 3-2: 64-bit TSS (busy)
TSS_MIN_LIMIT = 0x67  # a 64-bit TSS is 104 bytes (SDM 8.7)

# Selectors Linux's boot protocol names (arch/x86/include/asm/segment.h).
BOOT_CS = 0x10
BOOT_DS = 0x18

# Local APIC LVT registers (SDM Vol. 3A 11.5.1, table 11-1) and delivery modes.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4 << 8
APIC_MODE_EXTINT = 0x7 << 8

# MSRs (SDM Vol. 4, chapter 2) Firecracker's arch/x86_64/msr.rs resets at boot.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
# What KVM resets IA32_MISC_ENABLE to (no branch trace store, no PEBS), kept as they are
MISC_ENABLE_BTS_UNAVAIL = 1 << 11
MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11  # SDM Vol. 3A 12.11.2.1, IA32_MTRR_DEF_TYPE.E
MTRR_TYPE_WB = 6

GPRS = ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15").split()

# x87/SSE state after FNINIT and at power-up (SDM Vol. 1 8.1.5, 10.2.3).
FPU_FCW = 0x37F
MXCSR_DEFAULT = 0x1F80


def gdt_entry(access: int, flags: int, base: int, limit: int) -> int:
    """A code/data segment descriptor (SDM Vol. 3A 3.4.5)."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


BOOT_GDT_ENTRIES = (
    0,  # null
    0,  # unused, so the selectors are the ones Linux's boot protocol names
    gdt_entry(ACCESS_CODE64, FLAGS_CODE64, 0, FLAT_LIMIT),  # __BOOT_CS = 0x10
    gdt_entry(ACCESS_DATA, FLAGS_DATA, 0, FLAT_LIMIT),  # __BOOT_DS = 0x18
)
GDT_LIMIT = len(BOOT_GDT_ENTRIES) * 8 - 1
IDT_SIZE = 8  # one zeroed slot; the IDT limit stays 0 so every vector faults


class Segment(Struct, frozen=True):
    """A descriptor decoded into the fields struct kvm_segment holds."""

    selector: int
    base: int
    limit: int  # in bytes - 1, granularity already applied
    type: int
    s: int
    dpl: int
    present: int
    avl: int
    l: int  # noqa: E741 - the SDM's name for the 64-bit code flag
    db: int
    g: int

    @classmethod
    def from_descriptor(cls, desc: int, selector: int) -> Segment:
        access, flags = (desc >> 40) & 0xFF, (desc >> 52) & 0xF
        raw_limit = (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16
        g = (flags >> 3) & 1
        return cls(
            selector=selector,
            base=((desc >> 16) & 0xFFFFFF) | ((desc >> 56) & 0xFF) << 24,
            limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
            type=access & 0xF,
            s=(access >> 4) & 1,
            dpl=(access >> 5) & 3,
            present=(access >> 7) & 1,
            avl=flags & 1,
            l=(flags >> 1) & 1,
            db=(flags >> 2) & 1,
            g=g,
        )

    def apply(self, seg: Any) -> None:
        """Copy into a cffi struct kvm_segment."""
        seg.selector, seg.base, seg.limit, seg.type = (
            self.selector,
            self.base,
            self.limit,
            self.type,
        )
        seg.s, seg.dpl, seg.present, seg.avl = self.s, self.dpl, self.present, self.avl
        seg.l, seg.db, seg.g = self.l, self.db, self.g
        seg.unusable = 0 if self.present else 1


def page_tables() -> tuple[tuple[int, bytes], ...]:
    """(gpa, bytes) of the PML4, PDPT and 4 PDs identity-mapping 4 GiB with 2 MiB pages."""
    table = PTE_PRESENT | PTE_WRITABLE
    pml4 = struct.pack("<Q", PDPT | table).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{PD_COUNT}Q", *(PD_BASE + i * PAGE_SIZE | table for i in range(PD_COUNT)))
    leaf = table | PTE_PAGE_SIZE
    n = PD_COUNT * ENTRIES_PER_TABLE
    pds = struct.pack(f"<{n}Q", *(i * HUGE_PAGE | leaf for i in range(n)))
    return ((PML4, pml4), (PDPT, pdpt.ljust(PAGE_SIZE, b"\0")), (PD_BASE, pds))


def write_boot_tables(mem: GuestRam) -> None:
    """Page tables, GDT and the empty IDT, at the addresses layout.py reserves."""
    for gpa, data in page_tables():
        mem.write(gpa, data)
    mem.write(BOOT_GDT, struct.pack(f"<{len(BOOT_GDT_ENTRIES)}Q", *BOOT_GDT_ENTRIES))
    mem.write(BOOT_IDT, bytes(IDT_SIZE))


def configure_sregs(sregs: Any) -> None:
    """Long mode, paging on, flat segments from BOOT_GDT_ENTRIES (a cffi struct kvm_sregs)."""
    code = Segment.from_descriptor(BOOT_GDT_ENTRIES[BOOT_CS // 8], BOOT_CS)
    data = Segment.from_descriptor(BOOT_GDT_ENTRIES[BOOT_DS // 8], BOOT_DS)
    code.apply(sregs.cs)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        data.apply(seg)
    # No TSS descriptor in our GDT: TR's hidden part must still be a busy 64-bit TSS for
    # VM entry in IA-32e mode (SDM Vol. 3C 27.3.1.2); the kernel loads its own TR early.
    tss = Segment(
        selector=0, base=0, limit=TSS_MIN_LIMIT, type=TSS_TYPE_BUSY_64,
        s=0, dpl=0, present=1, avl=0, l=0, db=0, g=0,
    )  # fmt: skip
    tss.apply(sregs.tr)
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT, GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = BOOT_IDT, 0
    # ET is hard-wired on every x86-64 CPU; NE selects native x87 error reporting, which
    # Linux requires. CD/NW from the reset value are dropped: caches on.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG
    sregs.cr3 = PML4
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def configure_regs(regs: Any, entry: int) -> None:
    """rip at the entry, rsi at the zero page (boot.rst), a stack, interrupts off."""
    for name in GPRS:
        setattr(regs, name, 0)  # no reset leftovers (rdx holds the CPU signature after reset)
    regs.rip = entry
    regs.rsi = ZERO_PAGE
    regs.rsp = regs.rbp = BOOT_STACK_TOP
    regs.rflags = X86_EFLAGS_FIXED  # bit 1 is always 1; IF=0


def boot_msrs() -> dict[int, int]:
    """The MSR values a VMM sets at boot (Firecracker arch/x86_64/msr.rs)."""
    msrs = dict.fromkeys(
        (
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ),
        0,
    )
    # Fast-string operations enabled: what firmware leaves set (SDM Vol. 4 table 2-2); KVM's
    # BTS and PEBS unavailable bits as KVM reset them (clearing them would claim both).
    unavailable = MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL
    msrs[MSR_IA32_MISC_ENABLE] = MISC_ENABLE_FAST_STRING | unavailable
    # MTRRs on with write-back as the default type (current Firecracker does the same):
    # with MTRRs off, Linux also skips PAT setup and maps everything uncached-minus.
    msrs[MSR_MTRR_DEF_TYPE] = MTRR_ENABLE | MTRR_TYPE_WB
    return msrs


def _with_delivery_mode(lvt: int, mode: int) -> int:
    return (lvt & ~APIC_DELIVERY_MODE_MASK) | mode


def setup_lapic_lints(vcpu: VcpuFd) -> None:
    """LINT0 as ExtINT (the 8259's line) and LINT1 as NMI: the PC wiring the MP table describes.

    Needs the in-kernel irqchip (KVM_CREATE_IRQCHIP) before it is called.
    """
    regs = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        lvt = int.from_bytes(regs[offset : offset + 4], "little")
        regs[offset : offset + 4] = _with_delivery_mode(lvt, mode).to_bytes(4, "little")
    vcpu.set_lapic(bytes(regs))


def setup_power_on(vcpu: VcpuFd, cpuid_table: Sequence[CpuidEntry]) -> None:
    """What KVM's RESET leaves out of the SDM's power-up state (Vol. 3A, "Processor State
    After Reset"), for a firmware boot: EDX holds the processor signature, CPUID.01H:EAX (KVM
    resets a vCPU before it has a CPUID table, and puts its default 0x600 there), and
    IA32_MISC_ENABLE has fast strings on (Vol. 4 table 2-2: the default; KVM resets it off).
    QEMU's x86_cpu_reset_hold sets both."""
    leaf1 = next((e for e in cpuid_table if (e.function, e.index) == (1, 0)), None)
    if leaf1 is not None:
        regs = vcpu.get_regs()
        regs.rdx = leaf1.eax
        vcpu.set_regs(regs)
    unavailable = MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL
    vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING | unavailable})


def setup_fpu(vcpu: VcpuFd) -> None:
    """x87 control word and MXCSR at their power-up values, as Firecracker sets them."""
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_FCW
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def setup_vcpu_64(vcpu: VcpuFd, entry: int) -> None:
    """Registers, segments, paging, FPU and MSRs of a vCPU about to run the 64-bit entry.

    The tables it points at are written once per VM by write_boot_tables().
    """
    sregs = vcpu.get_sregs()
    configure_sregs(sregs)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    configure_regs(regs, entry)
    vcpu.set_regs(regs)
    setup_fpu(vcpu)
    vcpu.set_msrs(boot_msrs())
