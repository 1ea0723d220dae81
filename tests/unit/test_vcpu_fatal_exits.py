"""What the operator is told when a vCPU stops on KVM_EXIT_INTERNAL_ERROR (other than an
emulation failure) or KVM_EXIT_FAIL_ENTRY: the exit is decoded from a fake kvm_run page (as
tests/unit/test_native_exits.py fills one) and handed to a VcpuThread whose vCPU is a fake."""

from __future__ import annotations

from types import SimpleNamespace

from splitvmm.monitor.bus import Bus
from splitvmm.monitor.exits import EXIT_VM_FAULT
from splitvmm.monitor.vcpu import VcpuThread
from splitvmm.native._kvm import lib
from splitvmm.native.exits import FailEntry
from tests.unit.test_native_exits import Page

RIP = 0x1234_5678


class FakeVcpu:
    vcpu_id = 0

    def get_regs(self) -> SimpleNamespace:
        return SimpleNamespace(rip=RIP)

    def get_sregs(self) -> SimpleNamespace:
        return SimpleNamespace(cs=SimpleNamespace(base=0), cr0=0x8000_0011)


class NoConfinement:
    def confine_vcpu_thread(self) -> None:
        pass


def thread() -> VcpuThread:
    return VcpuThread(
        FakeVcpu(),  # type: ignore[arg-type]
        Bus("pio"),
        Bus("mmio"),
        None,  # type: ignore[arg-type]
        lambda outcome: None,
        NoConfinement(),  # type: ignore[arg-type]
    )


def test_internal_error_message_gives_the_data_kvm_reported():
    """KVM_INTERNAL_ERROR_DELIVERY_EV (an exit while delivering an event: on VMX a guest whose
    stack or IDT lies in MMIO space) comes with vectoring info, exit reason, exit
    qualification and the GPA in internal.data[0..ndata): all the operator has to go on."""
    page = Page()
    try:
        page.run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
        internal = page.run.internal
        internal.suberror, internal.ndata = lib.KVM_INTERNAL_ERROR_DELIVERY_EV, 4
        internal.data[0:4] = [0x8000_0B0E, 49, 0x181, 0xFEBF_F000]
        outcome = thread()._fatal_exit(page.page.decode())
    finally:
        page.close()
    assert outcome.status == EXIT_VM_FAULT
    assert "suberror 3" in outcome.message and f"RIP {RIP:#x}" in outcome.message
    for word in ("0x80000b0e", "0x31", "0x181", "0xfebff000"):
        assert word in outcome.message, outcome.message


def test_fail_entry_message_names_the_rip():
    outcome = thread()._fatal_exit(FailEntry(0x8000_0021))
    assert (outcome.status, f"RIP {RIP:#x}" in outcome.message) == (EXIT_VM_FAULT, True), outcome
