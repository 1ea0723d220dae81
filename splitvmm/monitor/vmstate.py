"""Architectural state of every vCPU and of the VM, as plain data, for snapshots.

`save_vcpu`/`save_vm` read everything KVM keeps for a paused VM; `restore_vcpu`/`restore_vm`
put it into a fresh VM (fresh process) so the guest goes on exactly where it stopped.
`to_dict`/`from_dict` turn a state into JSON-able dicts and back through the schema codec
(protocol/schema.py: the field types below say every bound); `from_dict` treats its input as
hostile (a snapshot file) and raises StateError naming the field on any wrong type, unknown
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
  restore_vcpu for each vCPU, in that order (Firecracker's snapshot builder's), then
  tell_stopped, then run. The VM first because of its clock: a kvmclock guest's
  MSR_KVM_WALL_CLOCK_NEW makes KVM write the guest's boot time into its RAM as the MSR is set,
  computed from the VM's kvmclock then; set before KVM_SET_CLOCK, the boot time came out
  later by the guest's whole uptime (tests/integration/test_vmstate_kvm.py).

Save order (Firecracker vstate/vcpu/x86_64.rs save_state): MP state first, because
KVM_GET_MP_STATE runs kvm_apic_accept_events(), which may change LAPIC and vCPU state; then
regs, sregs, XSAVE, XCRs, debug registers, LAPIC, TSC rate, CPUID, MSRs; vCPU events last,
since the GETs before it may change what is pending. The x87/SSE state always goes through
the XSAVE area, on a host without XSAVE too (KVM gives its FXSAVE image there, x87 and SSE in
XSTATE_BV, so that it restores on any host), never KVM_GET_FPU/KVM_SET_FPU: those carry no
MXCSR (KVM reads the field as 0 and ignores it when set), so a guest's rounding mode, FTZ/DAZ
and exception masks would come back as the reset 0x1F80. A state's fpu is read for snapshots
of earlier releases only, which saved it where they took a host's xsave_size to be 0.

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
 6. XSAVE (or an older snapshot's FPU), then XCRs, as Firecracker and QEMU do; none where
    the host had no XSAVE: KVM saves none there and refuses KVM_SET_XCRS, even an empty one.
 7. debug registers.
 8. LAPIC: after sregs (APIC base), before the MSRs: KVM accepts IA32_TSC_DEADLINE only while
    the LAPIC timer is in TSC-deadline mode.
 9. MSRs in KVM_SET_MSRS calls of at most 255 (KVM's limit), in order: IA32_TSC_ADJUST,
    IA32_TSC, the rest by index, IA32_TSC_DEADLINE last. Host-initiated writes of TSC_ADJUST only store the value and a
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

import errno
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypedDict, TypeVar

import blake3

from splitvmm.errors import KvmError, StateError
from splitvmm.monitor.cpuid import never_offered
from splitvmm.monitor.platform import GED_EVENTS
from splitvmm.native.kvm import (
    DEBUGREGS_SIZE,
    FPU_SIZE,
    IOAPIC_REDIRTBL_OFFSET,
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    IRQCHIP_SIZE,
    KVM_CAP_XCRS,
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
from splitvmm.native.routing import IOAPIC_NUM_PINS
from splitvmm.protocol import schema
from splitvmm.protocol.schema import U32, U64, FieldTypes, Len, MaxLen, Size
from splitvmm.record import Struct, replace

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
# Machine-check banks (MCi_CTL, _STATUS, _ADDR, _MISC): KVM emulates KVM_MAX_MCE_BANKS (32)
# for a vCPU set up without KVM_X86_SETUP_MCE but does not list them either. Linux writes each
# MCi_CTL all ones at boot, and KVM drops an uncorrected error injected into a bank whose CTL
# is not: lost in a restore, machine checks went nowhere. QEMU and Firecracker save them; a
# bank the vCPU lacks is not readable and is skipped (read_msrs).
MSR_IA32_MC0_CTL = 0x400
KVM_MAX_MCE_BANKS = 32
MCE_BANK_MSRS = tuple(range(MSR_IA32_MC0_CTL, MSR_IA32_MC0_CTL + 4 * KVM_MAX_MCE_BANKS))
# IA32_PERF_CAPABILITIES: a capability KVM reports to a host read whatever the guest's CPUID
# says (before Linux 6.12: its default, nonzero on Intel), and refuses back unless CPUID has
# PDCM and a PMU (vmx_set_msr). Our guests have neither (cpuid.py), so a snapshot that held it
# could never be restored; it is saved only where the saved CPUID has PDCM (QEMU's rule), and
# dropped on restore from snapshots that hold it without (Firecracker never saves it).
MSR_IA32_PERF_CAPABILITIES = 0x345
CPUID_LEAF1_ECX_PDCM = 1 << 15

TSC_KHZ_TOLERANCE_PPM = 250  # Firecracker and QEMU (Red Hat bz 1839095)
# Bounds on untrusted snapshots. KVM_MAX_CPUID_ENTRIES (kvm_host.h, not UAPI) is 256; KVM lists
# a few dozen MSRs; the largest XSAVE area today (AMX) is about 11 KiB.
MAX_CPUID_ENTRIES = 256
MAX_MSRS = 1024
MAX_XSAVE_SIZE = 64 * 1024

# -- the schema of the states (protocol/schema.py checks every field on the way in) ------------

u32 = Annotated[int, U32]
u64 = Annotated[int, U64]
IndexMap = dict[u32, u64]  # MSRs and XCRs: {index: value}, indices written as "0x.." keys


def _struct(name: str, layout: Layout) -> Any:
    """A kernel struct's named fields (a Layout, from <linux/kvm.h>) as a record type: each int
    checked against its field's width, each array its length; read as plain dicts and lists,
    what the native layer's get/set_*_dict take."""
    fields: dict[str, Any] = {}
    for key, spec in layout.items():
        if isinstance(spec, dict):
            fields[key] = _struct(f"{name}_{key}", spec)
        elif isinstance(spec, tuple):
            bits, length = spec
            fields[key] = Annotated[
                list[Annotated[int, schema.Range(0, (1 << bits) - 1)]], Size(length)
            ]
        else:
            fields[key] = Annotated[int, schema.Range(0, (1 << spec) - 1)]
    return TypedDict(name, fields)  # type: ignore[operator]


if TYPE_CHECKING:  # built at run time from the layouts, for the schema; plain dicts to mypy
    KvmRegs = dict[str, int]
    KvmSregs = dict[str, Any]
else:
    KvmRegs = _struct("KvmRegs", REGS_LAYOUT)
    KvmSregs = _struct("KvmSregs", SREGS_LAYOUT)
# CpuidEntry lives in native/, which cannot import the schema: its fields are all __u32.
Cpuid = Annotated[CpuidEntry, FieldTypes({name: u32 for name in CpuidEntry.__struct_fields__})]


class VcpuHost(Struct, frozen=True):
    """What save and restore need to know about this host's KVM; probe it once per VM."""

    msr_indices: tuple[int, ...]  # KVM_GET_MSR_INDEX_LIST plus the MTRRs and MCE banks
    # KVM_CAP_XSAVE2's size (4 KiB or more since Linux 5.17, with XSAVE or without), else
    # 4 KiB with KVM_CAP_XSAVE (which KVM says on any host); 0 on a KVM without either
    xsave_size: int
    # KVM_CAP_XCRS: whether the host has XSAVE, which only this cap says (KVM gives no XCRs
    # without it, and refuses KVM_SET_XCRS and any XSAVE component past x87 and SSE)
    has_xsave: bool

    @classmethod
    def probe(cls, kvm: Kvm, vm: VmFd | None = None) -> VcpuHost:
        """The VM fd is where the KVM API says to ask KVM_CAP_XSAVE2; /dev/kvm answers the
        same for this process (the size depends on its arch_prctl permissions only)."""
        size = vm.xsave_size() if vm is not None else kvm.xsave_size()
        listed = [*kvm.msr_index_list(), *MTRR_MSRS, *MCE_BANK_MSRS]
        indices = dict.fromkeys(listed)  # ordered, no duplicates
        return cls(tuple(indices), size, kvm.check_extension(KVM_CAP_XCRS) > 0)


class VcpuState(Struct, frozen=True, kw_only=True):
    """One vCPU's architectural state. Exactly one of fpu/xsave is set: the XSAVE area holds
    the legacy FPU/SSE state too, MXCSR included, which struct kvm_fpu does not; fpu is only
    in states of earlier releases (their save read it where xsave_size was 0), restored as they
    were."""

    VERSION: ClassVar[int] = 1
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {}

    cpuid: Annotated[tuple[Cpuid, ...], MaxLen(MAX_CPUID_ENTRIES)]
    regs: KvmRegs  # REGS_LAYOUT: rax..r15, rip, rflags
    sregs: KvmSregs  # SREGS_LAYOUT: segments, gdt/idt, cr0..cr8, efer, apic_base, ...
    fpu: Annotated[bytes | None, Size(FPU_SIZE)]  # struct kvm_fpu
    # struct kvm_xsave, KVM_CAP_XSAVE2 bytes: whole __u32s
    xsave: Annotated[bytes | None, Len(XSAVE_MIN_SIZE, MAX_XSAVE_SIZE, multiple=4)]
    xcrs: Annotated[IndexMap, MaxLen(MAX_XCRS)]
    lapic: Annotated[bytes, Size(LAPIC_SIZE)]  # struct kvm_lapic_state
    events: Annotated[bytes, Size(VCPU_EVENTS_SIZE)]  # struct kvm_vcpu_events
    debugregs: Annotated[bytes, Size(DEBUGREGS_SIZE)]  # struct kvm_debugregs
    mp_state: u32  # KVM_MP_STATE_*
    msrs: Annotated[IndexMap, MaxLen(MAX_MSRS)]  # those KVM_GET_MSRS could read
    tsc_khz: u32 | None  # the guest TSC rate; None where KVM_GET_TSC_KHZ is missing

    def validate(self) -> None:
        if (self.fpu is None) == (self.xsave is None):
            raise schema.Invalid("exactly one of fpu and xsave must be set")
        leaves = {entry.function for entry in self.cpuid}
        if not {0, 1} <= leaves:  # KVM takes any table; the vCPU's MSRs then fail to restore
            raise schema.Invalid("cpuid: a table without leaf 0 and leaf 1 is no vCPU's")


class FirmwareId(Struct, frozen=True):
    """A firmware image as a snapshot names it: its size and the BLAKE3 of its bytes."""

    size: u64
    blake3: Annotated[bytes, Size(32)]

    @classmethod
    def of(cls, data: bytes) -> FirmwareId:
        return cls(len(data), blake3.blake3(data).digest())

    def __str__(self) -> str:
        return f"{self.size} bytes, BLAKE3 {self.blake3.hex()[:16]}"


class VmState(Struct, frozen=True, kw_only=True):
    """The in-kernel devices and clock: the `chip` union of struct kvm_irqchip for each of the
    two PICs and the IOAPIC, struct kvm_pit_state2, and kvmclock in ns with the rest of what
    KVM_GET_CLOCK said (v2): its flags (KVM_CLOCK_TSC_STABLE, and where the kernel has them
    KVM_CLOCK_REALTIME and KVM_CLOCK_HOST_TSC, which say `realtime` and `host_tsc` are
    valid: the host's CLOCK_REALTIME and TSC at that kvmclock). This release puts the clock
    back as saved (restore_vm); kept so that a restore which lets the saved time pass
    (KVM_SET_CLOCK with KVM_CLOCK_REALTIME, Firecracker's clock_realtime) can be offered for
    the snapshots taken now. v1 states have none of them: 0.

    firmware_shadow (v3): guest RAM holds a firmware boot's shadow (layout.FIRMWARE_SHADOW),
    as the firmware left it. Before v3 that range was a read-only mapping of the image, never
    RAM, so a restore of such a state copies the image's tail there (restore.apply). Always
    true when saved now; a kernel boot's restore does not look at it.

    firmware (v4): which image a firmware boot's ROM held. The guest may be running code of
    it (the ROM stays mapped at the top of 4 GiB, and its size says where), so a restore
    refuses another image (restore.apply), as QEMU refuses a "pc.bios" of another size and
    carries its bytes. None for a kernel boot, and for a state saved before v4, which did not
    say.

    ged_events (v5): the Generic Event Device's events the guest has not read yet
    (monitor/platform.py AcpiGed): a power button pressed just before the snapshot. A restore
    raises their interrupt again (restore.apply): the one they raised may have landed after
    the irqchip and LAPICs above were read. Before v5 there was no GED: 0."""

    VERSION: ClassVar[int] = 5
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {
        1: lambda f: {**f, "clock_flags": 0, "clock_realtime": 0, "clock_host_tsc": 0},
        2: lambda f: {**f, "firmware_shadow": False},
        3: lambda f: {**f, "firmware": None},
        4: lambda f: {**f, "ged_events": 0},
    }

    pic_master: Annotated[bytes, Size(IRQCHIP_SIZE)]
    pic_slave: Annotated[bytes, Size(IRQCHIP_SIZE)]
    ioapic: Annotated[bytes, Size(IRQCHIP_SIZE)]
    pit2: Annotated[bytes, Size(PIT_STATE2_SIZE)]
    clock: u64
    clock_flags: u32
    clock_realtime: u64
    clock_host_tsc: u64
    firmware_shadow: bool
    firmware: FirmwareId | None
    ged_events: u32

    def validate(self) -> None:
        if self.ged_events & ~GED_EVENTS:
            raise schema.Invalid(f"ged_events {self.ged_events:#x} holds bits no GED event has")


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
    xsave = vcpu.get_xsave(host.xsave_size or XSAVE_MIN_SIZE)  # module docstring: not the FPU
    xcrs = vcpu.get_xcrs() if host.has_xsave else {}
    debugregs = vcpu.get_debugregs()
    lapic = bytes(vcpu.get_lapic())
    tsc_khz = _tsc_khz(vcpu)
    cpuid = save_cpuid(vcpu)
    pdcm = _has_pdcm(cpuid)
    msrs = read_msrs(vcpu, [i for i in host.msr_indices if pdcm or i != MSR_IA32_PERF_CAPABILITIES])
    events = vcpu.get_vcpu_events()
    return VcpuState(
        cpuid=cpuid,
        regs=regs,
        sregs=sregs,
        fpu=None,
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
    msrs = _restorable_msrs(state, host)
    vcpu.set_cpuid(never_offered(state.cpuid))  # what no boot gives, nor may a snapshot
    _restore_tsc_khz(vcpu, state.tsc_khz)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs_dict(state.regs)
    vcpu.set_sregs_dict(state.sregs)
    if xsave is not None:
        vcpu.set_xsave(xsave)
        if state.xcrs:  # none where the host had no XSAVE, and KVM refuses KVM_SET_XCRS there
            vcpu.set_xcrs(state.xcrs)
    elif state.fpu is not None:
        if host.xsave_size:  # saved where there was no XSAVE: KVM_SET_FPU alone is not enough
            _mark_fpu_in_use(vcpu, host.xsave_size)
        vcpu.set_fpu_bytes(state.fpu)
    vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)
    vcpu.set_msrs(msrs)
    vcpu.set_vcpu_events(state.events)


def save_vm(vm: VmFd, firmware: FirmwareId | None = None, ged_events: int = 0) -> VmState:
    """Reads the in-kernel PICs, IOAPIC, PIT and kvmclock of a paused VM; `firmware` names a
    firmware boot's image, `ged_events` are the GED's unread ones."""
    return VmState(
        pic_master=vm.get_irqchip(IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(IRQCHIP_IOAPIC),
        pit2=vm.get_pit2(),
        **_clock(vm),
        firmware_shadow=True,
        firmware=firmware,
        ged_events=ged_events,
    )


def _clock(vm: VmFd) -> dict[str, int]:
    clock = vm.get_clock()
    return {
        "clock": clock.clock,
        "clock_flags": clock.flags,
        "clock_realtime": clock.realtime,
        "clock_host_tsc": clock.host_tsc,
    }


# struct kvm_ioapic_state's redirection entries (82093AA datasheet 3.2.4) and the LAPIC's
# ISR and IRR (SDM Vol. 3A 11.8.4: eight 32-bit registers, 16 bytes apart)
RTE_VECTOR, RTE_DELIVERY, RTE_REMOTE_IRR, RTE_LEVEL = 0xFF, 0x700, 1 << 14, 1 << 15
APIC_ISR, APIC_IRR = 0x100, 0x200


def release_orphaned_eois(vm: VmState, vcpus: Sequence[VcpuState]) -> VmState:
    """`vm` with Remote IRR cleared on each level-triggered IOAPIC pin (fixed or lowest-
    priority delivery) whose vector no vCPU's LAPIC holds in its IRR or ISR: the EOI it
    waits for will never come, and a pin left so never delivers again, whatever its
    devices assert. A release that read the LAPICs before the IOAPIC could save that (an
    INTx landing between the two reads: coordinator._write); cleared, the pin delivers
    again if it is still asserted, as the device that asserts it expects."""
    chip = bytearray(vm.ioapic)
    held = 0
    for vcpu in vcpus:
        for base in (APIC_ISR, APIC_IRR):
            for i in range(8):
                at = base + 0x10 * i
                held |= int.from_bytes(vcpu.lapic[at : at + 4], "little") << (32 * i)
    for pin in range(IOAPIC_NUM_PINS):
        at = IOAPIC_REDIRTBL_OFFSET + 8 * pin
        rte = int.from_bytes(chip[at : at + 8], "little")
        waiting = rte & RTE_LEVEL and rte & RTE_REMOTE_IRR and (rte & RTE_DELIVERY) <= 0x100
        if waiting and not (held >> (rte & RTE_VECTOR)) & 1:
            chip[at : at + 8] = (rte & ~RTE_REMOTE_IRR).to_bytes(8, "little")
    return vm if chip == vm.ioapic else replace(vm, ioapic=bytes(chip))


def restore_vm(vm: VmFd, state: VmState) -> None:
    """Firecracker's order (vstate/vm.rs restore_state): PIT, clock, PIC master/slave, IOAPIC.
    The clock goes back with flags 0: no KVM_CLOCK_REALTIME, so time saved does not pass."""
    vm.set_pit2(state.pit2)
    vm.set_clock(state.clock)
    vm.set_irqchip(IRQCHIP_PIC_MASTER, state.pic_master)
    vm.set_irqchip(IRQCHIP_PIC_SLAVE, state.pic_slave)
    vm.set_irqchip(IRQCHIP_IOAPIC, state.ioapic)


def tell_stopped(vcpu: VcpuFd) -> None:
    """KVM_KVMCLOCK_CTRL: a kvmclock guest is told it was stopped (PVCLOCK_GUEST_STOPPED),
    before it runs again after a pause, a snapshot's or a restore's. Linux's soft-lockup and
    RCU-stall watchdogs then take the jump in time for what it is rather than report a
    lockup (Firecracker does this on pause and after a restore, QEMU when the VM stops).
    EINVAL: the guest has not enabled kvmclock, and there is nobody to tell. Any other
    error is logged, not raised: the vCPUs must run again all the same."""
    try:
        vcpu.kvmclock_ctrl()
    except OSError as e:
        if e.errno != errno.EINVAL:
            log.warning("vcpu%d: KVM_KVMCLOCK_CTRL failed: %s", vcpu.vcpu_id, e)


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


def _has_pdcm(cpuid: Sequence[CpuidEntry]) -> bool:
    return any(e.function == 1 and e.ecx & CPUID_LEAF1_ECX_PDCM for e in cpuid)


def _restorable_msrs(state: VcpuState, host: VcpuHost) -> dict[int, int]:
    """The saved MSRs this host's KVM takes, in restore order. One it does not list (a
    snapshot from a newer kernel, or a crafted one) is left out when 0, what most such MSRs
    hold until a guest sets them, and refused, naming it, when not: KVM would take some
    silently and fail on others, blaming the batch. IA32_PERF_CAPABILITIES without PDCM is
    left out."""
    known = set(host.msr_indices)
    kept: dict[int, int] = {}
    for index, value in state.msrs.items():
        if index == MSR_IA32_PERF_CAPABILITIES and not _has_pdcm(state.cpuid):
            continue  # saved by releases before this rule; never writable back
        if index not in known:
            if value:
                raise StateError(
                    f"msrs: MSR {index:#x} = {value:#x} is not one this host's KVM saves "
                    "and restores (KVM_GET_MSR_INDEX_LIST)"
                )
            log.debug("MSR %#x is not listed by this host's KVM and is 0: not restored", index)
            continue
        kept[index] = value
    return msr_restore_order(kept)


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


# The XSAVE header's XSTATE_BV (SDM Vol. 1, 13.4.2): the components the area holds; x87 and SSE
XSAVE_XSTATE_BV = 512
XFEATURE_X87_SSE = 0x3


def _mark_fpu_in_use(vcpu: VcpuFd, size: int) -> None:
    """KVM_SET_FPU writes the legacy area of KVM's XSAVE buffer but not its header: on a fresh
    vCPU XSTATE_BV says x87 and SSE are in their init state, so KVM's XRSTOR (and KVM_GET_XSAVE)
    would give the guest an initialised FPU and zeroed XMM registers instead of the values
    set. Marked in use first, the values KVM_SET_FPU writes next are the ones loaded."""
    area = bytearray(vcpu.get_xsave(size))
    area[XSAVE_XSTATE_BV] |= XFEATURE_X87_SSE
    vcpu.set_xsave(bytes(area))


def _fit_xsave(state: VcpuState, host: VcpuHost) -> bytes | None:
    """The XSAVE bytes KVM_SET_XSAVE wants: it reads KVM_CAP_XSAVE2 bytes (the 4 KiB struct
    kvm_xsave on a host without XSAVE, where it takes x87 and SSE state alone), so a smaller
    saved area is padded with zeros (its xstate_bv does not name the extra components); a
    larger one holds state this host cannot take. XCRs are saved only where the host had XSAVE:
    a guest that ran with it cannot run here."""
    if state.xsave is None:
        if state.fpu is None:
            raise StateError("VcpuState: neither xsave nor fpu is set")
        return None
    if state.xcrs and not host.has_xsave:
        raise StateError(
            "xsave: this host's KVM has no XSAVE (KVM_CAP_XCRS); the guest ran with it"
        )
    size = host.xsave_size or XSAVE_MIN_SIZE
    if len(state.xsave) > size:
        raise StateError(f"xsave: {len(state.xsave)} bytes > this host's {size}")
    return state.xsave.ljust(size, b"\0")


# -- codec ------------------------------------------------------------------------------------

S = TypeVar("S", VcpuState, VmState)


def to_dict(state: VcpuState | VmState) -> dict[str, Any]:
    """Plain JSON-able fields: ints, str (bytes as base64, MSR/XCR indices as "0x.." keys),
    lists and dicts. The state's VERSION travels beside it (the manifest's job)."""
    return schema.encode(state)  # type: ignore[no-any-return]


def from_dict(cls: type[S], data: object, version: int | None = None) -> S:
    """Validating decode of untrusted data, upgraded first from `version` when given;
    StateError names the first bad field: "VcpuState: regs.rax: -1 is outside 0..2**64-1"."""
    if cls not in (VcpuState, VmState):
        raise TypeError(f"from_dict: {cls!r} is not a snapshot state class")
    return schema.decode(cls, data, where=cls.__name__, error=StateError, version=version)
