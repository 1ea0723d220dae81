"""Machine.close(): every device is synced, then killed, then waited for, each step for all
of them at once, and the VM's fds close on a thread of their own once the syncs are done.
Threads, so not among the unit tests; no KVM: the slots and fds are fakes."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from splitvmm.config import parse_config
from splitvmm.errors import KvmError, SplitvmmError
from splitvmm.monitor import machine as machine_module
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.onthread import OnThread

WAIT_S = 5.0  # a step that is not concurrent waits this long, then fails


class Steps:
    def __init__(self, devices: int, overlap: bool = True) -> None:
        """`overlap`: the VM closes on its thread while the devices end (each side waits
        for the other to be under way), or the devices end first, alone."""
        self.overlap = overlap
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

    def give_up_host_io(self) -> None:
        self.steps.note("give up host I/O", self.name)

    def sync(self, drain: bool = False) -> bool:
        self.steps.note("sync", self.name)
        self.steps.all_syncing.wait()  # every device's sync is in flight at once
        # A device's event during its sync may still use the VM (an MSI-X route).
        assert not self.steps.vm_closing.is_set(), "the VM closed during a sync"
        return True

    def kill(self) -> None:
        self.steps.note("kill", self.name)

    def close(self) -> None:
        if self.steps.overlap:
            assert self.steps.vm_closing.wait(WAIT_S), "the VM was not closing as devices end"
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
            if self.steps.overlap:
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
    gave_up = [i for i, k in enumerate(kinds) if k == "give up host I/O"]
    assert len(syncs) == len(kills) == len(closes) == len(gave_up) == devices
    assert max(syncs) < min(kills) and max(kills) < min(closes)
    # A device that says it is in host I/O holds no sync past its deadline, stop() or not.
    assert max(gave_up) < min(syncs)
    # The vCPUs' fds before the VM's, each once, all on the closing thread.
    assert [who for step, who in steps.log if step == "fd" and who.startswith("v")] == [
        "vcpu1",
        "vcpu0",
        "vm",
    ]
    assert {fd.thread for fd in vm_fds} == {"vm-close"}
    # The machine's other fds after the devices, the last made first, on the caller's thread.
    others = [(i, who) for i, (step, who) in enumerate(steps.log) if step == "fd" and who[0] != "v"]
    assert [who for _, who in others] == ["ram", "launcher"]
    assert min(i for i, _ in others) > max(closes)


def test_with_a_vcpu_thread_still_running_the_vm_closes_first_on_the_callers_thread(tmp_path):
    steps = Steps(1, overlap=False)
    m = machine(tmp_path, steps, 1, vcpu_alive=True)
    vm_fds = list(m._vm_fds)

    m.close()

    fds = [who for step, who in steps.log if step == "fd"]
    assert fds == ["vcpu1", "vcpu0", "vm", "ram", "launcher"]
    assert {fd.thread for fd in vm_fds} == {threading.current_thread().name}


class BrokenSlot(FakeSlot):
    def sync(self, drain: bool = False) -> bool:
        raise RuntimeError("a bug in a device's sync")


def test_a_sync_that_raises_is_logged_and_every_device_still_ends(tmp_path, caplog):
    steps = Steps(2, overlap=False)
    m = machine(tmp_path, steps, 2)
    m.slots = [BrokenSlot("dev0", steps, False), FakeSlot("dev1", steps, True)]  # type: ignore[list-item]
    steps.all_syncing = threading.Barrier(1)  # dev0 never reaches it

    m.close()

    assert "syncing device dev0 failed" in caplog.text
    assert [(step, who) for step, who in steps.log if step in ("kill", "close")] == [
        ("kill", "dev0"),
        ("kill", "dev1"),
        ("close", "dev0"),
        ("close", "dev1"),
    ]
    assert [who for step, who in steps.log if step == "fd"][-2:] == ["ram", "launcher"]


class Deferred:
    """OnThread that runs its call only when waited for: a call that reads its arguments late
    sees what the caller left them as by then."""

    def __init__(self, name: str, call: Callable[[], object]) -> None:
        self._call = call

    def wait(self) -> BaseException | None:
        self._call()
        return None


def test_the_closing_thread_gets_the_vm_fds_whenever_it_starts(tmp_path, monkeypatch):
    steps = Steps(1, overlap=False)
    m = machine(tmp_path, steps, 1)
    monkeypatch.setattr(machine_module, "OnThread", Deferred)

    m.close()

    assert [who for step, who in steps.log if step == "fd"] == [
        "ram",
        "launcher",
        "vcpu1",
        "vcpu0",
        "vm",
    ]


def test_a_failed_pit_switch_left_by_a_failed_build_is_logged_and_the_rest_closes(tmp_path, caplog):
    steps = Steps(1)
    m = machine(tmp_path, steps, 1)

    def switch() -> None:
        raise KvmError(errno.ENXIO, "KVM_REINJECT_CONTROL")

    m._pit_mode = OnThread("pit-mode", switch)

    m.close()

    assert "turning the PIT's re-injection off failed" in caplog.text
    assert "KVM_REINJECT_CONTROL" in caplog.text
    assert [who for step, who in steps.log if step == "fd"][-2:] == ["ram", "launcher"]


class FakeLauncher:
    closed = 0

    def close(self) -> None:
        self.closed += 1

    def configure(self, path: Path, models: object = (), device_user: object = None) -> None:
        raise AssertionError("configured without a runtime dir")


def test_the_launcher_up_started_is_closed_when_the_build_fails_before_taking_it(tmp_path):
    """`up` starts the launcher before the monitor's imports; a build that failed at the
    runtime dir (something not a directory where it goes) had not taken it among its
    closables, and the launcher was never closed (nor reaped)."""
    (tmp_path / "vm").write_text("in the way")
    cfg = parse_config({"vm": {"name": "vm"}, "boot": {"kernel": "bzImage"}}, tmp_path,
                       check_files=False)  # fmt: skip
    launcher = FakeLauncher()
    m = Machine(cfg, runtime_root=tmp_path, launcher=launcher)  # type: ignore[arg-type]

    with pytest.raises(SplitvmmError, match="runtime directory"):
        m.build()
    m.close()

    assert launcher.closed == 1


class FakeCreatedFile:
    def __init__(self, steps: Steps) -> None:
        self.steps = steps

    def remove_if_unused(self) -> None:
        self.steps.note("remove", "serial.log")


@pytest.mark.parametrize("confined", [False, True])
def test_a_vm_that_never_ran_removes_its_created_outputs_only_before_its_confinement(
    tmp_path, confined
):
    """The removal locks the file (F_OFD_SETLK, devicefds.CreatedFile) and unlinks it: the
    confined monitor's filter kills it on the first, and its Landlock domain refuses the
    second. A VM that stops after its confinement and before its vCPUs keeps the file."""
    steps = Steps(1, overlap=False)
    m = machine(tmp_path, steps, 1)
    m.vcpus = []
    m._created_files = [FakeCreatedFile(steps)]  # type: ignore[list-item]
    m._confined = confined

    m.close()

    assert ("remove" in steps.kinds()) is not confined
