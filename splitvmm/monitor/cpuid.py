"""Each vCPU's CPUID table, derived from what KVM supports (KVM_GET_SUPPORTED_CPUID).

Normalization gives every vCPU its own APIC IDs and a topology consistent with
the vCPU count (one package, one thread per core, every vCPU a core), sets the
hypervisor bit, and hides features the guest would use without our emulating
them. The choices follow Firecracker (cpu_config/x86_64/cpuid/normalize.rs),
crosvm (x86_64/src/cpuid.rs) and QEMU; bit names and positions are the Intel
SDM Vol. 2A CPUID tables and the AMD APM Vol. 3 appendix E.

A CpuidMask is the operator's knob: bits to clear, by leaf, subleaf and
register. It can only clear, so a config can never advertise a feature KVM
does not support.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from splitvmm.config import MAX_VCPUS
from splitvmm.errors import ConfigError
from splitvmm.native.kvm import (
    KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    CpuidEntry,
)
from splitvmm.record import Struct, field, replace

if TYPE_CHECKING:
    from splitvmm.native.kvm import Kvm, VcpuFd

REGISTERS = ("eax", "ebx", "ecx", "edx")
U32 = 0xFFFFFFFF

# Leaf 1 (SDM Vol. 2A table 3-8, 3-10, 3-11).
LEAF1_EBX_LOGICAL_COUNT_SHIFT = 16
LEAF1_EBX_APIC_ID_SHIFT = 24
LEAF1_ECX_VMX = 1 << 5  # nested virtualization: see NEVER_OFFERED_ECX
LEAF1_ECX_PDCM = 1 << 15  # IA32_PERF_CAPABILITIES: no PMU is virtualized for the guest
EXT1_ECX_SVM = 1 << 2  # leaf 0x80000001: AMD's nested virtualization
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28  # EBX[23:16] is valid
# Leaf 4 / AMD 0x8000001D cache descriptors: level, sharing count, cores per package.
CACHE_LEVEL_SHIFT, CACHE_LEVEL_MASK = 5, 0x7
CACHE_SHARING_SHIFT, CACHE_SHARING_MASK = 14, 0xFFF
CACHE_CORES_SHIFT, CACHE_CORES_MASK = 26, 0x3F  # leaf 4 only; reserved on AMD
# Leaf 6: only ARAT (APIC timer runs in deep C-states) is kept; KVM's LAPIC timer always runs.
LEAF6_EAX_ARAT = 1 << 2
LEAF7_ECX_WAITPKG = 1 << 5  # UMWAIT/TPAUSE would idle the physical CPU (Firecracker clears it)
# Leaves 0xB / 0x1F (SDM Vol. 2A, "Extended Topology Enumeration Leaf").
TOPO_LEVEL_SMT, TOPO_LEVEL_CORE = 1, 2
TOPO_LEVEL_TYPE_SHIFT = 8
# AMD 0x80000008 ECX: NC (cores - 1) in [7:0], ApicIdSize in [15:12].
AMD_NC_MASK, AMD_APIC_ID_SIZE_SHIFT, AMD_APIC_ID_SIZE_MASK = 0xFF, 12, 0xF
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")

MASK_SYNTAX = re.compile(
    r"(?P<leaf>\w+)(?:\.(?P<subleaf>\w+))?\.(?P<reg>e[abcd]x):(?P<bits>\w+)", re.IGNORECASE
)

MaskKey = tuple[int, int, str]  # (leaf, subleaf, register)


class Topology(Struct, frozen=True):
    vcpu_id: int
    nvcpus: int
    amd: bool
    tsc_deadline: bool

    @property
    def core_bits(self) -> int:
        """Bits of the APIC ID that number the cores: ceil(log2(nvcpus))."""
        return (self.nvcpus - 1).bit_length()


def _parse_int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"vm.cpuid_mask: {spec!r}: {what} {text!r} is not a number") from None
    if not 0 <= value <= U32:
        raise ConfigError(f"vm.cpuid_mask: {spec!r}: {what} {text} does not fit in 32 bits")
    return value


class CpuidMask(Struct, frozen=True):
    """Bits to clear, keyed by (leaf, subleaf, register)."""

    clear: Mapping[MaskKey, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> CpuidMask:
        """Parse strings "LEAF[.SUBLEAF].REG:BITS", e.g. "1.ecx:0x80000000", "7.0.ebx:0x20"."""
        clear: dict[MaskKey, int] = {}
        for spec in specs:
            m = MASK_SYNTAX.fullmatch(spec.strip())
            if m is None:
                raise ConfigError(
                    f"vm.cpuid_mask: {spec!r} is not LEAF[.SUBLEAF].REGISTER:BITS "
                    "(for example 1.ecx:0x80000000)"
                )
            leaf = _parse_int(m["leaf"], "leaf", spec)
            subleaf = _parse_int(m["subleaf"] or "0", "subleaf", spec)
            bits = _parse_int(m["bits"], "bits", spec)
            if bits == 0:
                raise ConfigError(f"vm.cpuid_mask: {spec!r} clears no bits")
            key = (leaf, subleaf, m["reg"].lower())
            clear[key] = clear.get(key, 0) | bits
        return cls(clear)

    def apply(self, entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
        """The entries with the masked bits cleared; nothing is ever set."""
        return [self._apply_one(e) for e in entries]

    def _apply_one(self, e: CpuidEntry) -> CpuidEntry:
        subleaf = _subleaf(e)
        changes = {
            reg: getattr(e, reg) & ~self.clear[(e.function, subleaf, reg)] & U32
            for reg in REGISTERS
            if (e.function, subleaf, reg) in self.clear
        }
        return replace(e, **changes) if changes else e


# ECX bits no vCPU is given, whatever the host offers, by (function, index): cleared from a
# boot's table (the normalizers below) and from a snapshot's (never_offered()).
# - VMX, SVM: a snapshot cannot hold a nested hypervisor's state (KVM_GET_NESTED_STATE is
#   not saved), and a Linux guest that loads kvm_intel runs VMXON at once (6.12 and later),
#   so every restore would take its VMX operation away from under it.
# - WAITPKG: UMWAIT/TPAUSE would idle the physical CPU (Firecracker clears it).
NEVER_OFFERED_ECX: dict[tuple[int, int], int] = {
    (1, 0): LEAF1_ECX_VMX,
    (7, 0): LEAF7_ECX_WAITPKG,
    (0x80000001, 0): EXT1_ECX_SVM,
}


# KVM turns its Hyper-V emulation on for a vCPU whose leaf 0x40000001 EAX reads "Hv#1"
# (arch/x86/kvm/cpuid.c kvm_cpuid_has_hyperv): hypercalls, the Hyper-V MSRs, KVM_EXIT_HYPERV.
# In a boot's table that leaf is KVM's own, its paravirtual feature bits, never that value.
HYPERV_CPUID_INTERFACE = 0x40000001
HYPERV_CPUID_SIGNATURE_EAX = 0x31237648  # "Hv#1"
PMU_LEAF = 0xA  # a version there makes KVM give the guest a vPMU: host perf events


def never_offered(entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """`entries` without what no boot offers: a snapshot's table is untrusted input, and
    KVM_SET_CPUID2 takes what it is given. A crafted one switched on nested virtualization
    wherever KVM offers it (nested=1: NEVER_OFFERED_ECX's bits), KVM's Hyper-V emulation
    (its signature) or a vPMU (leaf 0xA, which every boot zeroes: _no_pmu), each more of
    the host kernel for the guest to reach. An entry whose index is not significant is the
    one KVM answers for every subleaf of its function (cpuid_entry2_find), subleaf 0 too,
    whatever index it names: keyed as subleaf 0, as CpuidMask keys it."""
    return [_as_booted(e) for e in entries]


def _as_booted(e: CpuidEntry) -> CpuidEntry:
    hidden = NEVER_OFFERED_ECX.get((e.function, _subleaf(e)), 0)
    if e.ecx & hidden:
        e = replace(e, ecx=e.ecx & ~hidden)
    if e.function == HYPERV_CPUID_INTERFACE and e.eax == HYPERV_CPUID_SIGNATURE_EAX:
        e = replace(e, eax=0)
    if e.function == PMU_LEAF and (e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0):
        e = replace(e, eax=0, ebx=0, ecx=0, edx=0)
    return e


def _subleaf(e: CpuidEntry) -> int:
    """The subleaf KVM matches `e` to: its index where the index is significant, else any (0)."""
    return e.index if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX else 0


def _leaf1(e: CpuidEntry, t: Topology) -> CpuidEntry:
    ebx = (e.ebx & 0xFFFF) | t.nvcpus << LEAF1_EBX_LOGICAL_COUNT_SHIFT
    ebx |= t.vcpu_id << LEAF1_EBX_APIC_ID_SHIFT
    ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & ~(LEAF1_ECX_PDCM | NEVER_OFFERED_ECX[1, 0])
    # KVM emulates the TSC deadline timer only where KVM_CAP_TSC_DEADLINE_TIMER says so.
    ecx = ecx | LEAF1_ECX_TSC_DEADLINE if t.tsc_deadline else ecx & ~LEAF1_ECX_TSC_DEADLINE
    edx = e.edx | LEAF1_EDX_HTT if t.nvcpus > 1 else e.edx & ~LEAF1_EDX_HTT
    return replace(e, ebx=ebx, ecx=ecx, edx=edx)


def _cache(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """Leaf 4 / 0x8000001D: L1 and L2 per core, L3 shared by the package."""
    if not (e.eax or e.ebx or e.ecx or e.edx):
        return e  # past the last cache descriptor
    level = (e.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK
    sharing = min(t.nvcpus, CACHE_SHARING_MASK + 1) - 1 if level >= 3 else 0
    eax = e.eax & ~(CACHE_SHARING_MASK << CACHE_SHARING_SHIFT) | sharing << CACHE_SHARING_SHIFT
    if e.function == 4:
        cores = min(t.nvcpus, CACHE_CORES_MASK + 1) - 1
        eax = eax & ~(CACHE_CORES_MASK << CACHE_CORES_SHIFT) | cores << CACHE_CORES_SHIFT
    return replace(e, eax=eax & U32)


def _leaf6(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """No thermal, power or frequency control is emulated: hide all of it (incl. EPB)."""
    return replace(e, eax=e.eax & LEAF6_EAX_ARAT, ebx=0, ecx=0, edx=0)


def _leaf7(e: CpuidEntry, t: Topology) -> CpuidEntry:
    return replace(e, ecx=e.ecx & ~NEVER_OFFERED_ECX[7, 0]) if e.index == 0 else e


def _ext1(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """0x80000001: no SVM (NEVER_OFFERED_ECX)."""
    return replace(e, ecx=e.ecx & ~NEVER_OFFERED_ECX[0x80000001, 0])


def _no_pmu(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """Leaf 0xA: architectural PMU. We configure no vPMU, so report version 0."""
    return replace(e, eax=0, ebx=0, ecx=0, edx=0)


def _topology(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """Leaf 0xB / 0x1F: an SMT level of 1 thread, a core level of all vCPUs, then the end."""
    if e.index == 0:
        eax, ebx, ecx = 0, 1, TOPO_LEVEL_SMT << TOPO_LEVEL_TYPE_SHIFT
    elif e.index == 1:
        eax, ebx, ecx = t.core_bits, t.nvcpus, TOPO_LEVEL_CORE << TOPO_LEVEL_TYPE_SHIFT | 1
    else:
        eax, ebx, ecx = 0, 0, e.index & 0xFF  # level type 0: no more levels
    return replace(e, eax=eax, ebx=ebx, ecx=ecx, edx=t.vcpu_id)


def _amd_size(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """0x80000008 ECX: NC = cores - 1, ApicIdSize = bits of the APIC ID that number cores."""
    if not t.amd:
        return e
    ecx = e.ecx & ~(AMD_NC_MASK | AMD_APIC_ID_SIZE_MASK << AMD_APIC_ID_SIZE_SHIFT)
    ecx |= (t.nvcpus - 1) | t.core_bits << AMD_APIC_ID_SIZE_SHIFT
    return replace(e, ecx=ecx)


def _amd_cache(e: CpuidEntry, t: Topology) -> CpuidEntry:
    return _cache(e, t) if t.amd else e


def _amd_ext_apic(e: CpuidEntry, t: Topology) -> CpuidEntry:
    """0x8000001E: extended APIC ID; core ID = vCPU, 1 thread per core, 1 node."""
    if not t.amd:
        return e
    return replace(e, eax=t.vcpu_id, ebx=t.vcpu_id & 0xFF, ecx=0, edx=0)


NORMALIZERS = {
    0x1: _leaf1,
    0x4: _cache,
    0x6: _leaf6,
    0x7: _leaf7,
    PMU_LEAF: _no_pmu,
    0xB: _topology,
    0x1F: _topology,
    0x80000001: _ext1,
    0x80000008: _amd_size,
    0x8000001D: _amd_cache,
    0x8000001E: _amd_ext_apic,
}


def _is_amd(entries: Sequence[CpuidEntry]) -> bool:
    return _vendor(entries).encode("latin-1") in AMD_VENDORS


def _with_core_level(entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """Add subleaf 1 of 0xB/0x1F where KVM reports only subleaf 0 (Linux 6.2 onwards)."""
    out = list(entries)
    have = {(e.function, e.index) for e in entries}
    for e in entries:
        if e.function in (0xB, 0x1F) and e.index == 0 and (e.function, 1) not in have:
            out.append(CpuidEntry(e.function, 1, e.flags, 0, 0, 0, 0))
    return out


def vcpu_cpuid(
    supported: Sequence[CpuidEntry],
    vcpu_id: int,
    nvcpus: int,
    *,
    tsc_deadline: bool,
    mask: CpuidMask | None = None,
) -> list[CpuidEntry]:
    """The CPUID table for one vCPU: KVM's supported set, normalized, then masked."""
    if not 1 <= nvcpus <= MAX_VCPUS:
        raise ConfigError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {nvcpus}")
    if not 0 <= vcpu_id < nvcpus:
        raise ConfigError(f"vCPU {vcpu_id} does not exist in a VM of {nvcpus} vCPUs")
    topo = Topology(vcpu_id, nvcpus, _is_amd(supported), tsc_deadline)
    entries = [
        NORMALIZERS[e.function](e, topo) if e.function in NORMALIZERS else e
        for e in _with_core_level(supported)
    ]
    return mask.apply(entries) if mask is not None else entries


def physical_address_bits(entries: Sequence[CpuidEntry]) -> int:
    """MAXPHYADDR, the physical-address width the guest is told: leaf 0x80000008 EAX[7:0];
    36 where the table has no such leaf (SDM vol. 3A 4.1.4, for a CPU with PAE)."""
    for e in entries:
        if e.function == 0x80000008 and e.eax & 0xFF:
            return e.eax & 0xFF
    return 36


def setup_cpuid(
    kvm: Kvm, vcpu: VcpuFd, nvcpus: int, mask: CpuidMask | None = None
) -> list[CpuidEntry]:
    """KVM_SET_CPUID2 on `vcpu` with its normalized table; returns what was set."""
    tsc_deadline = kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0
    entries = vcpu_cpuid(
        kvm.supported_cpuid(), vcpu.vcpu_id, nvcpus, tsc_deadline=tsc_deadline, mask=mask
    )
    vcpu.set_cpuid(entries)
    return entries


# The feature registers a restore compares with this host's KVM (leaf, subleaf, register),
# and the bits in them that are not features the host must have: set by _leaf1 itself
# (HYPERVISOR, HTT, TSC_DEADLINE, which KVM emulates where KVM_CAP_TSC_DEADLINE_TIMER says
# so) or by KVM as the guest runs (OSXSAVE and OSPKE follow CR4).
FEATURE_REGISTERS: dict[tuple[int, int, str], int] = {
    (0x1, 0, "ecx"): LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE | 1 << 27,  # OSXSAVE
    (0x1, 0, "edx"): LEAF1_EDX_HTT,
    (0x7, 0, "ebx"): 0,
    (0x7, 0, "ecx"): 1 << 4,  # OSPKE
    (0x7, 0, "edx"): 0,
    (0x7, 1, "eax"): 0,
    (0xD, 1, "eax"): 0,  # XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    (0x80000001, 0, "ecx"): 0,
    (0x80000001, 0, "edx"): 0,
}


def missing_on_host(saved: Sequence[CpuidEntry], supported: Sequence[CpuidEntry]) -> list[str]:
    """What a guest started with `saved` (a snapshot's vCPU) uses that this host's KVM
    (`supported`) does not offer: its vendor, and feature bits, one line each; [] where it
    has them all. A guest patches its code for the features it finds at boot (XSAVES in its
    context switch, RDPID in its vDSO): restored without them it meets #UD."""
    have = {(e.function, e.index): e for e in supported}
    had = {(e.function, e.index): e for e in saved}
    missing = []
    if _vendor(saved) != _vendor(supported):
        missing.append(f"vendor {_vendor(saved)!r} (this host's is {_vendor(supported)!r})")
    for (leaf, subleaf, reg), dynamic in FEATURE_REGISTERS.items():
        entry = had.get((leaf, subleaf))
        if entry is None:
            continue
        host = have.get((leaf, subleaf))
        lacking = getattr(entry, reg) & ~dynamic & ~(getattr(host, reg) if host else 0)
        if lacking:
            missing.append(f"leaf {leaf:#x}.{subleaf} {reg} bits {lacking:#x}")
    return missing


def _vendor(entries: Sequence[CpuidEntry]) -> str:
    leaf0 = next((e for e in entries if e.function == 0), None)
    if leaf0 is None:
        return ""
    raw = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    return raw.decode("latin-1")
