"""Coordinator.snapshot: a live snapshot lets the VM run again before the commit (fsync,
manifest, rename), which reads nothing of the VM; a suspend keeps it stopped throughout, and a
failed one resumes it. The machine, its vCPUs and the writer are fakes."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.monitor import coordinator as coordinator_module
from splitvmm.monitor.budget import Deadline
from splitvmm.monitor.control import ControlBusy, ControlError
from splitvmm.monitor.coordinator import Coordinator
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.memory import GuestMemory
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import DeviceSlot, SlotState, Spawn
from splitvmm.record import Struct, field
from splitvmm.snapshot import SnapshotError, SnapshotWriter
from splitvmm.snapshot import writer as writer_module
from tests.unit.snapshot_support import CPUID, VCPU, VM_CONFIG, memory
from tests.unit.test_slot import refuse


class FakeVcpu(Struct):
    events: list[str]
    parks: bool = True  # False: it waits in an exit past any timeout (a device restarting)
    name: str = "vcpu0"

    def request_pause(self) -> None:
        self.events.append("pause")

    def wait_parked(self, timeout: float) -> bool:
        return self.parks

    def resume(self) -> None:
        self.events.append("resume")


class FakeVcpuFd(Struct):
    events: list[str]
    kvmclock: bool = True  # the guest enabled kvmclock

    def kvmclock_ctrl(self) -> None:
        if not self.kvmclock:
            raise OSError(errno.EINVAL, "KVM_KVMCLOCK_CTRL")
        self.events.append("kvmclock stopped")


class FakeWriter(Struct):
    events: list[str]
    target: Path
    fail: bool = False
    aborted: list[bool] = field(default_factory=list)
    archived: bool = False  # moved away by something else as soon as it is committed
    stays_stopped: list[bool] = field(default_factory=list)  # what each _write was told

    def __enter__(self) -> FakeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.aborted.append(True)

    def commit(self, sign_key: bytes | None) -> Path:
        self.events.append("commit")
        if self.fail:
            raise OSError("disk full")
        if not self.archived:
            self.target.mkdir()
        return self.target


def coordinator(
    tmp_path: Path, monkeypatch, fail: bool = False, archived: bool = False,
    write_back_fails: bool = False,
) -> tuple[Coordinator, list[str]]:  # fmt: skip
    events: list[str] = []
    cfg = SimpleNamespace(vm=SimpleNamespace(name="t", snapshot_dirs=[tmp_path]))

    def write_back_images() -> None:
        events.append("write back")
        if write_back_fails:
            raise OSError(errno.EIO, "device disk0: its image could not be written back: EIO")

    machine = SimpleNamespace(
        cfg=cfg, stopping=False, vcpus=[FakeVcpu(events)], vcpu_fds=[FakeVcpuFd(events)], slots=[],
        rundir=SimpleNamespace(path=tmp_path / "run"), write_back_images=write_back_images,
        dirty_tracker=lambda: None,
    )  # fmt: skip
    coord = Coordinator(machine)  # type: ignore[arg-type]
    writer = FakeWriter(events, tmp_path / "snap", fail, archived=archived)

    def write(target, deadline, quiesced, tracker, stop, stays_stopped):
        writer.stays_stopped.append(stays_stopped)
        return writer

    monkeypatch.setattr(coord, "_write", write)
    coord.writer = writer  # type: ignore[attr-defined]
    return coord, events


@pytest.mark.parametrize(
    ("paused", "keep_paused", "stays"),
    [(False, False, False), (False, True, True), (True, False, True)],
    ids=["live", "suspend", "paused VM"],
)
def test_coordinator_writes_ram_back_as_it_goes_only_where_the_vm_waits_for_the_commit(
    tmp_path, monkeypatch, paused, keep_paused, stays
):
    """The RAM file goes to the disk as it is written (SnapshotWriter.add_ram's writeback)
    where the VM stays stopped until the commit: a suspend, a paused VM's snapshot. Not a live
    snapshot's, whose pause ends with the copy, which the writeback makes longer."""
    coord, events = coordinator(tmp_path, monkeypatch)
    if paused:
        coord.pause()

    coord.snapshot(tmp_path / "snap", keep_paused=keep_paused)

    assert coord.writer.stays_stopped == [stays]  # type: ignore[attr-defined]


def test_coordinator_snapshot_resumes_vcpus_before_the_commit(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)

    coord.snapshot(tmp_path / "snap")

    assert (events, coord.paused) == (
        ["pause", "kvmclock stopped", "resume", "write back", "commit"],
        False,
    )


def test_coordinator_removes_a_killed_writers_leftover_before_the_pause(tmp_path, monkeypatch):
    """A leftover of a killed writer may be GiBs of guest RAM: removing it takes a while, and
    the guest must not stand still for it (the writer would remove it too, in the pause)."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = tmp_path / ".earlier.tmp-1"  # a killed writer of another snapshot
    left.mkdir()
    coord, events = coordinator(tmp_path, monkeypatch)
    real_pause = coord.pause

    def pause() -> None:
        events.append(f"pause with the leftover there: {left.exists()}")
        real_pause()

    monkeypatch.setattr(coord, "pause", pause)

    coord.snapshot(tmp_path / "snap")

    assert events[0] == "pause with the leftover there: False"


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked"])
def test_coordinator_writer_made_in_the_pause_does_not_sweep_again(tmp_path, monkeypatch, tracked):
    """The sweep before the pause has done it: the writer's own would take its time (a
    directory others write to may hold many look-alikes) while the guest stands still."""
    coord, _ = coordinator(tmp_path, monkeypatch)
    sweeps = []

    class Made(Exception):
        pass

    def writer(*args: object, sweep: bool = True, **kwargs: object) -> None:
        sweeps.append(sweep)
        raise Made

    monkeypatch.setattr(coordinator_module, "SnapshotWriter", writer)
    monkeypatch.setattr(coordinator_module, "config_to_dict", lambda cfg: {})
    monkeypatch.setattr(coord, "_stop_and_save", lambda *args: SimpleNamespace(cpuid=dict))
    coord.machine.mem = None
    tracker = object() if tracked else None

    with pytest.raises(Made):
        Coordinator._write(coord, tmp_path / "s", Deadline(1.0), {}, tracker, list, False)  # type: ignore[arg-type]

    assert sweeps == [False]


@pytest.mark.parametrize("keep_paused", [False, True], ids=["snapshot", "suspend"])
def test_coordinator_image_that_cannot_be_written_back_leaves_no_snapshot(
    tmp_path, monkeypatch, keep_paused
):
    """A restored guest counts on every disk write it saw completed: an image whose write-
    back failed may have lost some, and a snapshot of that guest is no snapshot. The VM
    runs on (a suspend's too)."""
    coord, events = coordinator(tmp_path, monkeypatch, write_back_fails=True)

    with pytest.raises(ControlError, match="device disk0: its image could not be written back"):
        coord.snapshot(tmp_path / "snap", keep_paused=keep_paused)
    assert "commit" not in events and coord.paused is False
    assert not (tmp_path / "snap").exists()


def test_coordinator_snapshot_inside_the_runtime_dir_is_refused_before_any_pause(
    tmp_path, monkeypatch
):
    """The VM's end removes its runtime dir and all in it: a suspend there reported success,
    then the snapshot was gone (vm.snapshot_dirs may well cover it: /tmp, say)."""
    coord, events = coordinator(tmp_path, monkeypatch)
    (tmp_path / "run").mkdir()

    with pytest.raises(ControlError, match="is inside the VM's runtime dir"):
        coord.snapshot(tmp_path / "run" / "snap", keep_paused=True)
    assert (events, coord.paused) == ([], False)


def test_coordinator_suspend_commits_with_the_vcpus_stopped(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)

    coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (events, coord.paused) == (["pause", "write back", "commit"], True)


def test_coordinator_failed_suspend_commit_resumes_the_vcpus(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch, fail=True)

    with pytest.raises(OSError, match="disk full"):
        coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (events, coord.paused) == (
        ["pause", "write back", "commit", "kvmclock stopped", "resume"],
        False,
    )


def test_coordinator_failed_live_commit_resumes_once(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch, fail=True)

    with pytest.raises(OSError, match="disk full"):
        coord.snapshot(tmp_path / "snap")

    assert (events, coord.paused) == (
        ["pause", "kvmclock stopped", "resume", "write back", "commit"],
        False,
    )


class FakeSlot(Struct):
    """A device slot; `restart_at`: the control op before whose answer its process dies and
    the slot starts a new one (generation + 1), as monitor/slot.py restart() does, and the new
    one answers (slot.control waits for a device that is away); `crash_at`: the op before
    whose answer its death is seen, the new process not in the slot yet; `fail_at`: the op
    after which it fails for good."""

    name: str
    generation: int = 1
    crashes: int = 0
    failed: str | None = None
    restart_at: str | None = None
    crash_at: str | None = None
    fail_at: str | None = None
    quiesced_lives: tuple[int, int] | None = None
    back: bool = True  # False: away, a restart under way past any wait for it
    waiting: int = 0  # vCPUs waiting for it to come back
    stalled: str | None = None
    ops: list[str] = field(default_factory=list)

    @property
    def lives(self) -> tuple[int, int]:
        return self.crashes, self.generation

    def wait_back(self, timeout_s: float) -> bool:
        return self.back

    def control(self, op: str, timeout_ms: int) -> dict[str, object]:
        self.ops.append(op)
        if op == self.restart_at:
            self.crashes += 1
            self.generation += 1
        if op == self.crash_at:  # seen, its spare told to take over, not in the slot yet
            self.crashes += 1
        if op == "quiesce":  # under the slot's lock, with the answer
            self.quiesced_lives = self.lives
        if op == self.fail_at:
            self.crashes += 1
            self.failed = "process was killed by signal 9"
        return {"version": 1, "fields": {}}


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"restart_at": "save"}, "crashed and was restarted while the snapshot was taken"),
        ({"crash_at": "save"}, "crashed while the snapshot was taken"),
        ({"fail_at": "save"}, "failed while the snapshot was taken (process was killed by"),
    ],
    ids=["restarted-at-save", "crashed-spare-taking-over", "failed-for-good"],
)
def test_coordinator_device_crashed_after_its_quiesce_aborts_the_snapshot(
    tmp_path, monkeypatch, changes, what
):
    """A device that crashed after it was quiesced was replaced, or will be, by a process
    that is not quiesced: it may serve its queues while guest RAM is copied, so its saved
    state would not match the RAM. The snapshot is refused, naming the device and what
    became of it; as busy (ctl's 75: "take it again") unless the device failed for good."""
    coord, _ = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [FakeSlot("serial0"), FakeSlot("blk0", **changes)]
    states = coord._quiesce_devices(Deadline(5.0), {})

    with pytest.raises(ControlError) as e:
        coord._check_generations(states)
    assert f"device blk0 {what}" in str(e.value)
    again = "fail_at" not in changes
    assert ("take it again" in str(e.value), isinstance(e.value, ControlBusy)) == (again, again)


def test_coordinator_device_restarted_before_it_answered_its_quiesce_is_saved(
    tmp_path, monkeypatch
):
    """A snapshot asked for just after a crash: the slot waits for the new process, which
    answers the quiesce and is the one saved. The snapshot stands (it used to be thrown
    away after the whole RAM copy, as if the device had crashed during it)."""
    coord, _ = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [FakeSlot("serial0", restart_at="quiesce"), FakeSlot("blk0")]

    coord._check_generations(coord._quiesce_devices(Deadline(5.0), {}))


def test_coordinator_restarts_a_device_that_crashed_after_its_save_once_the_vm_runs_again(
    tmp_path, monkeypatch
):
    """A device that crashes once it saved its state waits for the snapshot's end to be
    restarted (Machine._device_failed asks hold_restart): a live snapshot asks for its
    restart as it lets the VM go, before the vCPUs run; one not saved yet is not held."""
    coord, events = coordinator(tmp_path, monkeypatch)
    saved, late = FakeSlot("blk0"), FakeSlot("net0")
    coord.machine.slots = [saved]
    coord.machine.restart_later = lambda slot: events.append(f"restart {slot.name}")

    def write(target, deadline, quiesced, tracker, stop, stays_stopped):
        coord._quiesce_devices(deadline, quiesced)
        events.append(f"held {coord.hold_restart(saved)} {coord.hold_restart(late)}")
        return FakeWriter(events, target)

    monkeypatch.setattr(coord, "_write", write)
    coord.snapshot(tmp_path / "snap")

    assert events[:4] == ["pause", "held True False", "restart blk0", "kvmclock stopped"]


def test_coordinator_devices_unchanged_since_they_saved_pass_the_check(tmp_path, monkeypatch):
    coord, _ = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [FakeSlot("serial0"), FakeSlot("blk0", generation=3)]

    coord._check_generations(coord._quiesce_devices(Deadline(5.0), {}))


def test_coordinator_suspend_whose_snapshot_is_moved_at_once_still_returns(tmp_path, monkeypatch):
    """Its size is read after the commit: a snapshot moved away by then (an archiver) made
    the suspend raise, so the machine never stopped and its devices stayed quiesced."""
    coord, events = coordinator(tmp_path, monkeypatch, archived=True)

    report = coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (events, coord.paused, report.bytes) == (["pause", "write back", "commit"], True, 0)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("{d}", "is a snapshot dir itself: name a new directory in it"),
        ("{d}/a\0b", "holds a NUL byte"),
        ("{d}/" + "n" * 250, "its name is too long (with the writer's temporary name"),
        ("{d}/missing/snap", "/missing is not a directory"),
        ("{d}/file/snap", "/file is not a directory"),
        ("{d}/" + "a/" * 2100 + "k", "File name too long"),
        ("{d}/\udc80\ud800", "surrogates not allowed"),
        ("{d}/sub/../snap", "holds a '..' component"),
        ("{d}/.keep.tmp-1", "the name of a writer's temporary directory"),
    ],
    ids=[
        "the-dir-itself",
        "nul",
        "name-too-long",
        "no-parent",
        "parent-a-file",
        "path-too-long",
        "lone-surrogate",
        "dot-dot",
        "staging-name",  # the next writer's sweep would remove it, published
    ],
)
def test_coordinator_snapshot_target_the_writer_would_refuse_is_refused_before_the_pause(
    tmp_path, monkeypatch, target, why
):
    """Said before any vCPU or device is stopped, naming the target: the writer's OSError
    came only after the pause, and some (a NUL, a long name) named no path. A path over
    PATH_MAX and a lone surrogate (a raw client's) got a Python exception's repr and a
    traceback in the log; a '..' after a symlink passed the check on the normalised path
    and was written through the link, where Landlock refused it after the pause."""
    coord, events = coordinator(tmp_path, monkeypatch)
    (tmp_path / "file").write_text("")

    with pytest.raises(ControlError) as e:
        coord.snapshot(Path(target.format(d=tmp_path)))

    assert why in str(e.value) and "snapshot target" in str(e.value)
    assert (events, coord.paused) == ([], False)


def test_coordinator_snapshot_with_a_failed_device_is_refused_before_the_pause(
    tmp_path, monkeypatch
):
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [FakeSlot("serial0"), FakeSlot("rng0", failed="killed by signal 9")]

    with pytest.raises(ControlError, match="device rng0 has failed; the VM cannot be saved"):
        coord.snapshot(tmp_path / "snap")
    assert (events, coord.paused) == ([], False)


def test_coordinator_snapshot_waits_for_a_restart_while_the_vm_runs_and_says_busy(
    tmp_path, monkeypatch
):
    """A device restarting when the snapshot is asked for: paused first, the guest stood
    still for the whole wait (10 s in an audit, for a device it never used), then the
    snapshot failed. The wait comes before the pause; a device not back by then is a
    "try again" (ctl's exit status 75)."""
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [FakeSlot("serial0"), FakeSlot("rng0", back=False)]

    with pytest.raises(
        ControlBusy, match="device rng0 is away \\(restarting\\) and not back within"
    ):
        coord.snapshot(tmp_path / "snap")
    assert (events, coord.paused) == ([], False)


def test_coordinator_resumes_only_the_processes_it_quiesced(tmp_path, monkeypatch):
    """A device that crashed after its quiesce is replaced by a process never quiesced:
    asking it to resume waited for its restart with every vCPU stopped (9.5 s in an audit)."""
    coord, _ = coordinator(tmp_path, monkeypatch)
    crashed, kept = FakeSlot("serial0", crash_at="save"), FakeSlot("blk0")
    coord.machine.slots = [crashed, kept]
    quiesced: dict[str, tuple[int, int]] = {}
    coord._quiesce_devices(Deadline(5.0), quiesced)

    coord._resume_devices(quiesced, Deadline(5.0))

    assert (crashed.ops, kept.ops) == (["quiesce", "save"], ["quiesce", "save", "resume"])


def test_coordinator_pause_held_by_a_restarting_device_names_it(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.vcpus = [FakeVcpu(events, parks=False)]
    coord.machine.slots = [FakeSlot("serial0", waiting=1), FakeSlot("blk0")]

    with pytest.raises(ControlBusy, match="waiting for device serial0 to come back"):
        coord.pause()
    assert (events, coord.paused) == (["pause", "resume"], False)


@pytest.mark.parametrize("keep_paused", [False, True], ids=["snapshot", "suspend"])
def test_coordinator_snapshot_whose_pause_fails_leaves_the_devices_askable(
    tmp_path, monkeypatch, keep_paused
):
    """A snapshot that could not pause the VM (a vCPU that does not stop) quiesced no
    device: the VM runs on, and `ctl devices` shows their counters as before
    (Machine._counters asks nothing while the coordinator says it is snapshotting)."""
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.vcpus = [FakeVcpu(events, parks=False)]

    with pytest.raises(ControlError, match="did not stop"):
        coord.snapshot(tmp_path / "snap", keep_paused=keep_paused)

    assert (coord.paused, coord.snapshotting) == (False, False)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("{d}/out/snap", "is outside vm.snapshot_dirs"),
        ("{d}/dangling", "already exists"),
    ],
    ids=["through-a-symlink", "a-dangling-symlink"],
)
def test_coordinator_snapshot_target_behind_or_at_a_symlink_is_refused_before_the_pause(
    tmp_path, monkeypatch, target, why
):
    """A parent that is a symlink out of vm.snapshot_dirs passed the lexical check, and the
    writer then wrote through it, refused by Landlock after the pause; a target that is a
    dangling symlink did not "exist", and the rename would have replaced the link."""
    coord, events = coordinator(tmp_path / "snaps", monkeypatch)
    (tmp_path / "snaps").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "snaps" / "out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "snaps" / "dangling").symlink_to(tmp_path / "nowhere")

    with pytest.raises(ControlError, match=why):
        coord.snapshot(Path(target.format(d=tmp_path / "snaps")))
    assert (events, coord.paused) == ([], False)


def test_coordinator_snapshot_with_no_snapshot_dirs_says_where_they_are_set(tmp_path, monkeypatch):
    """A VM from `restore` takes its snapshot dirs from --snapshot-dir, not from the saved
    config: "the config sets no vm.snapshot_dirs" pointed its operator at the wrong thing."""
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.cfg.vm.snapshot_dirs = []

    with pytest.raises(ControlError, match="or `restore` had no --snapshot-dir"):
        coord.snapshot(tmp_path / "snap")
    assert (events, coord.paused) == ([], False)


def test_coordinator_snapshot_dir_replaced_since_the_start_is_refused_saying_so(
    tmp_path, monkeypatch
):
    """The monitor's Landlock rule holds the directory that was there when it confined
    itself: into one removed and made again since, the writer failed with a bare
    "Permission denied", after the pause."""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    coord, events = coordinator(snaps, monkeypatch)
    coord.bind_snapshot_dirs()
    snaps.rename(tmp_path / "old")  # (renamed, not removed: its inode number stays taken)
    snaps.mkdir()

    with pytest.raises(ControlError, match=f"{snaps} was replaced .* since the VM started"):
        coord.snapshot(snaps / "s")
    assert (events, coord.paused) == ([], False)


@pytest.mark.parametrize("kvmclock", [True, False])
def test_coordinator_resume_tells_a_kvmclock_guest_it_was_stopped(tmp_path, monkeypatch, kvmclock):
    """KVM_KVMCLOCK_CTRL before the vCPUs run again: a Linux guest stopped for a snapshot's
    copy of a large RAM, or a pause, took the jump in its clock for a soft lockup (Firecracker
    tells it on pause, QEMU when the VM stops). A guest without kvmclock (EINVAL) is fine."""
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.vcpu_fds = [FakeVcpuFd(events, kvmclock=kvmclock)]
    coord.pause()
    coord.resume()
    told = ["kvmclock stopped"] if kvmclock else []
    assert (events, coord.paused) == (["pause", *told, "resume"], False)


# A device's slot as a refusal finds it: restarting; back already (a warm spare takes over in
# ms, `restarting` clear again before the handler looks) or its end not seen yet; failed for
# good (its on_crash policy), the only one that is not "try again" (ctl's 75).
AWAY = [(True, None, ControlBusy), (False, None, ControlBusy),
        (False, "its restart failed: x", ControlError)]  # fmt: skip


@pytest.mark.parametrize(("restarting", "failed", "refusal"), AWAY)
def test_crash_device_on_a_device_away_is_busy_unless_it_failed_for_good(
    restarting, failed, refusal
):
    """ctl crash-device racing a restart (two testers, or a loop faster than the restart) was
    a plain failure (exit 1) unless the restart was still under way when the handler
    looked; the device will be back and the same request work then: 75."""

    class AwaySlot:
        name = "con0"

        def __init__(self) -> None:
            self.restarting, self.failed = restarting, failed

        def crash(self, signum: int) -> int:
            raise DeviceFailure("device con0 is away: no process")

    machine = SimpleNamespace(slots=[AwaySlot()])

    with pytest.raises(refusal, match="device con0 is away: no process") as e:
        Machine._crash_device(machine, {"name": "con0", "signal": "KILL"})  # type: ignore[arg-type]
    assert isinstance(e.value, ControlBusy) is (failed is None)


@pytest.mark.parametrize(("restarting", "failed", "refusal"), AWAY)
def test_inject_fault_on_a_device_away_is_busy_unless_it_failed_for_good(
    restarting, failed, refusal
):
    """The same answer as crash-device's: a device that will be back takes the fault then."""

    class AwaySlot:
        name, model, pid = "blk0", "virtio-blk", 0

        def __init__(self) -> None:
            self.restarting, self.failed = restarting, failed

        def arm_fault(self, fault: dict[str, object]) -> int:
            raise DeviceFailure("device blk0 is away")

    machine = SimpleNamespace(slots=[AwaySlot()])
    fault = {"name": "blk0", "kind": "crash", "after": 1, "delay_ms": 0, "signal": "SEGV"}

    with pytest.raises(refusal, match="device blk0 is away") as e:
        Machine._inject_fault(machine, fault)  # type: ignore[arg-type]
    assert isinstance(e.value, ControlBusy) is (failed is None)


def test_inject_fault_io_error_refused_for_a_model_without_requests_and_filled_in_for_blk():
    """An io-error fails a model's requests (ModelDescriptor.request_faults): the serial
    device is never asked; a request that leaves on and count out gets their defaults."""
    armed: list[dict[str, object]] = []

    def arm_fault(fault: dict[str, object]) -> int:
        armed.append(fault)
        return 7

    slots = [SimpleNamespace(name="serial0", model="serial", arm_fault=arm_fault),
             SimpleNamespace(name="blk0", model="virtio-blk", arm_fault=arm_fault)]  # fmt: skip
    machine = SimpleNamespace(slots=slots)
    asked = {"kind": "io-error", "after": 1, "delay_ms": 0, "signal": "SEGV"}

    with pytest.raises(ControlError, match=r"serial0: model serial serves no requests"):
        Machine._inject_fault(machine, {"name": "serial0", **asked})  # type: ignore[arg-type]
    assert armed == []
    reply = Machine._inject_fault(machine, {"name": "blk0", **asked})  # type: ignore[arg-type]
    assert armed == [{**asked, "on": "any", "count": 1}] and reply["pid"] == 7


@pytest.mark.parametrize(("restarting", "failed", "refusal"), AWAY)
def test_link_on_a_device_away_is_busy_unless_it_failed_for_good(restarting, failed, refusal):
    """ctl link: as crash-device and inject-fault, a device that will be back takes it then."""

    class AwaySlot:
        name, model = "net0", "virtio-net"

        def __init__(self) -> None:
            self.restarting, self.failed = restarting, failed

        def control(self, op: str, args: dict[str, object]) -> dict[str, object]:
            raise DeviceFailure("device net0 is away")

    machine = SimpleNamespace(slots=[AwaySlot()])

    with pytest.raises(refusal, match="device net0 is away") as e:
        Machine._link(machine, {"name": "net0", "state": "down"})  # type: ignore[arg-type]
    assert isinstance(e.value, ControlBusy) is (failed is None)


@pytest.mark.parametrize(
    ("req", "refusal"),
    [
        ({"name": "serial0", "state": "down"}, "device serial0 (model serial) has no link"),
        ({"name": "net1", "state": "down"}, "no device named 'net1'"),
        ({"name": "net0", "state": "sideways"}, "state must be up or down"),
        ({"name": "net0", "state": True}, "state must be up or down"),
    ],
)
def test_link_refuses_a_device_without_one_and_a_state_but_up_or_down(req, refusal):
    asked: list[dict[str, object]] = []
    slots = [
        SimpleNamespace(name="serial0", model="serial"),
        SimpleNamespace(
            name="net0", model="virtio-net", control=lambda op, args: asked.append(args)
        ),
    ]

    with pytest.raises(ControlError, match=re.escape(refusal)):
        Machine._link(SimpleNamespace(slots=slots), req)  # type: ignore[arg-type]
    assert asked == []


def test_link_asks_the_device_and_says_what_it_answered():
    asked: list[tuple[str, dict[str, object]]] = []

    def control(op: str, args: dict[str, object]) -> dict[str, object]:
        asked.append((op, args))
        return {"op": "link_state", "seq": 1, "up": False, "changed": args["up"] is not None}

    slot = SimpleNamespace(name="net0", model="virtio-net", control=control)
    machine = SimpleNamespace(slots=[slot])

    reply = Machine._link(machine, {"name": "net0", "state": "down"})  # type: ignore[arg-type]
    assert reply == {"name": "net0", "link": "down", "changed": True}
    told = Machine._link(machine, {"name": "net0"})  # type: ignore[arg-type]
    assert told == {"name": "net0", "link": "down", "changed": False}
    assert asked == [("link", {"up": False}), ("link", {"up": None})]


class FiresAtTheNextAccess:
    """A slot's lock as a vCPU waits on it: a fault armed to fire at the next frame, while
    the guest runs, ends its process at that vCPU's access, the first to take the lock
    once the request that armed it lets go."""

    def __init__(self, slot: DeviceSlot) -> None:
        self.slot, self.lock, self.armed = slot, slot._lock, False

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        if self.armed:
            self.armed = False
            self.slot.fail("process was killed by signal 11")


class ArmingChannel:
    """A live device's channel: a fault request is answered, and the fault armed."""

    mirror = RegisterMirror(())

    def __init__(self, lock: FiresAtTheNextAccess) -> None:
        self.lock = lock

    def control(self, op: str, timeout_ms: int, args: object = None) -> dict[str, object]:
        self.lock.armed = op == "fault"
        return {"op": "armed", "seq": 1}


class Warden:
    pid = 4242

    def kill(self) -> None:
        pass


def test_inject_fault_names_the_process_it_armed_when_the_fault_fires_at_once(tmp_path):
    """`ctl inject-fault serial0 exit --after 1` while the guest prints: the fault may end
    its process before the handler read the slot's pid, which names no process then (no
    process serves a device that is away): the reply said "pid None"."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    lock = FiresAtTheNextAccess(slot)
    slot._lock, slot.channel = lock, ArmingChannel(lock)  # type: ignore[assignment]
    slot.state, slot.process = SlotState.LIVE, Warden()  # type: ignore[assignment]
    fault = {"name": "serial0", "kind": "exit", "after": 1, "delay_ms": 0, "signal": "SEGV"}

    reply = Machine._inject_fault(SimpleNamespace(slots=[slot]), fault)  # type: ignore[arg-type]

    assert (reply["pid"], slot.state, slot.restarting) == (4242, SlotState.AWAY, True)


class StalledSlot:
    """A device holding a request for room on the host (DeviceSlot.stalled)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.stalled: str | None = "the disk's file system is full"

    def resume_stalled(self) -> None:
        self.events.append("retry")
        self.stalled = None


def test_coordinator_resume_has_stalled_devices_retry_before_the_vcpus_run(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [StalledSlot(events)]
    coord.pause()

    coord.resume()

    assert (events, coord.paused) == (["pause", "retry", "kvmclock stopped", "resume"], False)


def test_coordinator_resume_of_a_running_vm_retries_its_stalled_devices(tmp_path, monkeypatch):
    """A stall the VM could not be paused for (a vCPU that would not park): `ctl resume`
    still has the device retry, where 'not paused' would leave its requests held."""
    coord, events = coordinator(tmp_path, monkeypatch)
    coord.machine.slots = [StalledSlot(events)]

    coord.resume()
    with pytest.raises(ControlError, match="is not paused"):
        coord.resume()  # nothing stalled now: the usual answer

    assert events == ["retry"]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = memory()
    yield m
    m.close()


def test_coordinator_failed_suspend_leaves_no_snapshot_of_the_vm_it_resumed(
    tmp_path, mem, monkeypatch
):
    """`ctl suspend` whose commit fails once the directory is renamed into place: the VM
    runs on (a failed suspend resumes everything), so the snapshot must not stay behind."""
    coord, events = coordinator(tmp_path, monkeypatch)

    def write(target, deadline, quiesced, tracker, stop, stays_stopped):
        w = SnapshotWriter(target, VM_CONFIG, CPUID, mem)
        w.add_ram(mem)
        w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
        return w

    monkeypatch.setattr(coord, "_write", write)
    real = writer_module._fsync_dir
    monkeypatch.setattr(
        writer_module,
        "_fsync_dir",
        lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")) if p == tmp_path else real(p),
    )

    with pytest.raises(SnapshotError):
        coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (coord.paused, events[-1]) == (False, "resume")  # the VM runs on...
    assert not (tmp_path / "snap").exists()  # ...so no snapshot of it may be left published


class HungSlot:
    """A device that does not answer `hang_at` within the time it was given: its slot fails
    it (the request's timeout), and on_crash = restart has it restarting, not failed."""

    name, model = "blk0", "virtio-blk"

    def __init__(self, clock: list[float], hang_at: str) -> None:
        self.clock, self.hang_at = clock, hang_at
        self.failed: str | None = None
        self.crashes = self.generation = 0
        self.quiesced_lives: tuple[int, int] | None = None

    @property
    def lives(self) -> tuple[int, int]:
        return self.crashes, self.generation

    def control(self, op: str, timeout_ms: int) -> dict[str, object]:
        if op == "quiesce":
            self.quiesced_lives = self.lives
        if op == self.hang_at:
            self.clock[0] += timeout_ms / 1000  # waited it all out
            self.crashes += 1  # killed, a restart asked for: not failed for good
            raise DeviceFailure(f"device blk0: no reply within {timeout_ms} ms")
        return {"version": 1, "fields": {}}


@pytest.mark.parametrize("op", ["quiesce", "save"])
def test_device_hung_at_a_snapshot_request_and_restarted_is_busy(tmp_path, monkeypatch, op):
    """Killed at its request's timeout and restarting (on_crash = restart), not failed for
    good: a snapshot its crash aborted, ctl's 75, at quiesce as at save. At quiesce the
    retry on its restart found no time left and said ControlError (exit 1), dropping why."""
    coord, _ = coordinator(tmp_path, monkeypatch)
    clock = [0.0]
    coord.machine.slots = [HungSlot(clock, op)]

    with pytest.raises(Exception) as e:
        coord._quiesce_devices(Deadline(5.0, clock=lambda: clock[0]), {})
    assert isinstance(e.value, ControlBusy), f"{type(e.value).__name__}: {e.value}"
