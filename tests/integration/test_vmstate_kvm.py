"""vCPU and VM state against real KVM: a running two-vCPU guest is saved, its state goes through
the JSON codec, a second VM (the first one closed) is restored from it, and the guest goes on
from where it stopped.

The guest is a real-mode loop per vCPU: eax += 1, ebx += eax, store eax in RAM, `out` eax to the
debug port. Host-side state that the guest cannot make on PVM (KVM-HERE.md: no SSE, no
interrupts at CPL0) is set through KVM before the run: an XMM register, MSRs, an IOAPIC pin.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections.abc import Iterator, Sequence

import pytest

from splitvmm.monitor import layout
from splitvmm.monitor.cpuid import CpuidMask, setup_cpuid
from splitvmm.monitor.vmstate import (
    MSR_IA32_TSC,
    MSR_MTRR_DEF_TYPE,
    VcpuHost,
    VcpuState,
    VmState,
    from_dict,
    restore_vcpu,
    restore_vm,
    save_vcpu,
    save_vm,
    to_dict,
)
from splitvmm.native._kvm import ffi
from splitvmm.native.exits import INTERRUPTED, PioOut
from splitvmm.native.kvm import KVM_MP_STATE_RUNNABLE, PIT_LOAD_TIME_OFFSETS, Kvm, VcpuFd, VmFd
from splitvmm.native.mem import mapping_address
from splitvmm.record import Struct, replace

pytestmark = pytest.mark.kvm

RAM_SIZE = 1 << 20
CODE = (0x1000, 0x1100)  # where each vCPU's program starts
DATA = (0x3000, 0x3004)  # where each loop stores its counter
START_EAX = (0, 1000)
DEBUG_PORT = 0xF4
# vCPU 0 first programs the in-kernel PIC and PIT (these ports never exit), then loops:
# mov $0xff,%al; out %al,$0x21; out %al,$0xa1 (mask every PIC line); mov $0xb0,%al;
# out %al,$0x43; mov $0x34,%al; out %al,$0x42; mov $0x12,%al; out %al,$0x42 (PIT channel 2,
# mode 0, count 0x1234: its gate is low and it has no IRQ, so it never fires); xor %eax,%eax
PREAMBLE = (bytes.fromhex("b0ff e621 e6a1 b0b0 e643 b034 e642 b012 e642 6631c0"), b"")
LOOP = (CODE[0] + len(PREAMBLE[0]), CODE[1])
JMP_OFFSET = 12  # the loop's `jmp`, right after its `out`
MSR_IA32_SYSENTER_CS = 0x174
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_MC1_CTL = 0x404  # a machine-check bank's control: Linux sets every one all ones
HOST_MSRS = {
    MSR_IA32_SYSENTER_CS: 0x10,
    MSR_KERNEL_GS_BASE: 0xFFFF_8880_DEAD_0000,
    MSR_IA32_MC1_CTL: (1 << 64) - 1,
}
MTRR_DEF_TYPE = 0x806  # MTRRs enabled, default write-back (as boot64 sets it)
FIRST_VM_CPUID_MASK = CpuidMask.parse(["1.ecx:0x80000000"])  # no hypervisor bit
LEAF1_ECX_HYPERVISOR = 1 << 31
XMM0 = bytes(range(0x40, 0x50))
XCR0_X87_SSE = 0x3
# The XSAVE area's architectural layout (SDM Vol. 1, 10.5.1 and 13.4.2), not a kernel struct.
FXSAVE_XMM0 = 160
XSAVE_XSTATE_BV = 512
XFEATURE_SSE = 1 << 1
XFEATURE_X87 = 1 << 0
FXSAVE_FCW = 0  # the x87 control word; its reset value is 0x37F
FCW = 0x27F  # double precision, as a guest may set it
FXSAVE_MXCSR = 24  # the SSE control and status register; its reset value is 0x1F80
MXCSR = 0x7FC0  # round toward zero, denormals are zero, every exception masked
FPU_XMM0 = ffi.offsetof("struct kvm_fpu", "xmm")
APIC_TASKPRI = 0x80  # the LAPIC's TPR (SDM Vol. 3, table 11-1); CR8 mirrors it
TPR = 0x20
APIC_LVTT = 0x320  # LVT timer; only KVM_SET_LAPIC restores it
LVTT = 0x000100EF  # masked (bit 16), vector 0xEF: never fires
FIRST_VM_CLOCK_NS = 1000 * 10**9  # far from a fresh VM's kvmclock, which starts near 0
DR0 = 0x12345000  # a breakpoint address; DR7 leaves it disabled
NMI_MASKED = ffi.offsetof("struct kvm_vcpu_events", "nmi", "masked")  # from the header
DEBUGREGS_DB0 = ffi.offsetof("struct kvm_debugregs", "db")
IOAPIC_ONLY_PIN = 20  # above the PICs' 16 lines: only the IOAPIC sees it; its RTE is masked
MAX_DRIFT_NS = 5_000_000_000  # between a restore and the save after it, on a slow host


def loop_code(data_gpa: int) -> bytes:
    # .code16: inc %eax; add %eax,%ebx; mov %eax,data_gpa; out %eax,$0xf4; jmp .-14
    return (
        bytes.fromhex("6640 6601c3 66a3")
        + data_gpa.to_bytes(2, "little")
        + bytes([0x66, 0xE7, DEBUG_PORT, 0xEB, 0xF2])
    )


class Guest(Struct):
    vm: VmFd
    ram: mmap.mmap
    vcpus: list[VcpuFd]

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.ram.close()


def make_guest(kvm: Kvm, ram: bytes | None = None, mask: CpuidMask | None = None) -> Guest:
    """A VM as machine.py builds one: TSS, identity map, irqchip, PIT2, RAM, two vCPUs."""
    vm = kvm.create_vm()
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
    vm.set_tss_addr(layout.KVM_TSS)
    vm.create_irqchip()
    vm.create_pit2()
    mem = mmap.mmap(-1, RAM_SIZE)
    if ram is not None:
        mem[:] = ram
    # SAFETY (test only): `mem` stays mapped until Guest.close(), after the VM fd is closed.
    vm.set_user_memory_region(0, 0, RAM_SIZE, mapping_address(mem))
    vcpus = [vm.create_vcpu(i, kvm.vcpu_mmap_size()) for i in range(2)]
    for v in vcpus:
        setup_cpuid(kvm, v, len(vcpus), mask)  # what boot.prepare does before a restore too
    return Guest(vm, mem, vcpus)


@contextlib.contextmanager
def restored_guest(
    kvm: Kvm,
    ram: bytes,
    vm: VmState,
    states: Sequence[VcpuState],
    host: VcpuHost | None = None,
) -> Iterator[Guest]:
    """A fresh VM built as for a boot (CPUID set by setup_cpuid) on `ram`, with the VM's
    state put back, then each vCPU's, as restore.apply orders them (`host`: as probed on the
    new VM by default); closed after the block."""
    guest = make_guest(kvm, ram)
    try:
        host = host if host is not None else VcpuHost.probe(kvm, guest.vm)
        restore_vm(guest.vm, vm)
        for v, state in zip(guest.vcpus, states, strict=True):
            restore_vcpu(v, state, host)
        yield guest
    finally:
        guest.close()


def start_programs(guest: Guest) -> None:
    """Real mode, CS base 0, each vCPU at its program; the AP made runnable (no INIT/SIPI)."""
    for i, v in enumerate(guest.vcpus):
        program = PREAMBLE[i] + loop_code(DATA[i])
        guest.ram[CODE[i] : CODE[i] + len(program)] = program
        sregs = v.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip, regs.rax, regs.rbx, regs.rflags = CODE[i], START_EAX[i], 0, 2
        v.set_regs(regs)
        v.set_mp_state(KVM_MP_STATE_RUNNABLE)


def set_host_side_state(guest: Guest) -> None:
    """State the guest cannot make on PVM (no SSE, no interrupts at CPL0), set through KVM."""
    v0 = guest.vcpus[0]
    # XMM0 through KVM_SET_XSAVE with the SSE bit in xstate_bv: KVM_SET_FPU alone would not do
    # (KVM writes the legacy area but not xstate_bv, and KVM_GET_XSAVE and the next XRSTOR
    # then treat SSE as in its init state: zeros).
    xsave = bytearray(v0.get_xsave())
    xsave[FXSAVE_XMM0 : FXSAVE_XMM0 + 16] = XMM0
    xsave[XSAVE_XSTATE_BV] |= XFEATURE_SSE
    v0.set_xsave(bytes(xsave))
    v0.set_xcrs({0: XCR0_X87_SSE})
    events = bytearray(v0.get_vcpu_events())
    events[NMI_MASKED] = 1
    v0.set_vcpu_events(bytes(events))
    debugregs = bytearray(v0.get_debugregs())
    debugregs[DEBUGREGS_DB0 : DEBUGREGS_DB0 + 8] = DR0.to_bytes(8, "little")
    v0.set_debugregs(bytes(debugregs))
    for v in guest.vcpus:
        v.set_msrs({**HOST_MSRS, MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE})
        lapic = v.get_lapic()
        lapic[APIC_TASKPRI] = TPR
        lapic[APIC_LVTT : APIC_LVTT + 4] = LVTT.to_bytes(4, "little")
        v.set_lapic(bytes(lapic))
    guest.vm.irq_line(IOAPIC_ONLY_PIN, 1)
    guest.vm.set_clock(FIRST_VM_CLOCK_NS)


def next_out(vcpu: VcpuFd) -> int:
    """Runs to the next exit, which must be the loop's `out`; returns the value written."""
    ex = vcpu.run()
    assert isinstance(ex, PioOut) and ex.port == DEBUG_PORT, ex
    return int.from_bytes(ex.data, "little")


def complete_pending_io(vcpu: VcpuFd) -> None:
    # What the coordinator does before saving (vcpu.py _park): KVM finishes the `out` (RIP past
    # it) and returns EINTR without entering the guest.
    vcpu.set_immediate_exit(True)
    assert vcpu.run() is INTERRUPTED
    vcpu.set_immediate_exit(False)


class Saved(Struct):
    vm: VmState
    vcpus: list[VcpuState]
    ram: bytes


def save_all(guest: Guest, host: VcpuHost) -> Saved:
    return Saved(save_vm(guest.vm), [save_vcpu(v, host) for v in guest.vcpus], bytes(guest.ram))


def through_json(saved: Saved) -> Saved:
    """A snapshot as a file would carry it: JSON text, decoded by the strict codec."""
    vm = json.loads(json.dumps(to_dict(saved.vm)))
    vcpus = [json.loads(json.dumps(to_dict(s))) for s in saved.vcpus]
    return Saved(from_dict(VmState, vm), [from_dict(VcpuState, s) for s in vcpus], saved.ram)


def without_pit_load_times(pit2: bytes) -> bytes:
    out = bytearray(pit2)
    for off in PIT_LOAD_TIME_OFFSETS:
        out[off : off + 8] = bytes(8)
    return bytes(out)


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def snapshot(kvm: Kvm) -> tuple[Saved, list[list[int]]]:
    """The first VM: vCPU 0 loops five times, vCPU 1 three; I/O completed, saved, VM closed."""
    guest = make_guest(kvm, mask=FIRST_VM_CPUID_MASK)
    start_programs(guest)
    set_host_side_state(guest)
    outs = [[next_out(guest.vcpus[i]) for _ in range(n)] for i, n in enumerate((5, 3))]
    for v in guest.vcpus:
        complete_pending_io(v)
    saved = save_all(guest, VcpuHost.probe(kvm, guest.vm))
    guest.close()  # the second VM can depend on nothing but the saved data
    return through_json(saved), outs


@pytest.fixture
def restored(kvm: Kvm, snapshot: tuple[Saved, list[list[int]]]) -> Iterator[Guest]:
    """The snapshot's VM restored (restored_guest)."""
    saved, _ = snapshot
    with restored_guest(kvm, saved.ram, saved.vm, saved.vcpus) as guest:
        yield guest


def test_vmstate_first_vm_stops_after_completed_out(
    snapshot: tuple[Saved, list[list[int]]],
) -> None:
    saved, outs = snapshot

    regs = [(s.regs["rax"], s.regs["rbx"], s.regs["rip"]) for s in saved.vcpus]
    assert outs == [[1, 2, 3, 4, 5], [1001, 1002, 1003]]
    # RIP is on the `jmp` after the `out`: KVM finished the `out` in complete_pending_io.
    assert regs == [(5, 15, LOOP[0] + JMP_OFFSET), (1003, 3006, LOOP[1] + JMP_OFFSET)]
    assert saved.vcpus[0].xsave is not None and saved.vcpus[0].fpu is None


def test_vmstate_resaved_state_equals_saved_except_running_clocks(
    kvm: Kvm, snapshot: tuple[Saved, list[list[int]]], restored: Guest
) -> None:
    saved, _ = snapshot

    again = save_all(restored, VcpuHost.probe(kvm, restored.vm))

    # Three things legitimately move between the restore and this save, and only these:
    # - kvmclock (VmState.clock) runs on from the value KVM_SET_CLOCK put back, and the host's
    #   real time and TSC saved with it (clock_realtime, clock_host_tsc) are the host's now;
    # - the guest TSC (MSR_IA32_TSC) runs on from the value KVM_SET_MSRS put back;
    # - each PIT channel's count_load_time is the host's CLOCK_MONOTONIC at KVM_SET_PIT2, which
    #   reloads every channel's count "now" (kvm_pit_load_count).
    max_ticks = MAX_DRIFT_NS * (saved.vcpus[0].tsc_khz or 0) // 10**6
    pairs = zip(saved.vcpus, again.vcpus, strict=True)
    tsc_runs = [b.msrs[MSR_IA32_TSC] - a.msrs[MSR_IA32_TSC] for a, b in pairs]
    assert 0 <= again.vm.clock - saved.vm.clock < MAX_DRIFT_NS
    assert all(0 <= ticks < max_ticks for ticks in tsc_runs), tsc_runs
    assert without_pit_load_times(again.vm.pit2) == without_pit_load_times(saved.vm.pit2)
    assert again.vm.clock_realtime >= saved.vm.clock_realtime
    running = {"clock": 0, "clock_realtime": 0, "clock_host_tsc": 0, "pit2": b""}
    assert replace(again.vm, **running) == replace(saved.vm, **running)
    assert [replace(s, msrs={**s.msrs, MSR_IA32_TSC: 0}) for s in again.vcpus] == [
        replace(s, msrs={**s.msrs, MSR_IA32_TSC: 0}) for s in saved.vcpus
    ]


def test_vmstate_restored_guest_continues_counting(restored: Guest) -> None:
    outs = [[next_out(restored.vcpus[i]) for _ in range(n)] for i, n in enumerate((3, 2))]

    assert outs == [[6, 7, 8], [1004, 1005]]
    assert [v.get_regs().rbx for v in restored.vcpus] == [36, 5015]  # 1+..+8; 1001+..+1005
    assert [int.from_bytes(restored.ram[d : d + 4], "little") for d in DATA] == [8, 1005]


def test_vmstate_restored_host_side_state_survives(restored: Guest) -> None:
    v0, v1 = restored.vcpus
    leaf1 = next(e for e in v0.get_cpuid() if e.function == 1)
    lapics = [v0.get_lapic(), v1.get_lapic()]
    tprs = [lapic[APIC_TASKPRI] for lapic in lapics]
    timers = [int.from_bytes(lapic[APIC_LVTT : APIC_LVTT + 4], "little") for lapic in lapics]
    debugregs = v0.get_debugregs()

    assert leaf1.ecx & LEAF1_ECX_HYPERVISOR == 0  # the first VM's CPUID, not setup_cpuid's
    assert bytes(v0.get_fpu().xmm[0]) == XMM0  # read back through KVM_GET_FPU, not XSAVE
    assert v0.get_xcrs() == {0: XCR0_X87_SSE}
    assert v0.get_vcpu_events()[NMI_MASKED] == 1
    assert int.from_bytes(debugregs[DEBUGREGS_DB0 : DEBUGREGS_DB0 + 8], "little") == DR0
    assert v0.get_msrs([*HOST_MSRS, MSR_MTRR_DEF_TYPE]) == {
        **HOST_MSRS,
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE,
    }
    assert (tprs, timers) == ([TPR, TPR], [LVTT, LVTT])
    assert restored.vm.ioapic_irr() == 1 << IOAPIC_ONLY_PIN
    assert restored.vm.get_clock().clock >= FIRST_VM_CLOCK_NS


MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00  # Linux's arch/x86/include/uapi/asm/kvm_para.h
WALL_CLOCK_GPA = 0x8000  # struct pvclock_wall_clock: version, sec, nsec (u32 each)


def boot_wall_clock_s(ram: mmap.mmap) -> float:
    _, sec, nsec = struct.unpack_from("<III", ram, WALL_CLOCK_GPA)
    return sec + nsec / 1e9


def test_vmstate_kvmclock_guests_boot_time_survives_the_restore_order_apply_uses(
    kvm: Kvm,
) -> None:
    """KVM writes a kvmclock guest's boot time (host real time less its kvmclock) into its
    RAM when MSR_KVM_WALL_CLOCK_NEW is set: restore_vm (KVM_SET_CLOCK) first, then the
    vCPUs, as restore.apply does. The vCPUs first, the fresh VM's kvmclock (~0) made the
    boot time later by the guest's uptime, and a guest that reads it again (Linux on resume)
    jumped its wall clock forward by as much."""
    first = make_guest(kvm)
    first.vm.set_clock(FIRST_VM_CLOCK_NS)
    first.vcpus[0].set_msrs({MSR_KVM_WALL_CLOCK_NEW: WALL_CLOCK_GPA})
    booted = boot_wall_clock_s(first.ram)
    host = VcpuHost.probe(kvm, first.vm)
    vcpus, vm = [save_vcpu(v, host) for v in first.vcpus], save_vm(first.vm)
    ram = bytes(first.ram)
    first.close()

    with restored_guest(kvm, ram, vm, vcpus, host) as second:
        again = boot_wall_clock_s(second.ram)
    assert abs(again - booted) < MAX_DRIFT_NS / 1e9  # not FIRST_VM_CLOCK_NS (1000 s) later


def test_vmstate_fpu_state_restored_on_an_xsave_host_keeps_its_xmm_registers(kvm) -> None:
    """A state saved where there was no XSAVE (fpu, no xsave) and restored on a host with it:
    KVM_SET_FPU alone writes the legacy area of KVM's XSAVE buffer but leaves its header's
    xstate_bv as a fresh vCPU has it (x87 and SSE in their init state), so the XRSTOR KVM does
    before it enters the guest gave zeros for its XMM registers and a reset FCW, and a
    snapshot of the restored VM saved the zeros."""
    first = make_guest(kvm)
    v0 = first.vcpus[0]
    xsave = bytearray(v0.get_xsave())
    xsave[FXSAVE_XMM0 : FXSAVE_XMM0 + 16] = XMM0
    xsave[FXSAVE_FCW : FXSAVE_FCW + 2] = FCW.to_bytes(2, "little")
    xsave[XSAVE_XSTATE_BV] |= XFEATURE_X87 | XFEATURE_SSE
    v0.set_xsave(bytes(xsave))
    # A state of a release that saved KVM_GET_FPU where the host had no XSAVE (fpu, no xsave)
    host = VcpuHost.probe(kvm, first.vm)
    states = [
        replace(save_vcpu(v, host), fpu=v.get_fpu_bytes(), xsave=None, xcrs={}) for v in first.vcpus
    ]
    vm, ram = save_vm(first.vm), bytes(first.ram)
    first.close()
    assert states[0].xsave is None and states[0].fpu is not None
    assert states[0].fpu[FPU_XMM0 : FPU_XMM0 + 16] == XMM0

    second = make_guest(kvm, ram)
    try:
        host = VcpuHost.probe(kvm, second.vm)
        assert host.xsave_size  # this host has XSAVE
        restore_vm(second.vm, vm)
        for v, state in zip(second.vcpus, states, strict=True):
            restore_vcpu(v, state, host)
        area = second.vcpus[0].get_xsave(host.xsave_size)  # what KVM loads into the CPU
        resaved = save_vcpu(second.vcpus[0], host)  # a snapshot of the restored VM
    finally:
        second.close()
    assert area[FXSAVE_XMM0 : FXSAVE_XMM0 + 16] == XMM0
    assert int.from_bytes(area[FXSAVE_FCW : FXSAVE_FCW + 2], "little") == FCW
    assert resaved.xsave is not None
    assert resaved.xsave[FXSAVE_XMM0 : FXSAVE_XMM0 + 16] == XMM0


def test_vmstate_mxcsr_survives_a_restore_on_a_host_without_xsave(kvm: Kvm) -> None:
    """Where the host has no XSAVE (KVM_CAP_XCRS 0: an old CPU, a host booted `noxsave`),
    the legacy FPU/SSE state must not go through KVM_GET_FPU and KVM_SET_FPU: KVM carries no
    MXCSR in either (struct kvm_fpu has the field; KVM reads 0 and writes nothing), and the
    guest's rounding mode, FTZ/DAZ and exception masks would come back as the reset 0x1F80.
    KVM_GET_XSAVE and KVM_SET_XSAVE work without XSAVE too (the FXSAVE image, x87 and SSE
    in XSTATE_BV), MXCSR included."""
    first = make_guest(kvm)
    v0 = first.vcpus[0]
    xsave = bytearray(v0.get_xsave())
    xsave[FXSAVE_MXCSR : FXSAVE_MXCSR + 4] = MXCSR.to_bytes(4, "little")
    xsave[XSAVE_XSTATE_BV] |= XFEATURE_X87 | XFEATURE_SSE
    v0.set_xsave(bytes(xsave))
    # What VcpuHost.probe says without XSAVE (KVM_CAP_XCRS 0), and with no KVM_CAP_XSAVE
    no_xsave = replace(VcpuHost.probe(kvm, first.vm), xsave_size=0, has_xsave=False)
    states = [save_vcpu(v, no_xsave) for v in first.vcpus]
    vm, ram = save_vm(first.vm), bytes(first.ram)
    first.close()

    with restored_guest(kvm, ram, vm, states, no_xsave) as second:
        area = second.vcpus[0].get_xsave()  # what KVM loads into the CPU
    assert hex(int.from_bytes(area[FXSAVE_MXCSR : FXSAVE_MXCSR + 4], "little")) == hex(MXCSR)
