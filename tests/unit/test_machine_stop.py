"""Machine.run when a stop signal came before any vCPU ran (monitor/machine.py): the VM
stops there, its vCPUs never created, and close() tears down what build() made."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitvmm import timings
from splitvmm.errors import DeviceFailure
from splitvmm.monitor import machine as machine_module
from splitvmm.monitor.control import ControlBusy, ControlError
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.pci.function import PciFunctionHost
from splitvmm.monitor.slot import SlotState
from splitvmm.protocol.models import (
    MODELS,
    PROGRESS_MSIX_ENABLED_BYTE,
    PROGRESS_VECTORS_AT,
    FdKind,
)
from splitvmm.protocol.spec import MAX_DEVICES
from splitvmm.sandbox.launcher_start import LauncherError
from splitvmm.sandbox.spawn import readable
from splitvmm.snapshot import SnapshotError
from tests.unit.test_pci_function import COMMAND_INTX_DISABLE, COMMAND_MEMORY, Function


def bare_machine() -> Machine:
    """A Machine as build() leaves it, but for what run() reaches before its vCPUs."""
    m = Machine.__new__(Machine)
    m._outcome = None
    m._outcome_lock = threading.Lock()
    m._launcher = None
    m.vcpus = []
    m.slots = []
    m._wake = SimpleNamespace(trigger=lambda: None)
    m._spawned_at = {"serial0": 0.0}
    m.functions = {}
    m._supervisor = None
    return m


def test_a_stop_signal_while_the_devices_get_ready_runs_no_vcpu(monkeypatch):
    """SIGTERM during the wait for READY (the longest step of a start): stop() reached no
    vCPU (none existed yet), and run() used to create and start them all the same. The device
    it gave up (wait_ready returns, the slot failed quietly) is not timed as ready either:
    `up --timings` showed its span "device NAME ready", after as long as the stop took."""
    monkeypatch.setattr(timings, "_spans", [])
    m = bare_machine()
    stopped = Outcome(143, "stopped by SIGTERM")
    m.slots = [
        SimpleNamespace(
            name="serial0",
            ready=False,
            wait_ready=lambda: m.stop(stopped),
            give_up_host_io=lambda: None,
        )
    ]
    monkeypatch.setattr(
        machine_module,
        "Supervisor",
        lambda **kw: (_ for _ in ()).throw(AssertionError("the VM went on to run")),
    )

    assert m.run() is stopped and m.vcpus == []
    assert timings._spans == []


def test_a_stop_signal_during_the_build_returns_at_once():
    m = bare_machine()
    m.slots = [
        SimpleNamespace(
            name="serial0",
            give_up_host_io=lambda: None,
            wait_ready=lambda: (_ for _ in ()).throw(AssertionError("waited for devices")),
        )
    ]
    m.stop(Outcome(130, "stopped by SIGINT"))

    assert m.run().status == 130


class FlakyCoordinator:
    """pause_for() refused as busy `busy` times (a vCPU waits for a device's restart), or
    failing with `error` (a vCPU that will not park)."""

    def __init__(self, busy: int, error: ControlError | None = None) -> None:
        self.busy, self.error = busy, error
        self.paused = False
        self.tries = 0

    def pause_for(self, wanted):
        self.tries += 1
        if not wanted():
            return False
        if self.busy:
            self.busy -= 1
            raise ControlBusy("vcpu0 did not stop within 10 s: waiting for device serial0")
        if self.error is not None:
            raise self.error
        self.paused = True
        return True


def stalled_machine(coordinator: FlakyCoordinator) -> tuple[Machine, SimpleNamespace]:
    m = bare_machine()
    m.coordinator = coordinator
    m._device_cfg = {"blk0": SimpleNamespace(options={"path": "/images/disk.img"})}
    m.cfg = SimpleNamespace(vm=SimpleNamespace(name="web"))
    slot = SimpleNamespace(name="blk0", stalled="the disk's file system is full")
    return m, slot


def test_a_stall_whose_pause_is_refused_for_now_is_paused_later(monkeypatch, caplog):
    """A pause refused (busy) used to drop the stall: the device held its request for
    ever and the VM ran on, `ctl resume` answering 'not paused'."""
    monkeypatch.setattr(machine_module, "STALL_PAUSE_RETRY_S", 0)
    coordinator = FlakyCoordinator(busy=3)
    m, slot = stalled_machine(coordinator)

    m._pause_for(slot)

    assert coordinator.paused and coordinator.busy == 0
    assert "device blk0 (/images/disk.img)" in caplog.text and "the VM is paused" in caplog.text
    assert "`splitvmm ctl --vm web resume`" in caplog.text


def test_a_stall_retried_meanwhile_pauses_nothing():
    coordinator = FlakyCoordinator(busy=0)
    m, slot = stalled_machine(coordinator)
    slot.stalled = None  # the operator's resume had it retry, and the retry was done

    m._pause_for(slot)

    assert not coordinator.paused


def test_a_stall_whose_pause_cannot_be_made_is_given_up_and_said(monkeypatch, caplog):
    """A vCPU that will not park (not a restart: nothing to wait for) would freeze the guest
    in 10 s pulses if the pause were tried for ever: given up once, the VM runs on, and the
    operator is told to resume it (which has the device retry all the same)."""
    monkeypatch.setattr(machine_module, "STALL_PAUSE_RETRY_S", 0)
    coordinator = FlakyCoordinator(busy=0, error=ControlError("vcpu1 did not stop within 10 s"))
    m, slot = stalled_machine(coordinator)

    m._pause_for(slot)

    assert (coordinator.tries, coordinator.paused) == (1, False)
    assert "could not be paused (vcpu1 did not stop within 10 s)" in caplog.text
    assert "`splitvmm ctl --vm web resume`" in caplog.text


def test_requests_that_change_the_vm_are_refused_once_it_stops():
    """After a suspend (or a stop signal, or a fault) the control socket is open until the
    teardown: a resume answered "running" for a VM on its way out, a snapshot after it
    resumed the devices the suspend had quiesced, a crash-device killed one."""
    m = bare_machine()
    m.cfg = SimpleNamespace(vm=SimpleNamespace(name="t"))
    called: list[str] = []
    m.coordinator = SimpleNamespace(
        pause=lambda: called.append("pause"), resume=lambda: called.append("resume")
    )
    handlers = m._control_handlers()
    m.stop(Outcome(0, "suspended to /snaps/s"))
    steering = ("pause", "resume", "snapshot", "suspend", "crash-device", "inject-fault", "link",
                "power-button")  # fmt: skip
    for op in steering:
        with pytest.raises(ControlError, match="VM 't' is stopping"):
            handlers[op]({"op": op, "path": "/snaps/s2", "name": "serial0"})
    assert called == []
    assert set(handlers) - set(steering) == set(machine_module.READ_ONLY_REQUESTS)


def test_stop_gives_up_waiting_on_devices_in_host_io():
    """Machine.stop tells every slot that a device's host-I/O flag no longer holds a wait
    past its deadline (tests/unit/test_channel_host_io.py shows the channel's side)."""
    m = bare_machine()
    told: list[str] = []
    m.slots = [
        SimpleNamespace(name=n, give_up_host_io=lambda n=n: told.append(n)) for n in ("a", "b")
    ]
    m.stop(Outcome(143, "stopped by SIGTERM"))
    assert told == ["a", "b"]


def test_stop_gives_up_the_launchers_unanswered_requests():
    """A restart's spawn may wait for a new zygote's imports (a loaded host: up to the
    launcher's reply timeout, 60 s): the stop ends that wait (sandbox/launcher.py abandon)."""
    m = bare_machine()
    abandoned: list[str] = []
    m._launcher = SimpleNamespace(abandon=abandoned.append)
    m.stop(Outcome(143, "stopped by SIGTERM"))
    m.stop(Outcome(130, "stopped by SIGINT"))  # the first outcome wins; asked once
    assert abandoned == ["the VM is stopping"]


def test_a_build_cut_short_by_a_stop_ends_with_the_stops_outcome(monkeypatch):
    """The devices' spawns given up by a stop during the build raise LauncherError there:
    the stop is what `up` says and exits with (130 for SIGINT), not "error: the VM is
    stopping" and 1."""
    stopped = Outcome(130, "stopped by SIGINT")
    closed: list[bool] = []

    class Built(Machine):
        def __init__(self, cfg, snapshot=None, launcher=None):
            bare = bare_machine()
            self.__dict__.update(bare.__dict__)

        def build(self):
            self.stop(stopped)
            raise LauncherError("the VM is stopping")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(machine_module, "Machine", Built)
    assert machine_module.run_vm(SimpleNamespace()) is stopped
    assert closed == [True]


def test_a_build_that_fails_without_a_stop_still_raises(monkeypatch):
    class Failing(Machine):
        def __init__(self, cfg, snapshot=None, launcher=None):
            self.__dict__.update(bare_machine().__dict__)

        def build(self):
            raise LauncherError("the launcher did not start: it exited")

        def close(self):
            pass

    monkeypatch.setattr(machine_module, "Machine", Failing)
    with pytest.raises(LauncherError, match="did not start"):
        machine_module.run_vm(SimpleNamespace())


@pytest.fixture
def blk_irq_fds() -> Iterator[dict[str, int]]:
    """An eventfd for each interrupt role (MSI-X vectors, INTx and its resample fd) of a
    virtio-blk device, and its progress page, as a guest that never enabled MSI-X leaves it
    (devprocs/progress.py; msix_in_use() writes what one that did leaves)."""
    model = MODELS["virtio-blk"]
    kinds = (FdKind.MSIX, FdKind.INTX, FdKind.INTX_RESAMPLE)
    roles = [r.name for r in model.fds if r.kind in kinds]
    fds = {name: os.eventfd(0, os.EFD_NONBLOCK) for name in roles}
    fds["progress"] = os.memfd_create("progress")
    try:
        os.ftruncate(fds["progress"], 4096)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def leaving_blk0(fds: dict[str, int], host: PciFunctionHost) -> tuple[Machine, SimpleNamespace]:
    """A machine whose device blk0 (on_crash = "leave"), its function's host `host`, holds
    `fds`; and blk0's slot, serving: what _device_failed() is given when blk0 dies."""
    m = bare_machine()
    m._device_cfg = {"blk0": SimpleNamespace(on_crash="leave")}
    m._launcher = SimpleNamespace(exited=lambda: False)
    m._spawns = [SimpleNamespace(name="blk0", fds=fds)]
    m.functions = {"blk0": host}
    return m, SimpleNamespace(name="blk0", model="virtio-blk", state=SlotState.LIVE)


def msix_in_use(fds: dict[str, int]) -> None:
    """The progress page as a guest leaves it that enabled MSI-X, unmasked both vectors and
    had their routes confirmed: MSI-X Enable set, each vector may fire."""
    os.pwrite(fds["progress"], b"\x01", PROGRESS_MSIX_ENABLED_BYTE)
    os.pwrite(fds["progress"], b"\x01\x01", PROGRESS_VECTORS_AT)


def raised(fds: dict[str, int]) -> dict[str, int]:
    """How many times each interrupt line of the dead device was raised."""
    lines = {n: fd for n, fd in fds.items() if n not in ("intx_resample", "progress")}
    return {n: os.eventfd_read(fd) if readable(fd, 0) else 0 for n, fd in lines.items()}


def test_a_device_left_dead_on_msix_raises_each_vector_once_and_no_intx(blk_irq_fds):
    """on_crash = "leave": every MSI-X vector the dead device could send fires once, so that
    a driver waiting for an interrupt looks, and finds it failed (status all-ones); a polling
    guest notices only at its own timeout, so no guest test can pin this. PCI 3.0 6.8.2.3:
    with MSI-X Enable set the function may not use its INTx# pin, Interrupt Disable clear
    or not (a guest need not set it)."""
    msix_in_use(blk_irq_fds)
    m, slot = leaving_blk0(blk_irq_fds, Function().host)

    assert m._device_failed(slot, "killed by SIGKILL") is False  # type: ignore[arg-type]
    assert raised(blk_irq_fds) == {"msix0": 1, "msix1": 1, "intx": 0}
    assert m._outcome is None  # the VM runs on


def test_a_device_left_dead_on_intx_raises_its_line_and_no_vector(blk_irq_fds):
    m, slot = leaving_blk0(blk_irq_fds, Function().host)

    assert m._device_failed(slot, "killed by SIGKILL") is False  # type: ignore[arg-type]
    assert raised(blk_irq_fds) == {"msix0": 0, "msix1": 0, "intx": 1}
    assert m._outcome is None


def test_a_device_left_dead_raises_no_intx_while_its_guest_has_it_disabled(blk_irq_fds):
    """PCI 3.0 6.2.2: no INTx while the command register's Interrupt Disable is set, which
    Linux sets whenever it uses MSI-X. Its pin (16 + device % 8) may be another device's,
    whose driver took the dead one's interrupt, and now would again at every EOI until
    the dead one is read (the monitor holds the line: pci/intx.py)."""
    f = Function()
    f.config_write(4, (COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_bytes(2, "little"))
    m, slot = leaving_blk0(blk_irq_fds, f.host)

    assert m._device_failed(slot, "killed by SIGKILL") is False  # type: ignore[arg-type]
    assert raised(blk_irq_fds) == {"msix0": 0, "msix1": 0, "intx": 0}


def test_a_device_that_fails_its_first_start_is_not_left_dead_by_on_crash_leave(
    caplog, blk_irq_fds
):
    """A device that fails before its first READY ends the VM's start (wait_ready raises:
    `up` prints the error, exit 1), whatever its on_crash: "leave", as "restart", is for a
    device that served. It logged "stays dead (on_crash = leave); its registers read as
    all-ones" of a VM that never ran, a line before the error that ended it, and raised the
    dead device's interrupts into it."""
    m = bare_machine()
    m._device_cfg = {"blk0": SimpleNamespace(on_crash="leave")}
    m._launcher = SimpleNamespace(exited=lambda: False, abandon=lambda why: None)
    m._spawns = [SimpleNamespace(name="blk0", fds=blk_irq_fds)]
    slot = SimpleNamespace(name="blk0", model="virtio-blk", state=SlotState.AWAY, restarting=False)

    why = "exited with status 1 before it was ready"
    failed = m._device_failed(slot, why)  # type: ignore[arg-type]
    raised = [n for n, fd in blk_irq_fds.items() if n != "progress" and readable(fd, 0)]

    assert (failed, raised, "stays dead" in caplog.text) == (False, [], False)
    assert m._outcome is not None and m._outcome.message == f"device blk0 failed: {why}"


def test_an_image_whose_write_back_failed_fails_every_later_one_and_the_others_are_synced(
    tmp_path, monkeypatch
):
    """The kernel reports a failed write-back once per open file description (errseq): a
    retried snapshot found the sync clean and committed a guest that had lost writes. The
    failure is kept; and one image's failure does not keep the others from being synced."""
    import errno
    import os

    fds = {name: os.open(tmp_path / name, os.O_RDWR | os.O_CREAT) for name in ("d0", "d1")}
    synced: list[int] = []

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        if fd == fds["d0"] and synced.count(fd) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    m = bare_machine()
    m._images = [("disk0", fds["d0"]), ("disk1", fds["d1"])]
    m._write_back_failed = {}
    try:
        for _ in range(2):
            with pytest.raises(OSError, match="device disk0: its image could not be written back"):
                m.write_back_images()
        assert synced == [fds["d0"], fds["d1"], fds["d1"]]  # disk0's failure kept, not retried
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_restart_queued_when_the_vm_stops_starts_no_process_and_no_spare():
    """The restarter ran every restart queued before run()'s None, after the stop: a new
    device process (and then a warm spare) spawned for a VM being torn down, which waited
    for them (a cold start: up to READY_TIMEOUT_MS)."""
    m = bare_machine()
    m._restarts, m._supervisor = queue.Queue(), None
    done: list[str] = []
    slot = SimpleNamespace(
        name="serial0",
        process=None,
        restart=lambda: done.append("restart"),
        start_spare=lambda: done.append("spare"),
        fail=lambda why, logged=True: done.append(f"fail: {why}"),
    )
    m._restarts.put(slot)  # a crash the policy restarts, behind another restart
    m.stop(Outcome(0, "guest reset through the i8042 controller"))
    m._restarts.put(None)  # run()'s teardown
    m._restarter()

    assert done == ["fail: the VM is stopping"]


class Places:
    """The launcher's MAX_DEVICES places: each device process and each warm spare takes one;
    a spawn past them is refused, as the launcher refuses it."""

    def __init__(self, taken: int) -> None:
        self.taken = taken

    def take(self, name: str) -> None:
        if self.taken >= MAX_DEVICES:
            raise DeviceFailure(f"device {name}: {MAX_DEVICES} devices run already")
        self.taken += 1


class RestartedSlot:
    """A device with on_crash = "restart", as the restarter sees its slot."""

    ready = True

    def __init__(self, name: str, places: Places, spare: bool) -> None:
        self.name, self.places, self.spare_pid = name, places, int(spare)

    def give_up_host_io(self) -> None:
        pass

    def start_spare(self) -> None:
        """None whatever comes of it: nobody watches a spare here (no supervisor)."""
        if not self.spare_pid:
            with contextlib.suppress(DeviceFailure):  # logged: its next restart starts cold
                self.places.take(self.name)
                self.spare_pid = 1

    def restart(self) -> None:
        if self.spare_pid:
            self.spare_pid = 0  # its spare takes over, in the place it holds
        else:
            self.places.take(self.name)  # a cold process: DeviceFailure stops the VM


class CrashTogether:
    """The restarter's queue: `slots` crash together once the restarter has started its
    spares (their processes ended and reaped: their places are free), then the VM stops."""

    def __init__(self, slots: list[RestartedSlot], places: Places) -> None:
        self.slots, self.places = slots, places
        self.queued: list[RestartedSlot | None] | None = None

    def get(self, timeout: float | None = None) -> object:
        if self.queued is None:
            self.places.taken -= len(self.slots)
            self.queued = [*self.slots, None]
        return self.queued.pop(0)

    def put(self, item: object) -> None:
        assert self.queued is not None
        self.queued.insert(-1, item)  # type: ignore[arg-type]


def test_devices_crashing_together_are_restarted_though_spares_could_fill_the_launcher():
    """33 devices restarted on a crash: their processes and 31 warm spares fill the launcher's
    MAX_DEVICES (64). Two without a spare crash together: the first one's new spare took the
    place its process had freed, which the second one's cold restart needed ("64 devices run
    already"), and the VM stopped, for a spare's sake."""
    m = bare_machine()
    m._supervisor = None
    m._launcher = SimpleNamespace(abandon=lambda why: None)
    places = Places(taken=MAX_DEVICES)
    m.slots = [RestartedSlot(f"dev{i}", places, spare=i < 31) for i in range(33)]
    m._restarts = CrashTogether(m.slots[31:], places)  # type: ignore[assignment]

    m._restarter()

    assert m._outcome is None, m._outcome.message


HUNG_WRITE_BACK = """
import os, threading
from splitvmm.monitor import machine as machine_module
from splitvmm.monitor.machine import Machine

machine_module.WRITE_BACK_TIMEOUT_S = 0.1
os.fdatasync = lambda fd: threading.Event().wait()  # a hard NFS mount that never answers
m = Machine.__new__(Machine)
m._images, m._write_back_failed = [("disk0", 0)], {}
m._write_back_at_exit()
print("gave up", flush=True)
"""


def test_monitor_exits_after_giving_up_on_a_hung_write_back():
    """The teardown waits WRITE_BACK_TIMEOUT_S for the disk images' write-back and then exits
    without it (hung storage: a hard NFS mount). Its thread was not a daemon, so the
    interpreter's exit joined it, behind an fdatasync that never returns: the monitor said
    it was exiting and never did. Its own process, so that interpreter shutdown is seen."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG_WRITE_BACK],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"did not exit after giving up: {out!r} {err!r}") from None
    assert b"gave up" in out and b"were not written back within" in err


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_a_failed_suspend_says_the_vm_was_not_suspended(paused):
    """`ctl suspend` whose snapshot fails (a full disk in the middle of guest RAM) resumes
    the VM (coordinator.py), and the VM must not end: the reply said only what failed, and
    an operator who asked for the VM to end could not tell that it runs on."""
    m = bare_machine()
    m.cfg = SimpleNamespace(vm=SimpleNamespace(name="t"))

    def snapshot(target, keep_paused, sign_key):
        raise SnapshotError(f"snapshot {target}: chunk ram: No space left on device")

    m.coordinator = SimpleNamespace(snapshot=snapshot, paused=paused)
    handlers = m._control_handlers()

    with pytest.raises(ControlError) as failed:
        handlers["suspend"]({"op": "suspend", "path": "/snaps/s"})

    state = "stays paused" if paused else "runs on"
    assert str(failed.value) == (
        f"snapshot /snaps/s: chunk ram: No space left on device; the VM was not suspended "
        f"and {state}"
    )
    assert not m.stopping
