"""Architectural state of every vCPU and of the VM, as plain data, for snapshots.

`save_vcpu`/`save_vm` read everything KVM keeps for a paused VM; `restore_vcpu`/`restore_vm`
put it into a fresh VM (fresh process) so the guest goes on exactly where it stopped.
`to_dict`/`from_dict` turn a state into JSON-able dicts and back; `from_dict` treats its input
as hostile (a snapshot file) and raises StateError naming the field on any wrong type, unknown
or missing key, wrong struct size or out-of-range int.

Readable where it matters (regs, sregs, MSRs, CPUID, XCRs are named ints); raw bytes of the
kernel's own struct where the monitor never looks inside (XSAVE, LAPIC, vCPU events, debug
registers, irqchip, PIT). Those structs are the kernel's ABI, versioned by the kernel; their
sizes come from <linux/kvm.h> (native/kvm.py) and a snapshot of any other size is refused.

Preconditions (the coordinator's job, DESIGN.md "Snapshot"):
- save: every vCPU is out of KVM_RUN, and a pending PIO/MMIO exit has been completed with one
  KVM_RUN with immediate_exit=1. KVM finishes an IN/OUT only on the next KVM_RUN
  (complete_userspace_io); saved before that, RIP still points at the OUT and the restored
  guest would execute it twice.
- restore: the fresh VM has its irqchip, PIT, memslots and vCPUs, guest RAM is already back
  (KVM_SET_SREGS reloads PAE PDPTEs from guest memory), and no vCPU has entered KVM_RUN yet
  (KVM refuses a different KVM_SET_CPUID2 after the first run). Then restore_vm and
  restore_vcpu for each vCPU, then run. Firecracker's snapshot builder restores the VM state
  before the vCPUs', its newer in-place reset path the vCPUs first; both orders pass
  tests/integration/test_vmstate_kvm.py here.

Save order (Firecracker vstate/vcpu/x86_64.rs save_state): MP state first, because
KVM_GET_MP_STATE runs kvm_apic_accept_events(), which may change LAPIC and vCPU state; then
regs, sregs, XSAVE (or FPU), XCRs, debug registers, LAPIC, TSC rate, CPUID, MSRs; vCPU events
last, since the GETs before it may change what is pending.

Restore order (Firecracker restore_state, with QEMU's MSR ordering), each step and why:
 1. CPUID (KVM_SET_CPUID2) first: KVM checks most of what follows against it (XSAVE's
    xstate_bv against the XCR0 mask of leaf 0xD, CR4 bits, TSC_ADJUST exists only if leaf 7
    says so, x2APIC MSRs). Boot code sets CPUID with cpuid.setup_cpuid; restore sets the saved
    table instead, so the guest sees the CPU it booted on.
 2. TSC rate (KVM_SET_TSC_KHZ) when this host's differs by more than 250 ppm (Firecracker's and
    QEMU's tolerance), before the TSC MSR is written in that rate.
 3. MP state: some SET ioctls behave differently for a BSP, an AP waiting for SIPI, a halted
    vCPU (Firecracker sets it right after CPUID).
 4. regs: KVM_SET_REGS drops a pending exception, so it goes before the vCPU events.
 5. sregs: CR0/CR4/EFER and the APIC base MSR. Before the LAPIC (whose register meaning
    depends on xAPIC/x2APIC mode in the APIC base) and before the MSRs (MSR writes are
    checked against EFER and the paging mode).
 6. XSAVE (or FPU), then XCRs, as Firecracker and QEMU do.
 7. debug registers.
 8. LAPIC: after sregs (APIC base), before the MSRs: KVM accepts IA32_TSC_DEADLINE only while
    the LAPIC timer is in TSC-deadline mode.
 9. MSRs in one KVM_SET_MSRS, ordered: IA32_TSC_ADJUST, IA32_TSC, the rest by index,
    IA32_TSC_DEADLINE last. Host-initiated writes of TSC_ADJUST only store the value and a
    host write of IA32_TSC sets the TSC offset (kvm_set_msr_common), so that pair is
    order-free today; QEMU writes TSC_ADJUST before TSC and the deadline after all other MSRs
    (kvm_put_tscdeadline_msr), because the deadline is a TSC value and must come after it.
10. vCPU events last: the pending/injected exception, interrupt, NMI and SMI, which the SETs
    above may have cleared.

The VM clock: KVM_SET_CLOCK puts kvmclock back at the saved value, and the TSC MSR puts the
guest TSC back at its saved value: the guest sees no time pass while it was saved (QEMU's
default). PIT: KVM_SET_PIT2 reloads each channel's count at "now" (kvm_pit_load_count), so a
running channel restarts its current period; the saved count_load_time (host CLOCK_MONOTONIC)
is not used by KVM.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

from splitvmm.errors import KvmError, StateError
from splitvmm.native.kvm import (
    DEBUGREGS_SIZE,
    FPU_SIZE,
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    IRQCHIP_SIZE,
    LAPIC_SIZE,
    MAX_XCRS,
    PIT_STATE2_SIZE,
    REGS_LAYOUT,
    SREGS_LAYOUT,
    VCPU_EVENTS_SIZE,
    XSAVE_MIN_SIZE,
    CpuidEntry,
    Kvm,
    Layout,
    VcpuFd,
    VmFd,
)

log = logging.getLogger("splitvmm.vmstate")

# MSR numbers: Intel SDM Vol. 4, and arch/x86/include/asm/msr-index.h.
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_TSC_DEADLINE = 0x6E0
# MTRRs: KVM emulates them (8 variable pairs, KVM_NR_VAR_MTRR) but KVM_GET_MSR_INDEX_LIST does
# not list them; QEMU saves them (kvm_put_msrs, has_msr_mtrr) and so do we. MTRRcap (0xFE) is
# read-only and not saved.
MSR_MTRR_PHYS_BASE0 = 0x200
MTRR_VARIABLE_PAIRS = 8
MSR_MTRR_FIX64K_00000 = 0x250
MSR_MTRR_FIX16K = (0x258, 0x259)
MSR_MTRR_FIX4K = tuple(range(0x268, 0x270))
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_MSRS = (
    *range(MSR_MTRR_PHYS_BASE0, MSR_MTRR_PHYS_BASE0 + 2 * MTRR_VARIABLE_PAIRS),
    MSR_MTRR_FIX64K_00000,
    *MSR_MTRR_FIX16K,
    *MSR_MTRR_FIX4K,
    MSR_MTRR_DEF_TYPE,
)

TSC_KHZ_TOLERANCE_PPM = 250  # Firecracker and QEMU (Red Hat bz 1839095)
# Bounds on untrusted snapshots. KVM_MAX_CPUID_ENTRIES (kvm_host.h, not UAPI) is 256; KVM lists
# a few dozen MSRs; the largest XSAVE area today (AMX) is about 11 KiB.
MAX_CPUID_ENTRIES = 256
MAX_MSRS = 1024
MAX_XSAVE_SIZE = 64 * 1024
U32_BITS, U64_BITS = 32, 64


@dataclass(frozen=True, slots=True)
class VcpuHost:
    """What save and restore need to know about this host's KVM; probe it once per VM."""

    msr_indices: tuple[int, ...]  # KVM_GET_MSR_INDEX_LIST plus the MTRRs
    xsave_size: int  # KVM_CAP_XSAVE2's size; 0 when the host has no XSAVE (FPU instead)

    @classmethod
    def probe(cls, kvm: Kvm, vm: VmFd | None = None) -> VcpuHost:
        """The VM fd is where the KVM API says to ask KVM_CAP_XSAVE2; /dev/kvm answers the
        same for this process (the size depends on its arch_prctl permissions only)."""
        size = vm.xsave_size() if vm is not None else kvm.xsave_size()
        indices = dict.fromkeys([*kvm.msr_index_list(), *MTRR_MSRS])  # ordered, no duplicates
        return cls(tuple(indices), size)


@dataclass(frozen=True, slots=True, kw_only=True)
class VcpuState:
    """One vCPU's architectural state. Exactly one of fpu/xsave is set: the XSAVE area holds
    the legacy FPU/SSE state too, so FPU is kept only on a host without XSAVE."""

    VERSION: ClassVar[int] = 1

    cpuid: tuple[CpuidEntry, ...]
    regs: Mapping[str, int]  # REGS_LAYOUT: rax..r15, rip, rflags
    sregs: Mapping[str, Any]  # SREGS_LAYOUT: segments, gdt/idt, cr0..cr8, efer, apic_base, ...
    fpu: bytes | None  # struct kvm_fpu
    xsave: bytes | None  # struct kvm_xsave, KVM_CAP_XSAVE2 bytes
    xcrs: Mapping[int, int]  # {XCR index: value}
    lapic: bytes  # struct kvm_lapic_state
    events: bytes  # struct kvm_vcpu_events
    debugregs: bytes  # struct kvm_debugregs
    mp_state: int  # KVM_MP_STATE_*
    msrs: Mapping[int, int]  # {MSR index: value}, those KVM_GET_MSRS could read
    tsc_khz: int | None  # the guest TSC rate; None where KVM_GET_TSC_KHZ is missing

    @classmethod
    def migrate(cls, version: int, fields: dict[str, object]) -> dict[str, object]:
        if version != cls.VERSION:
            raise StateError(f"{cls.__name__}: no migration from v{version}")
        return fields


@dataclass(frozen=True, slots=True, kw_only=True)
class VmState:
    """The in-kernel devices and clock: the `chip` union of struct kvm_irqchip for each of the
    two PICs and the IOAPIC, struct kvm_pit_state2, and kvmclock in ns."""

    VERSION: ClassVar[int] = 1

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit2: bytes
    clock: int

    @classmethod
    def migrate(cls, version: int, fields: dict[str, object]) -> dict[str, object]:
        if version != cls.VERSION:
            raise StateError(f"{cls.__name__}: no migration from v{version}")
        return fields


# -- capture and restore ----------------------------------------------------------------------


def save_cpuid(vcpu: VcpuFd) -> tuple[CpuidEntry, ...]:
    """The CPUID table the vCPU runs with (KVM_GET_CPUID2), to set first on restore."""
    return tuple(vcpu.get_cpuid())


def save_vcpu(vcpu: VcpuFd, host: VcpuHost | None = None) -> VcpuState:
    """Reads a paused vCPU (see the module docstring for preconditions and order).

    `host` defaults to probing /dev/kvm; a coordinator saving several vCPUs probes once.
    """
    host = host if host is not None else _probe_default()
    mp_state = vcpu.get_mp_state()
    regs = vcpu.get_regs_dict()
    sregs = vcpu.get_sregs_dict()
    xsave = vcpu.get_xsave(host.xsave_size) if host.xsave_size else None
    fpu = None if xsave is not None else vcpu.get_fpu_bytes()
    xcrs = vcpu.get_xcrs() if host.xsave_size else {}
    debugregs = vcpu.get_debugregs()
    lapic = bytes(vcpu.get_lapic())
    tsc_khz = _tsc_khz(vcpu)
    cpuid = save_cpuid(vcpu)
    msrs = read_msrs(vcpu, host.msr_indices)
    events = vcpu.get_vcpu_events()
    return VcpuState(
        cpuid=cpuid,
        regs=regs,
        sregs=sregs,
        fpu=fpu,
        xsave=xsave,
        xcrs=xcrs,
        lapic=lapic,
        events=events,
        debugregs=debugregs,
        mp_state=mp_state,
        msrs=msrs,
        tsc_khz=tsc_khz,
    )


def restore_vcpu(vcpu: VcpuFd, state: VcpuState, host: VcpuHost | None = None) -> None:
    """Puts `state` into a vCPU that has not run yet, in the order the docstring explains."""
    host = host if host is not None else _probe_default()
    xsave = _fit_xsave(state, host)
    vcpu.set_cpuid(list(state.cpuid))
    _restore_tsc_khz(vcpu, state.tsc_khz)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs_dict(state.regs)
    vcpu.set_sregs_dict(state.sregs)
    if xsave is not None:
        vcpu.set_xsave(xsave)
        vcpu.set_xcrs(state.xcrs)
    elif state.fpu is not None:
        vcpu.set_fpu_bytes(state.fpu)
    vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)
    vcpu.set_msrs(msr_restore_order(state.msrs))
    vcpu.set_vcpu_events(state.events)


def save_vm(vm: VmFd) -> VmState:
    """Reads the in-kernel PICs, IOAPIC, PIT and kvmclock of a paused VM."""
    return VmState(
        pic_master=vm.get_irqchip(IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(IRQCHIP_IOAPIC),
        pit2=vm.get_pit2(),
        clock=vm.get_clock().clock,
    )


def restore_vm(vm: VmFd, state: VmState) -> None:
    """Firecracker's order (vstate/vm.rs restore_state): PIT, clock, PIC master/slave, IOAPIC.
    The clock goes back with flags 0: no KVM_CLOCK_REALTIME, so time saved does not pass."""
    vm.set_pit2(state.pit2)
    vm.set_clock(state.clock)
    vm.set_irqchip(IRQCHIP_PIC_MASTER, state.pic_master)
    vm.set_irqchip(IRQCHIP_PIC_SLAVE, state.pic_slave)
    vm.set_irqchip(IRQCHIP_IOAPIC, state.ioapic)


def read_msrs(vcpu: VcpuFd, indices: Sequence[int]) -> dict[int, int]:
    """Every MSR in `indices` that KVM_GET_MSRS can read. KVM stops at the first MSR it cannot
    read and returns how many it did: skip that one and go on with the rest."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.update(got)
        if len(got) < len(rest):
            log.debug("MSR %#x is not readable on this host; not saved", rest[len(got)])
        rest = rest[len(got) + 1 :]
    return values


def msr_restore_order(msrs: Mapping[int, int]) -> dict[int, int]:
    """TSC_ADJUST, TSC, the rest by index, TSC_DEADLINE last (module docstring, step 9)."""
    first = [i for i in (MSR_IA32_TSC_ADJUST, MSR_IA32_TSC) if i in msrs]
    last = [MSR_IA32_TSC_DEADLINE] if MSR_IA32_TSC_DEADLINE in msrs else []
    middle = sorted(set(msrs) - set(first) - set(last))
    return {i: msrs[i] for i in [*first, *middle, *last]}


def _probe_default() -> VcpuHost:
    kvm = Kvm()
    try:
        return VcpuHost.probe(kvm)
    finally:
        kvm.close()


def _tsc_khz(vcpu: VcpuFd) -> int | None:
    try:
        return vcpu.tsc_khz()
    except KvmError:  # no KVM_CAP_GET_TSC_KHZ: the snapshot then only fits this CPU model
        return None


def _restore_tsc_khz(vcpu: VcpuFd, khz: int | None) -> None:
    here = _tsc_khz(vcpu)
    if khz is None or here is None or abs(here - khz) * 1_000_000 <= khz * TSC_KHZ_TOLERANCE_PPM:
        return
    try:
        vcpu.set_tsc_khz(khz)
    except KvmError as e:
        raise StateError(
            f"tsc_khz: the snapshot's TSC runs at {khz} kHz, this host's at {here} kHz, "
            f"and KVM cannot scale it ({e})"
        ) from None


def _fit_xsave(state: VcpuState, host: VcpuHost) -> bytes | None:
    """The XSAVE bytes KVM_SET_XSAVE wants: it reads KVM_CAP_XSAVE2 bytes, so a smaller saved
    area is padded with zeros (its xstate_bv does not name the extra components); a larger one
    holds state this host cannot take."""
    if state.xsave is None:
        if state.fpu is None:
            raise StateError("VcpuState: neither xsave nor fpu is set")
        return None
    if not host.xsave_size:
        raise StateError("xsave: this host's KVM has no XSAVE (KVM_CAP_XSAVE)")
    if len(state.xsave) > host.xsave_size:
        raise StateError(f"xsave: {len(state.xsave)} bytes > this host's {host.xsave_size}")
    return state.xsave.ljust(host.xsave_size, b"\0")


# -- codec ------------------------------------------------------------------------------------

S = TypeVar("S", VcpuState, VmState)
_Encode = Callable[[Any], Any]
_Decode = Callable[[str, Any], Any]
_HEX_KEY = re.compile(r"0x[0-9a-f]{1,8}")


def to_dict(state: VcpuState | VmState) -> dict[str, Any]:
    """Plain JSON-able fields: ints, str (bytes as base64, MSR/XCR indices as "0x.." keys),
    lists and dicts. The state's VERSION travels beside it (the manifest's job)."""
    fields = _FIELDS[type(state)]
    return {name: enc(getattr(state, name)) for name, (enc, _) in fields.items()}


def from_dict(cls: type[S], data: object) -> S:
    """Validating decode of untrusted data; StateError names the first bad field."""
    fields = _FIELDS.get(cls)
    if fields is None:
        raise TypeError(f"from_dict: {cls!r} is not a snapshot state class")
    obj = _object(cls.__name__, data, fields.keys())
    values = {name: dec(f"{cls.__name__}.{name}", obj[name]) for name, (_, dec) in fields.items()}
    state = cls(**values)
    if isinstance(state, VcpuState) and (state.fpu is None) == (state.xsave is None):
        raise StateError("VcpuState: exactly one of fpu and xsave must be set")
    return state


def _object(path: str, data: object, expected: Iterable[str]) -> Mapping[str, Any]:
    """`data` as a mapping with exactly the `expected` keys."""
    if not isinstance(data, Mapping):
        raise StateError(f"{path}: expected an object, got {type(data).__name__}")
    if not all(isinstance(k, str) for k in data):
        raise StateError(f"{path}: keys must be strings")
    unknown = sorted(set(data) - set(expected))
    missing = sorted(set(expected) - set(data))
    if unknown:
        raise StateError(f"{path}: unknown field {unknown[0]!r}")
    if missing:
        raise StateError(f"{path}: missing field {missing[0]!r}")
    return data


def _uint(path: str, value: object, bits: int) -> int:
    if type(value) is not int:  # bool is an int subclass: refused too
        raise StateError(f"{path}: expected an integer, got {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise StateError(f"{path}: {value} is out of range for {bits} bits")
    return value


def _optional(decode: _Decode) -> _Decode:
    return lambda path, value: None if value is None else decode(path, value)


def _enc_bytes(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _dec_bytes(path: str, value: object, *, size: int = 0, low: int = 0, high: int = 0) -> bytes:
    """Base64 of exactly `size` bytes, or of low..high bytes in whole __u32s (XSAVE)."""
    if not isinstance(value, str):
        raise StateError(f"{path}: expected base64 text, got {type(value).__name__}")
    if len(value) > 4 * (max(size, high) + 2) // 3 + 4:  # refuse before decoding a huge blob
        raise StateError(f"{path}: {len(value)} characters is too long")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise StateError(f"{path}: not valid base64") from None
    if size and len(raw) != size:
        raise StateError(f"{path}: {len(raw)} bytes, the kernel's struct is {size}")
    if not size and (not low <= len(raw) <= high or len(raw) % 4):
        raise StateError(f"{path}: {len(raw)} bytes is not a valid XSAVE size ({low}..{high})")
    return raw


def _dec_layout(path: str, value: object, layout: Layout) -> dict[str, Any]:
    """A struct as _to_plain gives it, every int checked against the header's field width."""
    obj = _object(path, value, layout.keys())
    out: dict[str, Any] = {}
    for name, spec in layout.items():
        where = f"{path}.{name}"
        if isinstance(spec, dict):
            out[name] = _dec_layout(where, obj[name], spec)
        elif isinstance(spec, tuple):
            out[name] = _dec_uint_list(where, obj[name], *spec)
        else:
            out[name] = _uint(where, obj[name], spec)
    return out


def _dec_uint_list(path: str, value: object, bits: int, length: int) -> list[int]:
    if not isinstance(value, list) or len(value) != length:
        raise StateError(f"{path}: expected a list of {length} integers")
    return [_uint(f"{path}[{i}]", v, bits) for i, v in enumerate(value)]


def _enc_index_map(value: Mapping[int, int]) -> dict[str, int]:
    return {f"{index:#x}": v for index, v in value.items()}


def _dec_index_map(path: str, value: object, *, limit: int) -> dict[int, int]:
    """{"0x10": value}: keys are u32 indices in lower-case hex, values u64."""
    if not isinstance(value, Mapping):
        raise StateError(f"{path}: expected an object, got {type(value).__name__}")
    if len(value) > limit:
        raise StateError(f"{path}: {len(value)} entries > {limit}")
    out: dict[int, int] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not _HEX_KEY.fullmatch(key):
            raise StateError(f"{path}: key {key!r} is not a 0x-prefixed 32-bit hex index")
        out[int(key, 16)] = _uint(f"{path}[{key}]", v, U64_BITS)
    return out


_CPUID_FIELDS = tuple(f.name for f in dataclasses.fields(CpuidEntry))


def _enc_cpuid(value: Sequence[CpuidEntry]) -> list[dict[str, int]]:
    return [dataclasses.asdict(e) for e in value]


def _dec_cpuid(path: str, value: object) -> tuple[CpuidEntry, ...]:
    if not isinstance(value, list) or len(value) > MAX_CPUID_ENTRIES:
        raise StateError(f"{path}: expected a list of at most {MAX_CPUID_ENTRIES} entries")
    entries = []
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        obj = _object(where, entry, _CPUID_FIELDS)
        fields = {k: _uint(f"{where}.{k}", obj[k], U32_BITS) for k in _CPUID_FIELDS}
        entries.append(CpuidEntry(**fields))
    return tuple(entries)


def _same(value: Any) -> Any:
    return value


def _plain(value: Any) -> Any:
    """A copy of nested dicts/lists of ints, so the encoded dict shares nothing with the state."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _raw(size: int) -> tuple[_Encode, _Decode]:
    return _enc_bytes, partial(_dec_bytes, size=size)


_FIELDS: dict[type, dict[str, tuple[_Encode, _Decode]]] = {
    VcpuState: {
        "cpuid": (_enc_cpuid, _dec_cpuid),
        "regs": (_plain, partial(_dec_layout, layout=REGS_LAYOUT)),
        "sregs": (_plain, partial(_dec_layout, layout=SREGS_LAYOUT)),
        "fpu": (_enc_bytes, _optional(partial(_dec_bytes, size=FPU_SIZE))),
        "xsave": (
            _enc_bytes,
            _optional(partial(_dec_bytes, low=XSAVE_MIN_SIZE, high=MAX_XSAVE_SIZE)),
        ),
        "xcrs": (_enc_index_map, partial(_dec_index_map, limit=MAX_XCRS)),
        "lapic": _raw(LAPIC_SIZE),
        "events": _raw(VCPU_EVENTS_SIZE),
        "debugregs": _raw(DEBUGREGS_SIZE),
        "mp_state": (_same, partial(_uint, bits=U32_BITS)),
        "msrs": (_enc_index_map, partial(_dec_index_map, limit=MAX_MSRS)),
        "tsc_khz": (_same, _optional(partial(_uint, bits=U32_BITS))),
    },
    VmState: {
        "pic_master": _raw(IRQCHIP_SIZE),
        "pic_slave": _raw(IRQCHIP_SIZE),
        "ioapic": _raw(IRQCHIP_SIZE),
        "pit2": _raw(PIT_STATE2_SIZE),
        "clock": (_same, partial(_uint, bits=U64_BITS)),
    },
}
