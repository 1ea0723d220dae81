"""Machine.close(): the VM's fds close on a thread of their own while the devices end, and
every device is synced, then killed, then waited for, each step for all of them at once.
And _OnThread, which runs a step of the build (the PIT's re-injection going off) aside."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from splitvmm.config import parse_config
from splitvmm.errors import KvmError
from splitvmm.monitor.machine import Machine, _OnThread

WAIT_S = 5.0  # a step that is not concurrent waits this long, then fails


class Steps:
    def __init__(self, devices: int) -> None:
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.all_syncing = threading.Barrier(devices, timeout=WAIT_S)
        self.vm_closing = threading.Event()
        self.devices_closed = threading.Event()

    def note(self, step: str, who: str) -> None:
        with self.lock:
            self.log.append((step, who))

    def kinds(self) -> list[str]:
        return [step for step, _ in self.log]


class FakeSlot:
    ready = True

    def __init__(self, name: str, steps: Steps, last: bool) -> None:
        self.name, self.steps, self.last = name, steps, last

    def sync(self) -> bool:
        self.steps.note("sync", self.name)
        self.steps.all_syncing.wait()  # every device's sync is in flight at once
        return True

    def kill(self) -> None:
        self.steps.note("kill", self.name)

    def close(self) -> None:
        assert self.steps.vm_closing.wait(WAIT_S), "the VM was not closing while devices end"
        self.steps.note("close", self.name)
        if self.last:
            self.steps.devices_closed.set()


class FakeFd:
    def __init__(self, name: str, steps: Steps, vm: bool = False) -> None:
        self.name, self.steps, self.vm, self.thread = name, steps, vm, ""

    def close(self) -> None:
        self.thread = threading.current_thread().name
        self.steps.note("fd", self.name)
        if self.vm:  # the kernel's teardown of a VM waits a while: the devices end meanwhile
            self.steps.vm_closing.set()
            self.steps.devices_closed.wait(WAIT_S)


class FakeVcpu:
    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


def machine(tmp_path: Path, steps: Steps, devices: int, vcpu_alive: bool = False) -> Machine:
    cfg = parse_config({"boot": {"kernel": "bzImage"}}, tmp_path, check_files=False)
    m = Machine(cfg, runtime_root=tmp_path)
    m.slots = [FakeSlot(f"dev{i}", steps, i == devices - 1) for i in range(devices)]  # type: ignore[list-item]
    m._vm_fds = [FakeFd("vm", steps, vm=True), FakeFd("vcpu0", steps), FakeFd("vcpu1", steps)]
    m._closables = [FakeFd("launcher", steps), FakeFd("ram", steps)]
    m.vcpus = [FakeVcpu(vcpu_alive)]  # type: ignore[list-item]
    return m


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_devices_end_together_while_the_vm_closes_on_its_own_thread(tmp_path, devices):
    steps = Steps(devices)
    m = machine(tmp_path, steps, devices)
    vm_fds = list(m._vm_fds)

    m.close()

    kinds = steps.kinds()
    syncs = [i for i, k in enumerate(kinds) if k == "sync"]
    kills = [i for i, k in enumerate(kinds) if k == "kill"]
    closes = [i for i, k in enumerate(kinds) if k == "close"]
    assert len(syncs) == len(kills) == len(closes) == devices
    assert max(syncs) < min(kills) and max(kills) < min(closes)
    # The vCPUs' fds before the VM's, each once, all on the closing thread.
    assert [who for step, who in steps.log if step == "fd" and who.startswith("v")] == [
        "vcpu1",
        "vcpu0",
        "vm",
    ]
    assert {fd.thread for fd in vm_fds} == {"vm-close"}
    # The machine's other fds after the devices, the last made first, on the caller's thread.
    fds = [who for step, who in steps.log if step == "fd" and not who.startswith("v")]
    assert fds == ["ram", "launcher"]
    assert kinds.index("fd", max(closes)) > max(closes)


def test_with_a_vcpu_thread_still_running_the_vm_closes_last_on_the_callers_thread(tmp_path):
    steps = Steps(1)
    steps.vm_closing.set()  # nothing overlaps here: the devices end first
    steps.devices_closed.set()
    m = machine(tmp_path, steps, 1, vcpu_alive=True)
    vm_fds = list(m._vm_fds)

    m.close()

    fds = [who for step, who in steps.log if step == "fd"]
    assert fds == ["ram", "launcher", "vcpu1", "vcpu0", "vm"]
    assert {fd.thread for fd in vm_fds} == {threading.current_thread().name}


def test_on_thread_result_raises_what_the_call_raised_once():
    def call() -> None:
        raise KvmError(6, "KVM_REINJECT_CONTROL")

    failed = _OnThread("t", call)

    with pytest.raises(KvmError, match="KVM_REINJECT_CONTROL"):
        failed.result()
    failed.result()  # handed over: a second wait has nothing to raise


def test_on_thread_runs_the_call_aside_and_wait_raises_nothing():
    ran_on: list[str] = []
    release = threading.Event()

    def call() -> None:
        release.wait(WAIT_S)
        ran_on.append(threading.current_thread().name)
        raise OSError("ignored by wait()")

    aside = _OnThread("pit-mode", call)
    assert ran_on == []  # started, not waited for
    release.set()
    aside.wait()
    assert ran_on == ["pit-mode"]
