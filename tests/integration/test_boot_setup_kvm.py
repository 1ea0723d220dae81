"""Boot setup against real KVM: sregs, MSRs, LAPIC LINTs and CPUID are accepted and read back,
and a tiny ELF kernel loaded with load_linux reaches port I/O in long mode.

CPUID is checked by KVM_GET_CPUID2 readback, not from the guest: on PVM hosts the guest
sees the host's CPUID whatever we set (KVM-HERE.md).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.monitor.boot64 import (
    APIC_LVT_LINT0,
    APIC_LVT_LINT1,
    MSR_IA32_MISC_ENABLE,
    MSR_MTRR_DEF_TYPE,
    setup_lapic_lints,
    setup_vcpu_64,
    write_boot_tables,
)
from splitvmm.monitor.cpuid import CpuidMask, setup_cpuid
from splitvmm.monitor.layout import CMDLINE, IOAPIC_ID, KVM_TSS, ZERO_PAGE
from splitvmm.monitor.loader import load_linux
from splitvmm.monitor.memory import GuestMemory
from splitvmm.native.exits import PioOut
from splitvmm.native.kvm import (
    IOAPIC_ID_OFFSET,
    IRQCHIP_IOAPIC,
    X86_CR4_PAE,
    Kvm,
    VcpuFd,
    VmFd,
)
from tests.unit.images import Seg, make_elf

pytestmark = pytest.mark.kvm

GUEST_GPA = 0x200000
DEBUG_PORT = 0xF4
# mov %esi,%eax; mov $0xf4,%dx; out %eax,(%dx); mov 0x228(%rsi),%eax; out %eax,(%dx); hlt
GUEST_CODE = bytes.fromhex("89f0 66baf400 ef 8b8628020000 ef f4")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[VmFd]:
    with kvm.create_vm() as v:
        assert isinstance(v, VmFd)
        v.set_tss_addr(KVM_TSS)
        v.create_irqchip()
        yield v


@pytest.fixture
def vcpu(kvm: Kvm, vm: VmFd) -> Iterator[VcpuFd]:
    cpu = vm.create_vcpu(0, kvm.vcpu_mmap_size())
    yield cpu
    cpu.close()


def test_the_ioapic_id_the_mp_table_and_madt_give_is_the_one_kvms_ioapic_holds(vm: VmFd) -> None:
    """What a guest reads from the IOAPIC's ID register is what the tables told it
    (monitor/layout.py IOAPIC_ID; tests/unit/test_acpi.py checks both tables use it)."""
    (held,) = struct.unpack_from("<I", vm.get_irqchip(IRQCHIP_IOAPIC), IOAPIC_ID_OFFSET)

    assert held == IOAPIC_ID


def test_boot64_sregs_are_accepted_by_kvm(vcpu: VcpuFd) -> None:
    setup_vcpu_64(vcpu, GUEST_GPA)

    sregs = vcpu.get_sregs()
    assert (sregs.cr0 >> 31, sregs.cr4 & X86_CR4_PAE, sregs.efer & 0x500) == (1, 0x20, 0x500)
    assert (sregs.cs.selector, sregs.cs.l, sregs.ss.selector) == (0x10, 1, 0x18)


def test_boot64_msrs_are_accepted_by_kvm(vcpu: VcpuFd) -> None:
    setup_vcpu_64(vcpu, GUEST_GPA)

    back = vcpu.get_msrs([MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE])
    assert (back[MSR_IA32_MISC_ENABLE] & 1, back[MSR_MTRR_DEF_TYPE]) == (1, 0x806)


def test_boot64_lapic_lints_read_back_as_extint_and_nmi(vcpu: VcpuFd) -> None:
    setup_lapic_lints(vcpu)

    lapic = vcpu.get_lapic()
    lint0 = int.from_bytes(lapic[APIC_LVT_LINT0 : APIC_LVT_LINT0 + 4], "little")
    lint1 = int.from_bytes(lapic[APIC_LVT_LINT1 : APIC_LVT_LINT1 + 4], "little")
    assert ((lint0 >> 8) & 7, (lint1 >> 8) & 7) == (7, 4)


def test_cpuid_set_reads_back_with_apic_id_and_mask(kvm: Kvm, vcpu: VcpuFd) -> None:
    mask = CpuidMask.parse(["1.ecx:0x80000000"])  # clear the hypervisor bit we set

    setup_cpuid(kvm, vcpu, 2, mask)

    back = {(e.function, e.index): e for e in vcpu.get_cpuid()}
    assert (back[(1, 0)].ebx >> 24, (back[(1, 0)].ebx >> 16) & 0xFF, back[(1, 0)].ecx >> 31) == (
        0, 2, 0,
    )  # fmt: skip


def test_cpuid_readback_has_core_topology_level(kvm: Kvm, vcpu: VcpuFd) -> None:
    setup_cpuid(kvm, vcpu, 2)

    back = {(e.function, e.index): e for e in vcpu.get_cpuid()}
    assert (back[(0xB, 1)].ebx, back[(0xB, 1)].ecx >> 8) == (2, 2)


def _map(vm: VmFd, mem: GuestMemory) -> None:
    # SAFETY (test only): `mem.map` stays open until after the VM fd is closed.
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem.map))
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, base + region.offset)


def test_load_linux_elf_runs_in_long_mode_with_rsi_at_zero_page(
    tmp_path: Path, vm: VmFd, vcpu: VcpuFd
) -> None:
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(make_elf([Seg(GUEST_GPA, GUEST_CODE)], GUEST_GPA))
    mem = GuestMemory(16 << 20)
    _map(vm, mem)
    loaded = load_linux(mem, kernel, cmdline="console=ttyS0")
    write_boot_tables(mem)
    setup_vcpu_64(vcpu, loaded.entry)

    exits = [vcpu.run(), vcpu.run()]  # not a third: hlt would block (in-kernel LAPIC)

    vcpu.close()
    vm.close()
    mem.close()
    assert exits == [
        PioOut(DEBUG_PORT, 4, ZERO_PAGE.to_bytes(4, "little")),
        PioOut(DEBUG_PORT, 4, CMDLINE.to_bytes(4, "little")),
    ]
