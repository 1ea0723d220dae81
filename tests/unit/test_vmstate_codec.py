"""vmstate's strict codec and its save/restore ordering, on hand-made states and a fake vCPU.

No /dev/kvm: struct sizes and field widths come from the header through the built cffi module.
"""

from __future__ import annotations

import base64
import errno
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from splitvmm.errors import KvmError, StateError
from splitvmm.monitor import vmstate
from splitvmm.monitor.cpuid import EXT1_ECX_SVM, LEAF1_ECX_VMX, LEAF7_ECX_WAITPKG, never_offered
from splitvmm.monitor.platform import GED_POWER_BUTTON
from splitvmm.monitor.vmstate import (
    CPUID_LEAF1_ECX_PDCM,
    MSR_IA32_PERF_CAPABILITIES,
    MSR_IA32_TSC,
    MSR_IA32_TSC_ADJUST,
    MSR_IA32_TSC_DEADLINE,
    FirmwareId,
    VcpuHost,
    VcpuState,
    VmState,
    from_dict,
    msr_restore_order,
    restore_vcpu,
    save_vcpu,
    to_dict,
)
from splitvmm.native.kvm import (
    DEBUGREGS_SIZE,
    FPU_SIZE,
    IOAPIC_REDIRTBL_OFFSET,
    IRQCHIP_SIZE,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    LAPIC_SIZE,
    PIT_STATE2_SIZE,
    REGS_LAYOUT,
    SREGS_LAYOUT,
    VCPU_EVENTS_SIZE,
    XSAVE_MIN_SIZE,
    CpuidEntry,
    Layout,
)
from splitvmm.record import replace

MSR_EFER = 0xC0000080
U64_MAX = (1 << 64) - 1


def filled(layout: Layout, value: int) -> dict[str, Any]:
    """A struct's plain form with every field `value` (arrays as lists of it)."""
    out: dict[str, Any] = {}
    for name, spec in layout.items():
        if isinstance(spec, dict):
            out[name] = filled(spec, value)
        elif isinstance(spec, tuple):
            out[name] = [value] * spec[1]
        else:
            out[name] = value
    return out


def vcpu_state(**changes: Any) -> VcpuState:
    state = VcpuState(
        cpuid=(
            CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
            CpuidEntry(1, 0, 0, 1, 2, 3, 4),
        ),
        regs={**filled(REGS_LAYOUT, 0), "rip": 0xFFF0, "rflags": 2, "rax": U64_MAX},
        sregs=filled(SREGS_LAYOUT, 1),
        fpu=None,
        xsave=bytes(range(256)) * (XSAVE_MIN_SIZE // 256),
        xcrs={0: 7},
        lapic=b"\x01" * LAPIC_SIZE,
        events=b"\x02" * VCPU_EVENTS_SIZE,
        debugregs=b"\x03" * DEBUGREGS_SIZE,
        mp_state=0,
        msrs={MSR_IA32_TSC: U64_MAX, MSR_EFER: 0x500},
        tsc_khz=2_596_134,
    )
    return replace(state, **changes)


def vm_state() -> VmState:
    return VmState(
        pic_master=b"\x04" * IRQCHIP_SIZE,
        pic_slave=b"\x05" * IRQCHIP_SIZE,
        ioapic=b"\x06" * IRQCHIP_SIZE,
        pit2=b"\x07" * PIT_STATE2_SIZE,
        clock=123_456_789,
        clock_flags=0x7,  # TSC_STABLE | REALTIME | HOST_TSC
        clock_realtime=1_796_300_000_000_000_000,
        clock_host_tsc=U64_MAX,
        firmware_shadow=True,
        firmware=FirmwareId(U64_MAX, bytes(range(32))),
        ged_events=GED_POWER_BUTTON,
    )


def json_roundtrip(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def test_vmstate_vcpu_roundtrip_through_json_is_lossless() -> None:
    state = vcpu_state()

    decoded = from_dict(VcpuState, json_roundtrip(to_dict(state)))

    assert decoded == state


def test_vmstate_vcpu_fpu_only_roundtrip_is_lossless() -> None:
    state = vcpu_state(xsave=None, xcrs={}, fpu=b"\x09" * FPU_SIZE, tsc_khz=None)

    decoded = from_dict(VcpuState, json_roundtrip(to_dict(state)))

    assert decoded == state


def test_vmstate_vm_roundtrip_through_json_is_lossless() -> None:
    state = vm_state()

    decoded = from_dict(VmState, json_roundtrip(to_dict(state)))

    assert decoded == state


def test_vmstate_to_dict_names_registers_and_msrs_readably() -> None:
    data = to_dict(vcpu_state())

    assert (data["regs"]["rip"], data["sregs"]["cs"]["selector"]) == (0xFFF0, 1)
    assert data["msrs"] == {"0x10": U64_MAX, "0xc0000080": 0x500}
    assert data["cpuid"][1] == {
        "function": 1, "index": 0, "flags": 0, "eax": 1, "ebx": 2, "ecx": 3, "edx": 4
    }  # fmt: skip


def _set(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of the encoded dict: data[k0][k1]...[kn] = value."""

    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.pop(key)


VCPU_BAD = [
    ("unknown_key", _set("bogus", value=1), "VcpuState: unknown key 'bogus'"),
    ("missing_key", _drop("lapic"), "VcpuState: missing key 'lapic'"),
    ("lapic_short", _set("lapic", value="AAAA"), "VcpuState: lapic: expected 1024 bytes, got 3"),
    ("lapic_int", _set("lapic", value=5), "VcpuState: lapic: expected base64 text, got an int"),
    ("lapic_not_b64", _set("lapic", value="!!!!"), "VcpuState: lapic: not valid base64"),
    (
        "events_huge",
        _set("events", value="A" * 100_000),
        "VcpuState: events: expected 64 bytes, go",
    ),
    ("fpu_size", _set("fpu", value="AAAA" * 139), "VcpuState: fpu: expected 416 bytes, got 417"),
    ("xsave_small", _set("xsave", value="AAAA"), "VcpuState: xsave: expected 4096..65536 bytes"),
    ("xsave_odd", _set("xsave", value="A" * 5464), "VcpuState: xsave: expected 4096..65536 byt"),
    ("rax_negative", _set("regs", "rax", value=-1), "VcpuState: regs.rax: -1 is outside 0..2**64"),
    ("rax_too_big", _set("regs", "rax", value=1 << 64), "VcpuState: regs.rax: 184467440737095516"),
    ("rax_bool", _set("regs", "rax", value=True), "VcpuState: regs.rax: expected an integer, got"),
    ("rax_str", _set("regs", "rax", value="0"), "VcpuState: regs.rax: expected an integer, got"),
    ("regs_extra", _set("regs", "rsp2", value=0), "VcpuState: regs: unknown key 'rsp2'"),
    ("selector", _set("sregs", "cs", "selector", value=1 << 16), "VcpuState: sregs.cs.selector:"),
    ("segment_list", _set("sregs", "cs", value=[1]), "VcpuState: sregs.cs: expected an object"),
    ("bitmap_short", _set("sregs", "interrupt_bitmap", value=[0]), "VcpuState: sregs.interrupt"),
    ("bitmap_neg", _set("sregs", "interrupt_bitmap", 3, value=-2), "VcpuState: sregs.interrupt_b"),
    ("msr_decimal", _set("msrs", "16", value=1), "VcpuState: msrs: key '16' is not a lowercase"),
    ("msr_int_key", _set("msrs", 16, value=1), "VcpuState: msrs: key 16 is not a lowercase 0x"),
    ("msr_wide", _set("msrs", "0x100000000", value=1), "VcpuState: msrs: key 0x100000000: 42949"),
    ("msr_upper", _set("msrs", "0xC0000080", value=1), "VcpuState: msrs: key '0xC0000080' is not"),
    ("msr_zeros", _set("msrs", "0x010", value=1), "VcpuState: msrs: key '0x010' is not written"),
    ("msr_value", _set("msrs", "0x10", value=1 << 64), "VcpuState: msrs[0x10]: 18446744073709551"),
    ("msrs_list", _set("msrs", value=[1]), "VcpuState: msrs: expected an object, got an array"),
    ("xcr_float", _set("xcrs", "0x0", value=7.0), "VcpuState: xcrs[0x0]: expected an integer"),
    ("cpuid_str", _set("cpuid", 1, "eax", value="1"), "VcpuState: cpuid[1].eax: expected an int"),
    ("cpuid_wide", _set("cpuid", 1, "eax", value=1 << 32), "VcpuState: cpuid[1].eax: 4294967296"),
    ("cpuid_extra", _set("cpuid", 0, "pad", value=0), "VcpuState: cpuid[0]: unknown key 'pad'"),
    ("cpuid_many", _set("cpuid", value=[{}] * 257), "VcpuState: cpuid: expected at most 256 item"),
    ("mp_negative", _set("mp_state", value=-1), "VcpuState: mp_state: -1 is outside 0..2**32-1"),
    ("tsc_khz_str", _set("tsc_khz", value="fast"), "VcpuState: tsc_khz: expected an integer"),
    ("no_fpu_state", _set("xsave", value=None), "VcpuState: exactly one of fpu and xsave"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [c[1:] for c in VCPU_BAD], ids=[c[0] for c in VCPU_BAD]
)
def test_vmstate_vcpu_from_dict_rejects_bad_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = json_roundtrip(to_dict(vcpu_state()))
    mutate(data)

    with pytest.raises(StateError, match=f"^{re.escape(message)}"):
        from_dict(VcpuState, data)


def test_vmstate_vcpu_from_dict_rejects_both_fpu_and_xsave() -> None:
    data = to_dict(vcpu_state(fpu=b"\x09" * FPU_SIZE))

    with pytest.raises(StateError, match="^VcpuState: exactly one of fpu and xsave"):
        from_dict(VcpuState, data)


VM_BAD = [
    ("pit_size", _set("pit2", value="AAAA"), "VmState: pit2: expected 112 bytes, got 3"),
    ("ioapic_none", _set("ioapic", value=None), "VmState: ioapic: expected base64 text, got null"),
    ("clock_negative", _set("clock", value=-5), "VmState: clock: -5 is outside 0..2**64-1"),
    ("unknown_chip", _set("pic_third", value="AAAA"), "VmState: unknown key 'pic_third'"),
    ("missing_clock", _drop("clock"), "VmState: missing key 'clock'"),
    # a GED event no release defines: its bit would reach the guest's _EVT as is
    ("unknown_ged_event", _set("ged_events", value=0x5), "VmState: ged_events 0x5 holds bits"),
    ("ged_events_over_u32", _set("ged_events", value=1 << 32), "VmState: ged_events: 4294967296"),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in VM_BAD], ids=[c[0] for c in VM_BAD])
def test_vmstate_vm_from_dict_rejects_bad_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = json_roundtrip(to_dict(vm_state()))
    mutate(data)

    with pytest.raises(StateError, match=f"^{re.escape(message)}"):
        from_dict(VmState, data)


def test_vmstate_from_dict_rejects_non_object() -> None:
    with pytest.raises(StateError, match="^VmState: expected an object, got an array"):
        from_dict(VmState, [1, 2])


def test_vmstate_from_dict_refuses_other_classes() -> None:
    with pytest.raises(TypeError):
        from_dict(CpuidEntry, {})  # type: ignore[type-var]


def test_vmstate_from_dict_refuses_newer_version() -> None:
    with pytest.raises(StateError, match="^VcpuState: version 7 is newer than this splitvmm"):
        from_dict(VcpuState, to_dict(vcpu_state()), version=7)


def test_vmstate_vm_state_v1_reads_with_no_clock_data_past_the_clock() -> None:
    """v1 kept kvmclock's value alone; v2 keeps the rest of KVM_GET_CLOCK's answer."""
    v1 = {k: v for k, v in to_dict(vm_state()).items() if not k.startswith("clock_")}

    state = from_dict(VmState, v1, version=1)

    assert (state.clock, state.clock_flags, state.clock_realtime) == (123_456_789, 0, 0)


def test_vmstate_vm_state_v2_says_a_firmwares_shadow_is_not_in_its_ram() -> None:
    """Before v3 the firmware's tail below 1 MiB was a read-only mapping of the image: a
    restore copies it into RAM (restore.apply)."""
    v2 = {k: v for k, v in to_dict(vm_state()).items() if k != "firmware_shadow"}

    state = from_dict(VmState, v2, version=2)

    assert state.firmware_shadow is False and state.clock_flags == 0x7


GOLDEN_V4 = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "vmstate" / "v4.json"


def test_vmstate_vm_state_v4_golden_saved_by_the_release_before_reads_whole() -> None:
    """The vm chunk as 38da707 saved it (a VM with its irqchip and PIT, named firmware): read
    now, it keeps every field and has no unread GED event."""
    golden = json.loads(GOLDEN_V4.read_text())

    state = from_dict(VmState, golden["fields"], version=golden["version"])

    assert golden["version"] == 4 and state.ged_events == 0
    assert {k: v for k, v in to_dict(state).items() if k != "ged_events"} == golden["fields"]


def test_vmstate_vm_state_v4_has_no_unread_ged_event() -> None:
    """Before v5 there was no GED: a restored guest finds its event register empty."""
    v4 = {k: v for k, v in to_dict(vm_state()).items() if k != "ged_events"}

    state = from_dict(VmState, v4, version=4)

    assert state.ged_events == 0 and state.firmware == vm_state().firmware


def test_vmstate_vm_state_v3_names_no_firmware() -> None:
    """Before v4 a snapshot did not say which firmware image it ran: a restore takes any."""
    v3 = {k: v for k, v in to_dict(vm_state()).items() if k != "firmware"}

    state = from_dict(VmState, v3, version=3)

    assert state.firmware is None and state.firmware_shadow is True


@pytest.mark.parametrize(
    ("firmware", "named"),
    [
        ({"size": 65536, "blake3": "AAAA"}, "firmware.blake3"),
        ({"size": -1, "blake3": base64.b64encode(bytes(32)).decode()}, "firmware.size"),
        ({"size": 65536}, "firmware"),
        ("bios.bin", "firmware"),
    ],
)
def test_vmstate_vm_state_hostile_firmware_names_the_field(firmware: object, named: str) -> None:
    data = {**to_dict(vm_state()), "firmware": firmware}

    with pytest.raises(StateError, match=re.escape(named)):
        from_dict(VmState, data, version=VmState.VERSION)


def test_vmstate_from_dict_of_current_version_needs_no_upgrade() -> None:
    state = vcpu_state()

    assert from_dict(VcpuState, to_dict(state), version=VcpuState.VERSION) == state


# -- ordering, against a fake vCPU -----------------------------------------------------------


class FakeVcpu:
    """Records each KVM call made on it, in order, with its arguments; answers from `answers`
    (a value, or a function of the call's arguments)."""

    def __init__(self, **answers: Any) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.answers = answers

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            answer = self.answers.get(name)
            return answer(*args) if callable(answer) else answer

        return call

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


SAVE_ANSWERS: dict[str, Any] = {"get_lapic": bytearray(LAPIC_SIZE), "get_cpuid": []}
HOST = VcpuHost(
    msr_indices=(MSR_IA32_TSC, 0x8B, MSR_EFER), xsave_size=XSAVE_MIN_SIZE, has_xsave=True
)


def test_vmstate_restore_vcpu_sets_state_in_documented_order() -> None:
    vcpu = FakeVcpu(tsc_khz=2_596_134)

    restore_vcpu(vcpu, vcpu_state(), HOST)  # type: ignore[arg-type]

    assert vcpu.names == [
        "set_cpuid", "tsc_khz", "set_mp_state", "set_regs_dict", "set_sregs_dict", "set_xsave",
        "set_xcrs", "set_debugregs", "set_lapic", "set_msrs", "set_vcpu_events",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("leaf", "bit"), [(1, LEAF1_ECX_VMX), (0x80000001, EXT1_ECX_SVM)], ids=["vmx", "svm"]
)
def test_vmstate_restore_vcpu_gives_kvm_no_nested_virtualization_from_a_snapshot(
    leaf: int, bit: int
) -> None:
    """Every boot hides VMX and SVM (a snapshot holds no nested state); a snapshot's table is
    untrusted and must not switch them on through KVM_SET_CPUID2 (cpuid.never_offered)."""
    table = (
        CpuidEntry(0, 0, 0, 0x80000001, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(1, 0, 0, 0, 0, LEAF1_ECX_VMX, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, EXT1_ECX_SVM, 0),
    )
    vcpu = FakeVcpu(tsc_khz=2_596_134)

    restore_vcpu(vcpu, vcpu_state(cpuid=table), HOST)  # type: ignore[arg-type]

    (given,) = [args[0] for name, args in vcpu.calls if name == "set_cpuid"]
    assert [e.function for e in given] == [0, 1, 0x80000001]
    assert not [e for e in given if e.function == leaf and e.ecx & bit]


def test_vmstate_restore_vcpu_scales_tsc_beyond_tolerance() -> None:
    vcpu = FakeVcpu(tsc_khz=2_000_000)

    restore_vcpu(vcpu, vcpu_state(), HOST)  # type: ignore[arg-type]

    assert ("set_tsc_khz", (2_596_134,)) in vcpu.calls


def test_vmstate_restore_vcpu_pads_xsave_to_host_size() -> None:
    vcpu = FakeVcpu(tsc_khz=2_596_134)
    state = vcpu_state()
    host = replace(HOST, xsave_size=2 * XSAVE_MIN_SIZE)

    restore_vcpu(vcpu, state, host)  # type: ignore[arg-type]

    (data,) = next(args for name, args in vcpu.calls if name == "set_xsave")
    assert data == state.xsave + bytes(XSAVE_MIN_SIZE)  # type: ignore[operator]


def test_vmstate_restore_vcpu_refuses_xsave_larger_than_host_before_any_ioctl() -> None:
    vcpu = FakeVcpu()
    state = vcpu_state(xsave=bytes(2 * XSAVE_MIN_SIZE))

    with pytest.raises(StateError, match="xsave: 8192 bytes > this host's 4096"):
        restore_vcpu(vcpu, state, HOST)  # type: ignore[arg-type]
    assert vcpu.calls == []


NO_XSAVE = replace(HOST, has_xsave=False)  # what VcpuHost.probe says where KVM_CAP_XCRS is 0


def test_vmstate_save_vcpu_without_xsave_reads_the_xsave_area_not_kvm_fpu() -> None:
    """KVM_GET_FPU carries no MXCSR (KVM leaves its field 0, and KVM_SET_FPU ignores it);
    KVM_GET_XSAVE gives the FXSAVE image, MXCSR included, on a host without XSAVE too."""
    answers = {**SAVE_ANSWERS, "get_xsave": bytes(XSAVE_MIN_SIZE)}
    vcpu = FakeVcpu(get_msrs=lambda indices: {i: 0 for i in indices}, **answers)

    state = save_vcpu(vcpu, NO_XSAVE)  # type: ignore[arg-type]

    assert (len(state.xsave or b""), state.fpu, state.xcrs) == (XSAVE_MIN_SIZE, None, {})
    assert [n for n in vcpu.names if "xcrs" in n or "fpu" in n] == []  # EINVAL there


def test_vmstate_restore_vcpu_without_xsave_sets_the_xsave_area_and_no_xcrs() -> None:
    """KVM takes x87/SSE state through KVM_SET_XSAVE without XSAVE, and refuses KVM_SET_XCRS."""
    vcpu = FakeVcpu(tsc_khz=2_596_134)

    restore_vcpu(vcpu, vcpu_state(xcrs={}), NO_XSAVE)  # type: ignore[arg-type]

    assert [n for n in vcpu.names if "xsave" in n or "xcrs" in n] == ["set_xsave"]


def refuse_without_xsave(xcrs: dict[int, int]) -> None:
    raise KvmError(errno.EINVAL, "KVM_SET_XCRS")  # any KVM on a host without XSAVE


def test_vmstate_restore_vcpu_gives_no_xcrs_to_a_kvm_with_xsave2_but_no_xsave() -> None:
    """Since Linux 5.17 KVM_CAP_XSAVE2 says 4 KiB on a host without XSAVE too, where
    KVM_GET_XCRS gives none and KVM_SET_XCRS fails, even with none: every restore failed."""
    vcpu = FakeVcpu(tsc_khz=2_596_134, set_xcrs=refuse_without_xsave)

    restore_vcpu(vcpu, vcpu_state(xcrs={}), HOST)  # type: ignore[arg-type]

    assert "set_vcpu_events" in vcpu.names


def test_vmstate_restore_vcpu_without_xsave_refuses_a_state_with_xcrs() -> None:
    """XCRs are saved only where the host had XSAVE: its guest ran with XSAVE enabled."""
    vcpu = FakeVcpu()

    with pytest.raises(StateError, match="xsave: this host's KVM has no XSAVE"):
        restore_vcpu(vcpu, vcpu_state(), NO_XSAVE)  # type: ignore[arg-type]
    assert vcpu.calls == []


class NoXsaveKvm:
    """What KVM answers on a host without XSAVE (an old CPU, a host booted `noxsave`), on any
    Linux: KVM_CAP_XSAVE is 1 on every host, KVM_CAP_XSAVE2 says 4 KiB or more; only
    KVM_CAP_XCRS is 0 (kvm_vm_ioctl_check_extension: boot_cpu_has(X86_FEATURE_XSAVE))."""

    def xsave_size(self) -> int:
        return XSAVE_MIN_SIZE

    def msr_index_list(self) -> list[int]:
        return [MSR_IA32_TSC, 0x8B, MSR_EFER]

    def check_extension(self, cap: int) -> int:
        return 0  # KVM_CAP_XCRS, the one cap VcpuHost.probe asks


def test_vmstate_probed_host_without_xsave_refuses_a_state_with_xcrs_by_name() -> None:
    """The refusal above must be reached on a real host without XSAVE: there VcpuHost.probe
    gets 4 KiB for xsave_size, and a state saved with XSAVE went on to KVM, which refused one
    of its ioctls with a bare EINVAL (KVM_SET_SREGS for CR4.OSXSAVE, KVM_SET_XSAVE for an
    AVX component, or KVM_SET_XCRS)."""
    host = VcpuHost.probe(NoXsaveKvm())  # type: ignore[arg-type]
    vcpu = FakeVcpu(tsc_khz=2_596_134, set_xcrs=refuse_without_xsave)

    with pytest.raises(StateError, match="xsave: this host's KVM has no XSAVE"):
        restore_vcpu(vcpu, vcpu_state(), host)  # type: ignore[arg-type]
    assert vcpu.calls == []


def test_vmstate_msr_restore_order_puts_tsc_first_and_deadline_last() -> None:
    msrs = {MSR_IA32_TSC_DEADLINE: 5, MSR_EFER: 1, MSR_IA32_TSC: 2, 0x8B: 3, MSR_IA32_TSC_ADJUST: 4}

    order = list(msr_restore_order(msrs))

    assert order == [MSR_IA32_TSC_ADJUST, MSR_IA32_TSC, 0x8B, MSR_EFER, MSR_IA32_TSC_DEADLINE]


def test_vmstate_save_vcpu_reads_mp_state_first_and_events_last() -> None:
    vcpu = FakeVcpu(get_msrs=lambda indices: {i: 0 for i in indices}, **SAVE_ANSWERS)

    save_vcpu(vcpu, HOST)  # type: ignore[arg-type]

    assert (vcpu.names[0], vcpu.names[-1]) == ("get_mp_state", "get_vcpu_events")


def read_until_ucode_rev(indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS stops at the first MSR it cannot read (here 0x8b) and returns the ones
    before it."""
    readable = indices[: indices.index(0x8B)] if 0x8B in indices else indices
    return {i: i for i in readable}


def leaf1(ecx: int) -> list[CpuidEntry]:
    return [CpuidEntry(0, 0, 0, 0xD, 0, 0, 0), CpuidEntry(1, 0, 0, 0, 0, ecx, 0)]


@pytest.mark.parametrize("pdcm", [False, True], ids=["no-pdcm", "pdcm"])
def test_vmstate_save_vcpu_keeps_perf_capabilities_only_with_pdcm(pdcm: bool) -> None:
    """KVM (before Linux 6.12, on Intel) reads IA32_PERF_CAPABILITIES back nonzero to the host
    whatever CPUID says, and refuses it back without PDCM and a PMU: a snapshot holding it
    could never be restored (QEMU saves it only with PDCM; Firecracker never)."""
    host = replace(HOST, msr_indices=(*HOST.msr_indices, MSR_IA32_PERF_CAPABILITIES))
    answers = {**SAVE_ANSWERS, "get_cpuid": leaf1(CPUID_LEAF1_ECX_PDCM if pdcm else 0)}
    vcpu = FakeVcpu(get_msrs=lambda indices: {i: 0x2000 for i in indices}, **answers)

    state = save_vcpu(vcpu, host)  # type: ignore[arg-type]

    assert (MSR_IA32_PERF_CAPABILITIES in state.msrs) is pdcm


@pytest.mark.parametrize("pdcm", [False, True], ids=["no-pdcm", "pdcm"])
def test_vmstate_restore_vcpu_leaves_out_perf_capabilities_without_pdcm(pdcm: bool) -> None:
    """A snapshot of an earlier release holds it without PDCM: it restores all the same."""
    host = replace(HOST, msr_indices=(*HOST.msr_indices, MSR_IA32_PERF_CAPABILITIES))
    cpuid = tuple(leaf1(CPUID_LEAF1_ECX_PDCM if pdcm else 0))
    state = vcpu_state(cpuid=cpuid, msrs={MSR_IA32_TSC: 1, MSR_IA32_PERF_CAPABILITIES: 0x2000})
    vcpu = FakeVcpu(tsc_khz=2_596_134)

    restore_vcpu(vcpu, state, host)  # type: ignore[arg-type]

    (msrs,) = [args[0] for name, args in vcpu.calls if name == "set_msrs"]
    assert (MSR_IA32_PERF_CAPABILITIES in msrs) is pdcm


def test_vmstate_restore_vcpu_refuses_a_nonzero_msr_this_kvm_does_not_list() -> None:
    """KVM takes some MSRs it does not list and refuses others, blaming the batch: one this
    host's KVM does not list is refused by name, before any ioctl, unless it is 0 (the reset
    value: a snapshot from a newer kernel listing one more MSR), which is left out."""
    u_cet = 0x6A0  # IA32_U_CET: listed by kernels with CET virtualization (6.x) only
    vcpu = FakeVcpu(tsc_khz=2_596_134)
    zero = vcpu_state(msrs={MSR_IA32_TSC: 1, u_cet: 0})

    restore_vcpu(vcpu, zero, HOST)  # type: ignore[arg-type]
    (msrs,) = [args[0] for name, args in vcpu.calls if name == "set_msrs"]
    assert msrs == {MSR_IA32_TSC: 1}

    vcpu = FakeVcpu(tsc_khz=2_596_134)
    with pytest.raises(StateError, match="msrs: MSR 0x6a0 = 0x1 is not one this host's KVM"):
        restore_vcpu(vcpu, vcpu_state(msrs={u_cet: 1}), HOST)  # type: ignore[arg-type]
    assert vcpu.calls == []


def test_vmstate_probe_lists_the_machine_check_banks() -> None:
    """KVM emulates 32 banks per vCPU but does not list their MSRs: lost in a restore, an
    MCi_CTL Linux set all ones at boot went back to 0, and KVM then drops machine checks."""

    class FakeKvm:
        def xsave_size(self) -> int:
            return XSAVE_MIN_SIZE

        def msr_index_list(self) -> list[int]:
            return [MSR_IA32_TSC]

        def check_extension(self, cap: int) -> int:
            return 1

    host = VcpuHost.probe(FakeKvm())  # type: ignore[arg-type]

    assert set(range(0x400, 0x480)) <= set(host.msr_indices)


def test_vmstate_vcpu_from_dict_refuses_a_cpuid_without_leaf_0_and_1() -> None:
    """KVM takes an empty CPUID table; the restore then failed on an MSR, blaming it."""
    data = to_dict(vcpu_state())
    data["cpuid"] = data["cpuid"][:1]

    with pytest.raises(StateError, match="cpuid: a table without leaf 0 and leaf 1"):
        from_dict(VcpuState, data)


def test_vmstate_save_vcpu_skips_msrs_kvm_cannot_read() -> None:
    vcpu = FakeVcpu(get_msrs=read_until_ucode_rev, **SAVE_ANSWERS)

    state = save_vcpu(vcpu, HOST)  # type: ignore[arg-type]

    assert state.msrs == {MSR_IA32_TSC: MSR_IA32_TSC, MSR_EFER: MSR_EFER}


# -- a pin waiting for an EOI no saved LAPIC will send (vmstate.release_orphaned_eois) -----
EOI_VECTOR, EOI_PIN = 0x51, 17
LEVEL, REMOTE_IRR, MASKED = 1 << 15, 1 << 14, 1 << 16


def ioapic_with(rte: int) -> bytes:
    chip = bytearray(vm_state().ioapic)
    at = IOAPIC_REDIRTBL_OFFSET + 8 * EOI_PIN
    chip[at : at + 8] = rte.to_bytes(8, "little")
    return bytes(chip)


def rte_of(state: vmstate.VmState) -> int:
    at = IOAPIC_REDIRTBL_OFFSET + 8 * EOI_PIN
    return int.from_bytes(state.ioapic[at : at + 8], "little")


def lapic_holding(base: int | None) -> bytes:
    regs = bytearray(LAPIC_SIZE)
    if base is not None:
        at = base + (EOI_VECTOR // 32) * 0x10
        regs[at : at + 4] = (1 << EOI_VECTOR % 32).to_bytes(4, "little")
    return bytes(regs)


@pytest.mark.parametrize(
    ("rte", "held_in", "released"),
    [
        (EOI_VECTOR | LEVEL | REMOTE_IRR, None, True),
        (EOI_VECTOR | LEVEL | REMOTE_IRR | MASKED, None, True),  # stuck once unmasked too
        (EOI_VECTOR | LEVEL | REMOTE_IRR, vmstate.APIC_IRR, False),  # the guest takes it, EOIs
        (EOI_VECTOR | LEVEL | REMOTE_IRR, vmstate.APIC_ISR, False),  # in its handler
        (EOI_VECTOR | REMOTE_IRR, None, False),  # edge: no EOI awaited
        (EOI_VECTOR | LEVEL | REMOTE_IRR | 0x400, None, False),  # NMI delivery: not ours to judge
    ],
    ids=["orphaned", "orphaned-masked", "in-irr", "in-isr", "edge", "nmi"],
)
def test_orphaned_eoi_is_released_only_where_no_lapic_will_send_it(rte, held_in, released):
    vm = replace(vm_state(), ioapic=ioapic_with(rte))
    vcpus = [vcpu_state(lapic=lapic_holding(None)), vcpu_state(lapic=lapic_holding(held_in))]

    out = vmstate.release_orphaned_eois(vm, vcpus)

    assert rte_of(out) == (rte & ~REMOTE_IRR if released else rte)
    assert out.ioapic[:IOAPIC_REDIRTBL_OFFSET] == vm.ioapic[:IOAPIC_REDIRTBL_OFFSET]  # irr kept


def kvm_finds(entries: list[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    """The entry KVM's CPUID lookup returns (cpuid_entry2_find, Linux 5.17+ and earlier)."""
    for e in entries:
        if e.function == function and (
            not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == index
        ):
            return e
    return None


@pytest.mark.parametrize(
    ("function", "bit"),
    [(1, LEAF1_ECX_VMX), (7, LEAF7_ECX_WAITPKG), (0x80000001, EXT1_ECX_SVM)],
    ids=["vmx", "waitpkg", "svm"],
)
def test_vmstate_restore_vcpu_hides_a_bit_in_an_entry_kvm_takes_for_any_index(function, bit):
    table = (
        CpuidEntry(0, 0, 0, 0x80000001, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(function, 1, 0, 0, 0, bit, 0),  # index 1, index not significant: any index
        CpuidEntry(1, 0, 0, 0, 0, 0, 0),
        CpuidEntry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0, 0),
    )
    vcpu = FakeVcpu(tsc_khz=2_596_134)

    restore_vcpu(vcpu, vcpu_state(cpuid=table), HOST)  # type: ignore[arg-type]

    (given,) = [args[0] for name, args in vcpu.calls if name == "set_cpuid"]
    used = kvm_finds(given, function, 0)  # what the guest's CPUID (function, 0) answers
    assert used is not None and not used.ecx & bit


def test_never_offered_keeps_a_subleaf_with_a_significant_index():
    """Leaf 7 subleaf 1 (index significant) is not subleaf 0: its ECX bit 5 is no WAITPKG."""
    sub1 = CpuidEntry(7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, LEAF7_ECX_WAITPKG, 0)
    assert never_offered([sub1]) == [sub1]
