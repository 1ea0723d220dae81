"""Coordinator: stops the whole machine at a consistent point and writes a snapshot.

1. pause every vCPU: each completes its pending I/O exit (KVM_RUN with
   immediate_exit) and parks outside KVM_RUN;
2. quiesce every device process: it stops taking work, finishes what is in
   flight, and answers "quiesced" (its posted writes are applied by then: the
   channel is ordered);
3. collect device states (opaque `{model, version, fields}` documents), vCPU
   and VM state; a device that crashes once it saved its state is restarted only
   when the VM runs again (hold_restart), never by a suspend;
4. write guest RAM and the chunks (a copy into the page cache);
5. resume devices and vCPUs (or leave them stopped for `suspend`);
6. commit: write back the VM's disk images (Machine.write_back_images), fsync
   the chunks, write the manifest last and rename the directory into place, so
   a half-written snapshot never looks valid. It reads nothing of the VM, so
   `ctl snapshot` pauses for the copy, not for the disk's flush.

A VM with vm.track_dirty_pages that runs on after its snapshot (`ctl snapshot` of a running
VM) has its RAM copied first, while it runs, then again, still running, what it wrote
meanwhile as long as that shrinks; steps 1-3 come after those copies, and step 4 copies again
only the pages written since the last (pre-copy: monitor/dirtylog.py, snapshot/ram.py
sparse-v2), so the pause is that last copy.

The devices share one deadline for their quiesce, save and resume (time spent writing RAM
is not theirs); each request waits only for what is left of it, and a device that does not
answer in that time has failed like any other (its on_crash policy applies).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from splitvmm.config import config_to_dict
from splitvmm.errors import DeviceFailure
from splitvmm.monitor import vmstate
from splitvmm.monitor.budget import Deadline
from splitvmm.monitor.channel import CONTROL_TIMEOUT_MS
from splitvmm.monitor.control import ControlBusy, ControlError
from splitvmm.monitor.pci import state as pcistate
from splitvmm.monitor.slot import DeviceSlot
from splitvmm.record import Struct
from splitvmm.snapshot.writer import (
    SnapshotWriter,
    remove_stale_staging,
    staging_name_problem,
    staging_path,
)

if TYPE_CHECKING:
    from splitvmm.monitor.dirtylog import DirtyTracker
    from splitvmm.monitor.machine import Machine

NAME_MAX = 255  # bytes of one file name (<limits.h>)

log = logging.getLogger("splitvmm.coordinator")
# A device's slot.lives when it was asked to quiesce, and the state it saved
_Saved = tuple[tuple[int, int], dict[str, object]]

# All the vCPUs together. A vCPU in a forwarded read waits at most the device's read deadline,
# but one waiting for a device that restarts waits up to its READY timeout (slot.py
# RESTART_WAIT_MS): a snapshot waits for restarts before it pauses (_devices_back), and a
# pause that meets one started since names the device.
PARK_TIMEOUT_S = 10.0
# The devices of one snapshot get this long in all to quiesce, save and resume: a device
# answering each control request just under CONTROL_TIMEOUT_MS kept the VM paused for 31 s.
# A healthy one needs a few ms (more when it finishes in-flight I/O on quiesce).
SNAPSHOT_DEVICE_DEADLINE_S = 10.0
# A live snapshot of a VM that tracks its dirty pages copies again, still running, what the VM
# wrote during a pass, until that is at most this (or stops shrinking): what the pause copies.
# ~2-4 ms of copying here.
PAUSE_COPY_BYTES = 4 << 20
# Once that time is spent a device still gets this long to resume: one that was quiesced must
# be let go even when another device used the time up (a healthy resume takes ~1 ms).
RESUME_FLOOR_MS = 500
# A device is asked to harvest its dirty marks only with at least this long to answer (or the
# whole deadline, where that is shorter): a harvest can be done without, and a device that
# misses a control request's timeout is failed, when another may have used the time up.
HARVEST_FLOOR_MS = 500


class SnapshotReport(Struct, frozen=True):
    path: Path
    pause_ms: float  # from the pause request until vCPUs run again (or the snapshot is done)
    write_ms: float  # collecting and writing everything, commit included
    bytes: int


class Coordinator:
    def __init__(
        self, machine: Machine, device_deadline_s: float = SNAPSHOT_DEVICE_DEADLINE_S
    ) -> None:
        self.machine = machine
        self.device_deadline_s = device_deadline_s
        self.paused = False
        # One pause, resume or snapshot at a time: ctl's (its worker thread) or one for a
        # device that stalled (Machine._pauser)
        self._lock = threading.RLock()
        # A snapshot's devices may be quiesced (from its pause on; a paused VM's, a suspend's
        # and an untracked one's from its start): nobody else asks them anything (`ctl
        # devices` shows no counters meanwhile).
        self.snapshotting = False
        # vm.snapshot_dirs as the monitor's Landlock rules hold them: the directories there
        # when it confined itself ((st_dev, st_ino), bind_snapshot_dirs), not their paths
        self._snapshot_dir_ids: dict[Path, tuple[int, int]] = {}
        # The devices the snapshot under way has saved, and the slots of those that crashed
        # since, whose restarts wait for its end (hold_restart)
        self._held_lock = threading.Lock()
        self._saved: set[str] = set()
        self._held: list[DeviceSlot] = []

    # -- pause / resume -----------------------------------------------------------------------
    def pause(self) -> None:
        """Park every vCPU."""
        with self._lock:
            self._pause()

    def pause_for(self, wanted: Callable[[], bool]) -> bool:
        """Pause the VM, paused already or not, if `wanted()` still says so once no other
        pause, resume or snapshot is under way (a device's stall: the operator's resume may
        have had it retry meanwhile); whether it did. ControlError as pause()."""
        with self._lock:
            if not wanted() or self.machine.stopping:  # (a suspend's end: nothing to say)
                return False
            if not self.paused:
                self._pause()
            return True

    def _pause(self) -> None:
        if self.paused:
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} is already paused")
        if self.machine.stopping:
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} is stopping")
        vcpus = self.machine.vcpus
        for v in vcpus:
            v.request_pause()
        until = time.monotonic() + PARK_TIMEOUT_S  # one deadline for all, not one each
        stuck = [v.name for v in vcpus if not v.wait_parked(max(0.0, until - time.monotonic()))]
        if self.machine.stopping:  # a vCPU that stops is not parked between instructions
            for v in vcpus:
                v.resume()
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} stopped while pausing")
        if stuck:
            for v in vcpus:
                v.resume()
            waited_on = [s.name for s in self.machine.slots if s.waiting]
            if waited_on:  # a restart under way: it will be back (or fail) on its own
                raise ControlBusy(
                    f"{', '.join(stuck)} did not stop within {PARK_TIMEOUT_S:g} s: waiting for "
                    f"device {', '.join(waited_on)} to come back; try again once it is"
                )
            raise ControlError(f"{', '.join(stuck)} did not stop within {PARK_TIMEOUT_S:g} s")
        self.paused = True

    def resume(self) -> None:
        """Run the vCPUs again; a device that stalled meanwhile tries its request again
        first (DeviceSlot.resume_stalled). A VM that could not be paused for a device's
        stall (Machine._pause_for) runs already: its stalled devices retry, and that is all."""
        with self._lock:
            stalled = [slot for slot in self.machine.slots if slot.stalled is not None]
            if not self.paused and not stalled:
                raise ControlError(f"VM {self.machine.cfg.vm.name!r} is not paused")
            for slot in stalled:
                slot.resume_stalled()
            if self.paused:
                self._resume()

    def _resume(self) -> None:
        for fd in self.machine.vcpu_fds:
            vmstate.tell_stopped(fd)  # parked: out of KVM_RUN, as an ioctl from here needs
        for v in self.machine.vcpus:
            v.resume()
        self.paused = False

    # -- snapshot -----------------------------------------------------------------------------
    def snapshot(
        self, target: Path, keep_paused: bool = False, sign_key: bytes | None = None
    ) -> SnapshotReport:
        """Write a snapshot; the VM runs on afterwards unless it was paused or keep_paused.
        With sign_key, the snapshot carries its manifest's MAC (snapshot/signing.py)."""
        with self._lock:
            return self._snapshot(target, keep_paused, sign_key)

    def _snapshot(self, target: Path, keep_paused: bool, sign_key: bytes | None) -> SnapshotReport:
        target = self._check_target(target)
        if os.path.lexists(target):  # a symlink too, dangling or not: the rename would replace it
            raise ControlError(f"snapshot target {target} already exists")
        remove_stale_staging(target.parent)  # now, not in the pause: GiBs take a while
        self._devices_back()
        was_paused = self.paused
        deadline = Deadline(self.device_deadline_s)
        # A VM that runs on after its snapshot has its RAM copied while it runs, and only
        # what it writes meanwhile copied in the pause (pre-copy: monitor/dirtylog.py). A
        # suspend's pause lasts until the end anyway, and a paused VM writes nothing. (A VM
        # that does not track its dirty pages, vm.track_dirty_pages, copies all of it in the
        # pause: no tracker.)
        tracker = None if was_paused or keep_paused else self.machine.dirty_tracker()
        t0 = t1 = time.monotonic()
        resumed_at = None

        def stop() -> None:
            nonlocal t0
            t0 = time.monotonic()
            self.pause()
            # The devices are quiesced from now on: asked nothing else. Not before the pause:
            # one that fails quiesces nothing, and the flag would stay (`ctl devices` blind).
            self.snapshotting = True

        if tracker is None and not was_paused:
            stop()

        quiesced: dict[str, tuple[int, int]] = {}  # the devices quiesced: their lives then

        def let_go() -> None:
            nonlocal resumed_at
            resumed_at = time.monotonic()  # set first: a failing resume is not retried
            try:
                self._resume_devices(quiesced, deadline)
            finally:
                self._release_restarts()  # the VM runs again: crashed devices restart
            self.snapshotting = False  # the devices take work again: they may be asked
            if not was_paused and self.paused:  # (a pre-copy that failed first paused nothing)
                self.resume()
            resumed_at = time.monotonic()

        ok = False
        # A paused VM's devices are quiesced at once; a live snapshot's once its copy made while
        # the VM runs is done (stop()): until then they serve the guest, and may be asked
        # their counters (`ctl devices`).
        self.snapshotting = tracker is None
        try:
            stays_stopped = was_paused or keep_paused  # until the commit
            with self._write(target, deadline, quiesced, tracker, stop, stays_stopped) as writer:
                if not keep_paused:
                    let_go()  # the VM's data is copied: commit reads none of it
                self._write_back_images()
                writer.commit(sign_key)
            t2 = time.monotonic()
            ok = True
        finally:
            # A suspended VM stays stopped, devices included: input arriving after the
            # snapshot would be lost with the VM. A failed suspend resumes everything.
            if resumed_at is None and not (ok and keep_paused):
                let_go()
            self.snapshotting = ok and keep_paused  # a suspended VM's devices stay quiesced
        size = _bytes_in(target)
        paused_until = t2 if resumed_at is None else resumed_at
        return SnapshotReport(target, (paused_until - t0) * 1e3, (t2 - t1) * 1e3, size)

    def hold_restart(self, slot: DeviceSlot) -> bool:
        """Whether the restart of `slot`, crashed, waits for the snapshot under way to end
        (Machine._device_failed, its slot's lock held, any thread): it does once the device
        saved its state. Its new process is never quiesced: it would serve what the guest
        queued before the snapshot, which a suspend's restore serves again (a frame sent
        twice, output written twice) while the suspended VM was to stay stopped, devices
        included. A snapshot that lets the VM run again restarts it then (let_go); a suspend
        never does: its VM stops."""
        with self._held_lock:
            if slot.name not in self._saved:
                return False
            self._held.append(slot)
            return True

    def _release_restarts(self) -> None:
        with self._held_lock:
            held, self._held, self._saved = self._held, [], set()
        for slot in held:
            self.machine.restart_later(slot)

    def _write_back_images(self) -> None:
        """Before the commit, with the VM running again: the guest's disk writes up to the
        snapshot reach the disk (and any since), or there is no snapshot, as a restored
        guest would count on writes its disk lost (Machine.write_back_images)."""
        try:
            self.machine.write_back_images()
        except OSError as e:
            raise ControlError(f"{e.strerror}: the snapshot is not written") from None

    def bind_snapshot_dirs(self) -> None:
        """Note which directories vm.snapshot_dirs are now, as Landlock has just bound its
        rules to them: one removed and made again later is another, and the monitor's writes
        there fail with EACCES (_checked_target says so before any pause). Not called where
        the monitor runs without Landlock (optional, and none on the kernel): any directory
        at those paths is writable then."""
        self._snapshot_dir_ids = {d: _identity(d) for d in self.machine.cfg.vm.snapshot_dirs}

    def _check_target(self, target: Path) -> Path:
        """The path to write: `target` where the config's vm.snapshot_dirs allow it (the
        monitor's Landlock rules would refuse anything else half-way), normalised, as it
        was checked; say what is wrong before pausing anything."""
        try:
            return self._checked_target(target)
        except (OSError, UnicodeError) as e:  # a name too long for the system, a lone surrogate
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ControlError(f"snapshot target {str(target)!r}: {reason}") from None

    def _checked_target(self, target: Path) -> Path:
        allowed = self.machine.cfg.vm.snapshot_dirs
        if not target.is_absolute():
            raise ControlError(f"snapshot target {target} is not an absolute path")
        if "\0" in str(target):
            raise ControlError(f"snapshot target {str(target)!r} holds a NUL byte")
        if ".." in target.parts:  # normpath's answer may not be the path the kernel walks
            raise ControlError(f"snapshot target {target} holds a '..' component")
        path = Path(os.path.normpath(target))
        if not path.parent.is_dir():
            raise ControlError(f"snapshot target {target}: {path.parent} is not a directory")
        # Where the kernel will write, its parent's symlinks followed: what Landlock judges,
        # after the pause (vm.snapshot_dirs are resolved so too: config.py).
        path = path.parent.resolve(strict=True) / path.name
        if path in allowed:
            raise ControlError(
                f"snapshot target {target} is a snapshot dir itself: name a new directory in it"
            )
        if problem := staging_name_problem(path):  # before the pause, as the writer's own
            raise ControlError(f"snapshot target {target}: {problem}")
        rundir = self.machine.rundir.path.resolve()
        if path == rundir or rundir in path.parents:  # the VM's end removes it, and all in it
            raise ControlError(f"snapshot target {target} is inside the VM's runtime dir {rundir}")
        within = [d for d in allowed if path.parent == d or d in path.parent.parents]
        if not within:
            # (`restore` takes them from --snapshot-dir, not from the snapshot's config)
            where = ", ".join(map(str, allowed)) or (
                "nowhere: its config sets no vm.snapshot_dirs, or `restore` had no --snapshot-dir"
            )
            raise ControlError(
                f"snapshot target {target} is outside vm.snapshot_dirs (this VM may write to {where})"
            )
        ids = self._snapshot_dir_ids
        if all(d in ids and _identity(d) != ids[d] for d in within):  # (nested: one will do)
            nearest = max(within, key=lambda d: len(d.parts))
            raise ControlError(
                f"snapshot target {target}: {nearest} was replaced (removed or moved, and made "
                "again) since the VM started, and the VM may write only into the directory that "
                "was there then"
            )
        # What the writer would fail on after every vCPU and device was stopped.
        if len(os.fsencode(staging_path(path).name)) > NAME_MAX:  # the longer of its names
            raise ControlError(
                f"snapshot target {target}: its name is too long (with the writer's "
                f"temporary name for it, .<name>.tmp-<pid>, over {NAME_MAX} bytes)"
            )
        # A directory the monitor may not write in (its modes, a read-only mount): the
        # writer's mkdir would say so only in the pause, naming its temporary directory. Its
        # own mkdir, undone at once (access(2) is not in the monitor's filter, and knows
        # nothing of Landlock); one that is there already is the writer's to judge.
        staging = staging_path(path)
        try:
            os.mkdir(staging, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ControlError(
                f"snapshot target {target}: cannot write in {path.parent}: {e.strerror}"
            ) from None
        else:
            os.rmdir(staging)
        return path

    def _devices_back(self) -> None:
        """Before any vCPU stops: no device has failed, and none is away (a restart under
        way), waiting for those up to the devices' deadline while the VM runs on. Paused
        first, the guest stood still for the whole wait, even for a device it never used."""
        for slot in self.machine.slots:  # every one, before waiting for any
            _refuse_failed(slot)
        until = time.monotonic() + self.device_deadline_s
        for slot in self.machine.slots:
            if not slot.wait_back(max(0.0, until - time.monotonic())):
                _refuse_failed(slot)
                raise ControlBusy(
                    f"device {slot.name} is away (restarting) and not back within "
                    f"{self.device_deadline_s:g} s; try again once it is"
                )

    def _quiesce_devices(
        self, deadline: Deadline, quiesced: dict[str, tuple[int, int]]
    ) -> dict[str, _Saved]:
        """Each device's lives (slot.lives) when its quiesce was answered, and the state it
        saved; `quiesced` gets the lives as each answers. A device away when asked (a crash
        since _devices_back) is asked once it is back: the process that answers is the one
        quiesced, and a snapshot taken just after a crash stands."""
        states = {}
        for slot in self.machine.slots:
            _refuse_failed(slot)
            self._ask(slot, "quiesce", deadline)
            lives = slot.quiesced_lives
            assert lives is not None  # set under the slot's lock with the answer
            quiesced[slot.name] = lives
            states[slot.name] = lives, self._ask(slot, "save", deadline)
            with self._held_lock:
                self._saved.add(slot.name)
        return states

    def _check_generations(self, states: dict[str, _Saved]) -> None:
        """Every device is still the process that was quiesced and saved its state. One that
        crashed since was replaced, or will be, by a process that is not quiesced: it may
        have served its queues while guest RAM was copied, so the saved state would not
        match the RAM. (Its slot counts the crash before it asks for the replacement.)"""
        for slot in self.machine.slots:
            crashes, generation = states[slot.name][0]
            if slot.lives == (crashes, generation):
                continue
            if slot.failed:
                what = f"failed while the snapshot was taken ({slot.failed})"
            elif slot.generation != generation:
                what = "crashed and was restarted while the snapshot was taken"
            else:
                what = "crashed while the snapshot was taken"
            refused = ControlError if slot.failed else ControlBusy  # back later: ctl's 75
            raise refused(
                f"snapshot aborted: device {slot.name} {what}: its saved state may not match "
                "guest memory" + ("" if slot.failed else "; take it again once it is back")
            )

    def _ask(self, slot: DeviceSlot, op: str, deadline: Deadline) -> dict[str, object]:
        """One control request in the time the snapshot's deadline has left. A process that
        died before it answered its quiesce (its end not seen yet when it was asked) saved
        nothing: the process that replaces it is asked, as one away when asked would be."""
        limit = f"the devices get {self.device_deadline_s:g} s in all to quiesce, save and resume"
        failure: DeviceFailure | None = None
        for attempt in (1, 2):
            timeout_ms = min(CONTROL_TIMEOUT_MS, deadline.remaining_ms())
            if timeout_ms <= 0:
                if failure is None:
                    raise ControlError(f"snapshot aborted before {slot.name} could {op}: {limit}")
                break  # its crash took the time its restart needed
            try:
                with deadline.counting():
                    return slot.control(op, timeout_ms)
            except DeviceFailure as e:
                failure = e
                if op != "quiesce" or attempt == 2 or slot.failed:
                    break
                # restarting (on_crash = restart): its next process answers
        assert failure is not None  # every way out of the loop but a reply sets it
        refused = ControlError if slot.failed else ControlBusy  # back later: ctl's 75
        raise refused(f"snapshot aborted at {op}: {failure} ({limit})")

    def _resume_devices(self, quiesced: dict[str, tuple[int, int]], deadline: Deadline) -> None:
        """Resume each device quiesced that is still that process. One never asked (an
        earlier device ended the snapshot) is not quiesced; one whose quiesce was not
        answered has failed (its on_crash policy applies); and a crash since (its lives
        changed) put in, or will put in, a process that was never quiesced: waiting to resume
        it held the vCPUs for as long as its restart took."""
        for slot in self.machine.slots:
            if not slot.failed and quiesced.get(slot.name) == slot.lives:
                timeout_ms = max(RESUME_FLOOR_MS, min(CONTROL_TIMEOUT_MS, deadline.remaining_ms()))
                try:
                    with deadline.counting():
                        slot.control("resume", timeout_ms)
                except DeviceFailure as e:
                    log.error("%s", e)  # the device's on_crash policy has been applied

    def _write(
        self,
        target: Path,
        deadline: Deadline,
        quiesced: dict[str, tuple[int, int]],
        tracker: DirtyTracker | None,
        stop: Callable[[], None],
        stays_stopped: bool,
    ) -> SnapshotWriter:
        """Every chunk written, not yet committed: the caller commits it (or it aborts on
        leaving its `with`). The VM is stopped (`stop`) when it returns. With `tracker`, it
        runs at first: its RAM is copied while it runs (the first pass), and what it wrote
        meanwhile as long as that shrinks (again()), then stopped, then what it wrote since
        the last pass is copied again (snapshot/ram.py sparse-v2). `stays_stopped`: the VM
        runs again only after the commit, so the RAM file goes to the disk as it is written
        (SnapshotWriter.add_ram's writeback); a pause that ends with the copy does not wait
        for that."""
        m = self.machine
        # the target's directory was swept before the pause (_snapshot)
        if tracker is None:
            states = self._stop_and_save(deadline, quiesced)
            w = SnapshotWriter(target, config_to_dict(m.cfg), states.cpuid(), m.mem, sweep=False)
        else:
            w = SnapshotWriter(target, config_to_dict(m.cfg), None, m.mem, sweep=False)
        with contextlib.ExitStack() as on_error:
            on_error.callback(w.abort)
            if tracker is None:
                w.add_ram(m.mem, writeback=stays_stopped)
            else:
                saved: list[_States] = []

                def stopped() -> list[tuple[int, int]]:
                    try:
                        stop()
                        saved.append(self._stop_and_save(deadline, quiesced))
                        return tracker.take()
                    except OSError as e:  # (KvmError) not the RAM chunk's: the writer would say so
                        raise _NotRam(e) from e

                def end_if_stopping(done: int, total: int) -> None:
                    if m.stopping:  # the copy is of no use now: let the VM's end go on
                        raise ControlError(f"VM {m.cfg.vm.name!r} stopped while it was saved")

                def again(held: int) -> list[tuple[int, int]] | None:
                    """Another pass while the VM runs, of what it wrote during the pass
                    before (`held` bytes), where that is too much for the pause and at most
                    half of it: each pass is shorter, and what the next must copy
                    shrinks with it (as a live migration converges). Else the pause copies
                    it, with what comes after."""
                    harvested = self._harvest_device_marks(Deadline(self.device_deadline_s))
                    try:
                        written = tracker.written(harvested)
                    except OSError as e:  # (KvmError) as in stopped()
                        raise _NotRam(e) from e
                    size = sum(length for _, length in written)
                    if size <= PAUSE_COPY_BYTES or size > held // 2 or m.stopping:
                        return None
                    tracker.copying()
                    return written

                # A deadline of their own: the VM runs meanwhile, and a device slow to answer
                # here must not leave its quiesce, save and resume less time in the pause.
                tracker.start(self._harvest_device_marks(Deadline(self.device_deadline_s)))
                try:
                    w.add_ram_precopy(m.mem, stopped, end_if_stopping, again)
                except _NotRam as e:
                    raise e.error from None
                states = saved[0]
                w.set_cpuid(states.cpuid())
            for i, vcpu in enumerate(states.vcpus):
                w.add_json_chunk("vcpu", f"vcpu{i}", vmstate.VcpuState.VERSION, vcpu)
            w.add_json_chunk("vm", "vm", vmstate.VmState.VERSION, states.vm)
            pci = pcistate.save(m.functions, m.routes, m.config_ports)
            w.add_json_chunk("vm", pcistate.CHUNK, pcistate.PciState.VERSION, pci)
            for slot in m.slots:
                doc = states.devices[slot.name][1]
                version = doc["version"]
                if not isinstance(version, int):  # control.check_reply passes no other
                    raise ControlError(f"device {slot.name} saved a state with no version")
                w.add_json_chunk("device", slot.name, version, doc["fields"], model=slot.model)
            self._check_generations(states.devices)  # RAM is copied: later crashes are held
            on_error.pop_all()
        return w

    def _harvest_device_marks(self, deadline: Deadline) -> set[str]:
        """Before each pass of a live snapshot's copy, the VM running: each device moves the
        marks of its dirty bitmap into the bitmap's harvest, on its own thread, between
        requests (protocol/control.py harvest_dirty), so that the pass (and at last the pause)
        copies what it wrote since the pass before, not all it wrote since the first, or since
        the VM started. The names of those that answered: the tracker reads their harvests.
        One that does not answer keeps its marks, which only adds to a later pass or to the
        pause: its crash is its on_crash policy's, and the snapshot's pause finds out the rest."""
        harvested: set[str] = set()
        floor_ms = min(HARVEST_FLOOR_MS, deadline.limit_s * 1000)
        for slot in self.machine.slots:
            timeout_ms = min(CONTROL_TIMEOUT_MS, deadline.remaining_ms())
            if timeout_ms <= 0 or timeout_ms < floor_ms:
                break  # the rest keep their marks: asked with less, one could be failed
            try:
                with deadline.counting():
                    slot.control("harvest_dirty", timeout_ms)
            except DeviceFailure as e:
                log.warning("device %s keeps its dirty marks: %s", slot.name, e)
                continue
            harvested.add(slot.name)
        return harvested

    def _stop_and_save(self, deadline: Deadline, quiesced: dict[str, tuple[int, int]]) -> _States:
        """The devices quiesced and their states, then the VM's and the vCPUs' (the vCPUs
        parked already)."""
        m = self.machine
        device_states = self._quiesce_devices(deadline, quiesced)
        # The irqchip before the LAPICs: an interrupt a device raised before it quiesced
        # reaches the IOAPIC from a kernel worker, at any moment. Landing between the two
        # reads, it is then in the saved LAPIC; the other way round the saved IOAPIC pin
        # waited for an EOI of a vector no saved LAPIC held, and stayed dead once restored.
        vm_state = vmstate.to_dict(vmstate.save_vm(m.vm, m.firmware_id, m.ged.events))
        host = vmstate.VcpuHost.probe(m.kvm, m.vm)
        vcpu_states = [vmstate.to_dict(vmstate.save_vcpu(fd, host)) for fd in m.vcpu_fds]
        return _States(device_states, vm_state, vcpu_states)


class _NotRam(Exception):
    """An OSError of stopping and saving the VM inside a live snapshot's RAM copy, carried
    past the RAM writer, which would name the RAM chunk in it."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _States(NamedTuple):
    """What a snapshot saves of a stopped VM besides its RAM."""

    devices: dict[str, _Saved]
    vm: dict[str, object]
    vcpus: list[dict[str, object]]

    def cpuid(self) -> object:
        """What the manifest records: the first vCPU's."""
        return self.vcpus[0]["cpuid"]


def _refuse_failed(slot: DeviceSlot) -> None:
    if slot.failed:
        raise ControlError(f"device {slot.name} has failed; the VM cannot be saved")


def _identity(directory: Path) -> tuple[int, int]:
    st = os.stat(directory)
    return st.st_dev, st.st_ino


def _bytes_in(target: Path) -> int:
    """What a committed snapshot holds on disk; 0 if it was moved or removed since (by
    whoever archives it): it was written all the same, and a suspend must still stop."""
    try:
        return sum(p.stat().st_size for p in target.iterdir())
    except OSError:
        return 0
