"""CPUID normalization and the operator's CPUID mask, on synthetic KVM tables."""

from __future__ import annotations

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor import boot
from splitvmm.monitor.boot import check_physical_bits
from splitvmm.monitor.cpuid import (
    CpuidMask,
    missing_on_host,
    never_offered,
    physical_address_bits,
    vcpu_cpuid,
)
from splitvmm.native.kvm import CpuidEntry

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def vendor(name: bytes) -> CpuidEntry:
    ebx, edx, ecx = (int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(0, 0, 0, eax=0x1F, ebx=ebx, ecx=ecx, edx=edx)


INTEL = [
    vendor(b"GenuineIntel"),
    CpuidEntry(1, 0, 0, eax=0x906EA, ebx=0x00100800, ecx=0x81A0B203, edx=0x1F8BFBFF),
    CpuidEntry(4, 0, SIG, eax=0x1C004121, ebx=0x01C0003F, ecx=0x3F, edx=0),  # L1d
    CpuidEntry(4, 3, SIG, eax=0x1C03C163, ebx=0x03C0003F, ecx=0x2FFF, edx=6),  # L3
    CpuidEntry(4, 4, SIG, eax=0, ebx=0, ecx=0, edx=0),
    CpuidEntry(6, 0, 0, eax=0x77, ebx=2, ecx=9, edx=0),
    CpuidEntry(7, 0, SIG, eax=0, ebx=0x029C6FBF, ecx=0x40000020, edx=0),
    CpuidEntry(0xA, 0, 0, eax=0x07300404, ebx=0, ecx=0, edx=0x603),
    CpuidEntry(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=5),
]
AMD = [
    vendor(b"AuthenticAMD"),
    CpuidEntry(1, 0, 0, eax=0xA10F11, ebx=0x1020800, ecx=0x81202000, edx=0x78BFBFF),
    CpuidEntry(0x80000008, 0, 0, eax=0x3030, ebx=0, ecx=0x7001, edx=0),
    CpuidEntry(0x8000001D, 2, SIG, eax=0x143, ebx=0x1C0003F, ecx=0x7FF, edx=2),
    CpuidEntry(0x8000001D, 3, SIG, eax=0x4163, ebx=0x3C0003F, ecx=0x7FFF, edx=1),
    CpuidEntry(0x8000001E, 0, 0, eax=0, ebx=0, ecx=0, edx=0),
]


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    return next(e for e in entries if (e.function, e.index) == (function, index))


def test_cpuid_leaf1_ebx_holds_apic_id_and_logical_count() -> None:
    entries = vcpu_cpuid(INTEL, 3, 4, tsc_deadline=True)

    assert find(entries, 1).ebx == 0x03040800  # APIC ID 3, 4 logical, CLFLUSH 8 kept


def test_cpuid_leaf1_sets_hypervisor_and_htt() -> None:
    leaf1 = find(vcpu_cpuid(INTEL, 0, 2, tsc_deadline=True), 1)

    assert (leaf1.ecx >> 31, (leaf1.edx >> 28) & 1) == (1, 1)


def test_cpuid_leaf1_single_vcpu_clears_htt() -> None:
    leaf1 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True), 1)

    assert (leaf1.edx >> 28) & 1 == 0


def test_cpuid_leaf1_without_tsc_deadline_support_clears_it() -> None:
    leaf1 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=False), 1)

    assert (leaf1.ecx >> 24) & 1 == 0


def test_cpuid_leaf1_clears_pdcm() -> None:
    leaf1 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True), 1)

    assert (leaf1.ecx >> 15) & 1 == 0


def test_cpuid_hides_nested_virtualization() -> None:
    """VMX (leaf 1 ECX 5) and SVM (0x80000001 ECX 2) as KVM reports them with nested=1: a
    snapshot holds no nested state, and a guest's kvm module runs VMXON as it loads."""
    table = [*INTEL, CpuidEntry(0x80000001, 0, 0, eax=0, ebx=0, ecx=0x121 | 1 << 2, edx=0)]
    table[1] = CpuidEntry(1, 0, 0, eax=0x906EA, ebx=0x00100800, ecx=0x81A0B223, edx=0x1F8BFBFF)
    entries = vcpu_cpuid(table, 0, 1, tsc_deadline=True)
    assert ((find(entries, 1).ecx >> 5) & 1, find(entries, 0x80000001).ecx) == (0, 0x121)


def test_cpuid_a_snapshots_table_loses_what_no_boot_offers_and_a_boots_loses_nothing() -> None:
    """never_offered() is what a restore gives KVM_SET_CPUID2 of a snapshot's table, which is
    untrusted: VMX, SVM and WAITPKG go, as from every boot's table (which it leaves as it
    is), and so do Hyper-V's signature (KVM's Hyper-V emulation: kvm_cpuid_has_hyperv) and
    the PMU leaf (a vPMU: host perf events), and nothing else does."""
    nested = [*INTEL, CpuidEntry(0x80000001, 0, 0, eax=0, ebx=0, ecx=0x121 | 1 << 2, edx=0)]
    nested[1] = CpuidEntry(1, 0, 0, eax=0x906EA, ebx=0x00100800, ecx=0x81A0B223, edx=0x1F8BFBFF)
    hyperv = CpuidEntry(0x40000001, 0, 0, eax=0x31237648, ebx=0, ecx=0, edx=0)  # "Hv#1"
    assert any(e.function == 0xA and e.eax for e in nested)  # the host's PMU, version and all
    crafted = never_offered([*nested, hyperv])
    assert [find(crafted, f).ecx for f in (1, 7, 0x80000001)] == [0x81A0B203, 0x40000000, 0x121]
    assert find(crafted, 0x40000001).eax == 0
    assert [e for e in crafted if e.function == 0xA] == [CpuidEntry(0xA, 0, 0, 0, 0, 0, 0)]
    changed = (1, 7, 0xA, 0x40000001, 0x80000001)
    assert [e for e in crafted if e.function not in changed] == [
        e for e in nested if e.function not in changed
    ]
    booted = vcpu_cpuid(nested, 0, 2, tsc_deadline=True)
    assert never_offered(booted) == booted


def test_cpuid_leaf4_counts_cores_and_l3_sharing() -> None:
    entries = vcpu_cpuid(INTEL, 0, 4, tsc_deadline=True)

    assert (find(entries, 4, 0).eax >> 14, find(entries, 4, 3).eax >> 14) == (
        (3 << 12) | 0, (3 << 12) | 3,
    )  # fmt: skip


def test_cpuid_leaf4_terminator_is_untouched() -> None:
    entries = vcpu_cpuid(INTEL, 0, 4, tsc_deadline=True)

    assert find(entries, 4, 4) == find(INTEL, 4, 4)


def test_cpuid_leaf6_keeps_only_arat() -> None:
    leaf6 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True), 6)

    assert (leaf6.eax, leaf6.ebx, leaf6.ecx, leaf6.edx) == (0x4, 0, 0, 0)


def test_cpuid_leaf7_clears_waitpkg() -> None:
    leaf7 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True), 7)

    assert leaf7.ecx == 0x40000000


def test_cpuid_leaf_0xa_hides_pmu() -> None:
    leaf_a = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True), 0xA)

    assert (leaf_a.eax, leaf_a.edx) == (0, 0)


def test_cpuid_leaf_0xb_edx_is_x2apic_id() -> None:
    entries = vcpu_cpuid(INTEL, 2, 3, tsc_deadline=True)

    assert (find(entries, 0xB, 0).edx, find(entries, 0xB, 1).edx) == (2, 2)


def test_cpuid_leaf_0xb_core_level_is_added_with_all_vcpus() -> None:
    core = find(vcpu_cpuid(INTEL, 0, 3, tsc_deadline=True), 0xB, 1)

    assert (core.eax, core.ebx, core.ecx, core.flags) == (2, 3, 0x201, SIG)


def test_cpuid_leaf_0xb_smt_level_has_one_thread() -> None:
    smt = find(vcpu_cpuid(INTEL, 0, 3, tsc_deadline=True), 0xB, 0)

    assert (smt.eax, smt.ebx, smt.ecx) == (0, 1, 0x100)


def test_cpuid_amd_0x80000008_counts_cores() -> None:
    leaf = find(vcpu_cpuid(AMD, 0, 4, tsc_deadline=True), 0x80000008)

    assert leaf.ecx == 0x2003  # ApicIdSize 2, NC 3


def test_cpuid_amd_0x8000001e_has_extended_apic_id() -> None:
    leaf = find(vcpu_cpuid(AMD, 5, 6, tsc_deadline=True), 0x8000001E)

    assert (leaf.eax, leaf.ebx & 0xFF, (leaf.ebx >> 8) & 0xFF) == (5, 5, 0)


def test_cpuid_amd_l3_is_shared_by_all_vcpus() -> None:
    entries = vcpu_cpuid(AMD, 0, 4, tsc_deadline=True)

    l2, l3 = find(entries, 0x8000001D, 2), find(entries, 0x8000001D, 3)
    assert (l2.eax >> 14, l3.eax >> 14) == (0, 3)


def test_cpuid_intel_table_leaves_0x80000008_alone() -> None:
    table = [*INTEL, CpuidEntry(0x80000008, 0, 0, eax=0x3027, ebx=0, ecx=0, edx=0)]

    leaf = find(vcpu_cpuid(table, 0, 4, tsc_deadline=True), 0x80000008)

    assert leaf.ecx == 0


def test_cpuid_vcpu_count_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="1 to 254 vCPUs, not 0"):
        vcpu_cpuid(INTEL, 0, 0, tsc_deadline=True)


def test_cpuid_vcpu_id_outside_vm_is_refused() -> None:
    with pytest.raises(ConfigError, match="vCPU 2 does not exist in a VM of 2 vCPUs"):
        vcpu_cpuid(INTEL, 2, 2, tsc_deadline=True)


def test_cpuid_mask_parse_reads_leaf_register_and_bits() -> None:
    mask = CpuidMask.parse(["1.ecx:0x80000000"])

    assert mask.clear == {(1, 0, "ecx"): 0x80000000}


def test_cpuid_mask_parse_reads_hex_leaf_and_subleaf() -> None:
    mask = CpuidMask.parse(["0x7.0.EBX:32"])

    assert mask.clear == {(7, 0, "ebx"): 32}


def test_cpuid_mask_parse_merges_repeated_keys() -> None:
    mask = CpuidMask.parse(["1.ecx:0x1", "1.0.ecx:0x2"])

    assert mask.clear == {(1, 0, "ecx"): 0x3}


def test_cpuid_mask_parse_bad_syntax_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"vm.cpuid_mask: '1-ecx=4' is not LEAF\[\.SUBLEAF\]\.REGISTER:BITS"
    ):
        CpuidMask.parse(["1-ecx=4"])


def test_cpuid_mask_parse_unknown_register_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not LEAF"):
        CpuidMask.parse(["1.esi:4"])


def test_cpuid_mask_parse_bad_number_is_refused() -> None:
    with pytest.raises(ConfigError, match="bits '0xZZ' is not a number"):
        CpuidMask.parse(["1.ecx:0xZZ"])


def test_cpuid_mask_parse_bits_wider_than_32_are_refused() -> None:
    with pytest.raises(ConfigError, match="does not fit in 32 bits"):
        CpuidMask.parse(["1.ecx:0x100000000"])


def test_cpuid_mask_parse_zero_bits_are_refused() -> None:
    with pytest.raises(ConfigError, match="clears no bits"):
        CpuidMask.parse(["1.ecx:0"])


def test_cpuid_mask_apply_clears_bits() -> None:
    mask = CpuidMask.parse(["1.ecx:0x80000000"])

    leaf1 = find(vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True, mask=mask), 1)

    assert leaf1.ecx >> 31 == 0


def test_cpuid_mask_apply_never_sets_bits() -> None:
    mask = CpuidMask.parse(["6.edx:0xffffffff", "6.eax:0x1"])

    leaf6 = find(mask.apply(INTEL), 6)

    assert (leaf6.eax, leaf6.edx) == (0x76, 0)


def test_cpuid_mask_apply_matches_subleaf() -> None:
    mask = CpuidMask.parse(["4.3.eax:0xffffffff"])

    entries = mask.apply(INTEL)

    assert (find(entries, 4, 0).eax, find(entries, 4, 3).eax) == (0x1C004121, 0)


def test_cpuid_mask_apply_to_absent_leaf_changes_nothing() -> None:
    mask = CpuidMask.parse(["0x40000001.eax:0xffffffff"])

    assert mask.apply(INTEL) == INTEL


def test_cpuid_restore_on_a_host_with_every_feature_finds_nothing_missing() -> None:
    saved = vcpu_cpuid(INTEL, 1, 2, tsc_deadline=True)  # HYPERVISOR, HTT, TSC_DEADLINE set
    osxsave = [e if e.function != 1 else CpuidEntry(1, 0, 0, e.eax, e.ebx, e.ecx | 1 << 27, e.edx)
               for e in saved]  # fmt: skip
    assert missing_on_host(osxsave, INTEL) == []


def test_cpuid_restore_on_a_host_lacking_a_feature_names_it() -> None:
    """A guest that found AVX-512F (leaf 7 EBX 16) at boot uses it: restored on a host whose
    KVM does not offer it, it meets #UD. The restore was silent."""
    saved = [e if e.function != 7 else CpuidEntry(7, 0, SIG, e.eax, e.ebx | 1 << 16, e.ecx, e.edx)
             for e in vcpu_cpuid(INTEL, 0, 1, tsc_deadline=True)]  # fmt: skip
    assert missing_on_host(saved, INTEL) == ["leaf 0x7.0 ebx bits 0x10000"]


def test_cpuid_restore_on_another_vendor_is_named() -> None:
    saved = vcpu_cpuid(AMD, 0, 1, tsc_deadline=True)
    assert (
        missing_on_host(saved, INTEL)[0] == "vendor 'AuthenticAMD' (this host's is 'GenuineIntel')"
    )


def test_physical_address_bits_come_from_leaf_0x80000008_or_default_to_36():
    leaf = CpuidEntry(0x80000008, 0, 0, 0x3028, 0, 0, 0)  # 40 physical, 48 linear bits
    assert physical_address_bits([leaf]) == 40
    assert physical_address_bits([CpuidEntry(1, 0, 0, 0x600, 0, 0, 0)]) == 36


@pytest.mark.parametrize(
    ("memory_gib", "bits", "refused"),
    [(3, 32, False), (4, 32, True), (63, 36, False), (64, 36, True), (1024, 46, False)],
)
def test_ram_past_the_guests_physical_address_width_is_refused_naming_the_key(
    memory_gib, bits, refused
):
    """RAM past the PCI hole sits above 4 GiB: 4G of RAM reaches 5 GiB, past 32 bits."""
    if refused:
        with pytest.raises(ConfigError, match=f"vm.memory: .* past the {bits}-bit"):
            check_physical_bits(memory_gib << 30, bits)
    else:
        check_physical_bits(memory_gib << 30, bits)


@pytest.mark.parametrize(
    ("ram", "bits", "fits"),
    [
        (64 << 20, 16, "at most 0 MiB fits"),  # was "at most -1024 MiB fits"
        (512 << 20, 28, "at most 256 MiB fits"),  # was "at most -768 MiB fits"
        (4 << 30, 32, "at most 3072 MiB fits"),
        (1 << 40, 36, "at most 64512 MiB fits"),
    ],
)
def test_physical_bits_too_few_says_how_much_ram_fits(ram, bits, fits):
    """A vm.cpuid_mask that clears 0x80000008 EAX bits (MAXPHYADDR) below 32: the RAM that
    fits lies below the PCI hole, not 1 GiB less than the width."""
    with pytest.raises(ConfigError, match=f"past the {bits}-bit physical addresses .*: {fits}$"):
        boot.check_physical_bits(ram, bits)
