"""DeviceSlot (monitor/slot.py) without a device process: its restart budget, and what an
access gets while no device serves the slot. tests/integration/test_slot.py has the rest."""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
import resource
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitvmm.devprocs import runtime
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.serial import Reg, Uart8250
from splitvmm.devprocs.virtio_console import VirtioConsole
from splitvmm.devprocs.virtio_rng import VirtioRng
from splitvmm.errors import ConfigError, DeviceFailure, KvmError
from splitvmm.fdline import FdLine
from splitvmm.monitor import slot as slot_module
from splitvmm.monitor.channel import GONE_WAIT_MS, ChannelError
from splitvmm.monitor.irqroutes import GsiRoutes, MsiVectors
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import (
    MAX_AHEAD_COUNTED,
    MAX_JOURNAL,
    Checkpoint,
    DeviceSlot,
    RestartBudget,
    SlotState,
    Spawn,
    mark_shared_outputs,
    refuse_outputs_on_disks,
)
from splitvmm.monitor.supervisor import Supervisor
from splitvmm.native.routing import MsiRoute
from splitvmm.protocol import control, events, wire
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.sandbox.launcher_start import LauncherError
from splitvmm.sandbox.spawn import DeviceProcess, listen_channel
from tests.fakes import FakeIrq
from tests.unit.test_virtio_console import Host, started, transmit
from tests.virtio.support import Driver


def test_restart_budget_within_burst_allows_each_restart():
    budget = RestartBudget(burst=3, interval_s=10)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]


def test_restart_budget_over_burst_within_interval_refuses():
    budget = RestartBudget(burst=2, interval_s=10)
    budget.take(0.0)
    budget.take(1.0)
    assert (budget.take(9.9), budget.remaining(9.9)) == (False, 0)


def test_restart_budget_once_interval_passed_allows_again():
    budget = RestartBudget(burst=2, interval_s=10)
    budget.take(0.0)
    budget.take(1.0)
    assert (budget.take(10.0), budget.remaining(10.0)) == (True, 0)


class Failures(list[str]):
    def __call__(self, slot: DeviceSlot, reason: str) -> None:
        self.append(reason)


def refuse(spec: DeviceSpec) -> tuple[object, int]:
    raise DeviceFailure(f"device {spec.name}: the launcher refused it")


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def slot(tmp_path: Path, failures: Failures) -> DeviceSlot:
    return DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, failures)


def test_slot_read_while_away_past_wait_reads_all_ones(slot, monkeypatch):
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 0)
    assert (slot.read(0, 2), slot.state, slot.waiting) == (b"\xff\xff", SlotState.AWAY, 0)


def test_slot_control_waits_for_an_away_device_no_longer_than_its_timeout(slot, monkeypatch):
    """A snapshot's control request gets the time the snapshot's deadline has left: it used
    to wait RESTART_WAIT_MS / AWAY_WAIT_MS whatever it was given, with every vCPU paused."""
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 3_600_000)  # a wait would hang the test
    start = time.monotonic()
    with pytest.raises(DeviceFailure, match="serial0 is away"):
        slot.control("quiesce", timeout_ms=50)
    assert time.monotonic() - start < 5


def test_slot_failed_reads_all_ones_without_waiting(slot, monkeypatch, failures):
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 3_600_000)  # a wait would hang the test
    slot.fail("its process was killed")
    slot.fail("a second reason")
    assert (slot.read(0, 1), slot.state, failures) == (
        b"\xff",
        SlotState.FAILED,
        ["its process was killed"],
    )


def test_slot_control_when_failed_raises_naming_device_and_reason(slot):
    slot.fail("its process was killed")
    with pytest.raises(DeviceFailure, match="device serial0 has failed: its process was killed"):
        slot.control("save")


def test_slot_start_refused_by_spawner_leaves_slot_empty(slot):
    with pytest.raises(DeviceFailure, match="device serial0: the launcher refused it"):
        slot.start()
    assert (slot.process, slot.generation, slot.state) == (None, 0, SlotState.AWAY)


def test_slot_start_when_failed_raises(slot):
    slot.fail("its process was killed")
    with pytest.raises(DeviceFailure, match="device serial0: its slot is failed, not empty"):
        slot.start()


def test_slot_counts_forwarded_reads_and_writes(slot, monkeypatch):
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 0)
    slot.read(0, 1)
    slot.write(0, b"A")
    slot.write(1, b"B")
    assert (slot.reads, slot.writes) == (1, 2)


class PostedFrames(list[bytes]):
    """A channel that keeps the slot's answers to events (DeviceChannel.answer)."""

    def answer(self, frame: bytes) -> None:
        self.append(frame)


class RoutingVm:
    def __init__(self) -> None:
        self.tables: list[list[object]] = []

    def set_gsi_routing(self, routes: list[object]) -> None:
        self.tables.append(list(routes))


def msi_slot(tmp_path: Path, failures: Failures) -> tuple[DeviceSlot, PostedFrames, RoutingVm]:
    vm = RoutingVm()
    routes = GsiRoutes(vm)
    msi = MsiVectors("blk0", routes, routes.allocate(2, "blk0"))
    spawn = Spawn("blk0", "serial", 8, msi=msi)
    slot = DeviceSlot(spawn, tmp_path, refuse, failures)
    posted = PostedFrames()
    slot.channel = posted
    return slot, posted, vm


def test_slot_msi_event_in_range_is_routed_and_answered_ok(tmp_path, failures):
    slot, posted, vm = msi_slot(tmp_path, failures)
    slot._on_event(events.MsiRequest(9, 1, 0xFEE0_0000, 0x41))
    answer = control.decode(posted[0])
    assert ((answer["id"], answer["ok"]), vm.tables[-1][-1]) == (
        (9, True),
        MsiRoute(25, 0xFEE0_0000, 0x41),
    )


def test_slot_msi_event_out_of_range_is_refused_with_a_reason(tmp_path, failures):
    slot, posted, vm = msi_slot(tmp_path, failures)
    slot._on_event(events.MsiRequest(9, 5, 0xFEE0_0000, 0x41))
    answer = control.decode(posted[0])
    assert (answer["ok"], answer["reason"], vm.tables) == (
        False,
        "vector 5 is past the 2 MSI-X vectors of blk0",
        [],
    )


def test_slot_msi_route_refused_is_said_once_a_second_naming_the_device(tmp_path, failures, caplog):
    """A refused route leaves the guest's vector silent for good: the device is told why,
    and the operator too, at most once a second however often the device asks."""
    slot, posted, vm = msi_slot(tmp_path, failures)
    with caplog.at_level(logging.WARNING, logger="splitvmm.slot"):
        for _ in range(3):
            slot._on_event(events.MsiRequest(9, 1, 0xFEE0_0000, 0x0401))  # delivery mode NMI
    lines = [r.getMessage() for r in caplog.records if "not routed" in r.getMessage()]
    assert lines == [
        "device blk0: MSI-X vector 1 not routed: data 0x401: delivery mode 100 is not fixed "
        "or lowest priority"
    ]
    assert vm.tables == []


def test_slot_msi_route_the_host_refused_is_said_though_a_guests_refusal_was_just_said(
    tmp_path, failures, caplog
):
    """The host's refusal (KVM_SET_GSI_ROUTING failed) was logged apart before refused routes
    were said at all; rate-limited with them, a guest's refused request hid it."""
    slot, posted, vm = msi_slot(tmp_path, failures)

    def refused(routes: list[object]) -> None:
        raise KvmError(errno.ENOMEM, "KVM_SET_GSI_ROUTING")

    with caplog.at_level(logging.WARNING, logger="splitvmm.slot"):
        slot._on_event(events.MsiRequest(9, 1, 0xFEE0_0000, 0x0401))  # delivery mode NMI
        vm.set_gsi_routing = refused  # type: ignore[method-assign]
        slot._on_event(events.MsiRequest(10, 0, 0xFEE0_0000, 0x41))
    lines = [r.getMessage() for r in caplog.records if "not routed" in r.getMessage()]
    assert len(lines) == 2 and "the host refused the route: KVM_SET_GSI_ROUTING" in lines[1]


def test_slot_msi_event_from_device_without_vectors_is_refused(slot):
    posted = PostedFrames()
    slot.channel = posted
    slot._on_event(events.MsiRequest(1, 0, 0xFEE0_0000, 0x41))
    assert control.decode(posted[0])["reason"] == "serial devices have no MSI-X vectors"


def test_slot_msi_request_in_an_ended_process_last_words_is_not_answered(tmp_path, failures):
    """Drained from a process that ended (process_ended: its last checkpoint): the answer
    could not go, and its send failing ended the drain, losing whatever the dead process
    published after the request (a restart then replays from an older checkpoint)."""
    slot, posted, _ = msi_slot(tmp_path, failures)
    state = {"version": MODELS["serial"].state_version}

    def last_words(limited: bool) -> None:
        slot._on_event(events.MsiRequest(9, 1, 0xFEE0_0000, 0x41))
        slot._on_event(events.Published(state, None, None))

    slot._drain_events_locked(SimpleNamespace(drain_events=last_words))  # type: ignore[arg-type]

    assert (list(posted), slot.last_state) == ([], state)


# -- a stall: the device asks for the VM's pause (protocol/events.py) -------------------------
def stall_slot(
    tmp_path: Path, failures: Failures, on_full: str = "pause"
) -> tuple[DeviceSlot, list[str]]:
    stalls: list[str] = []
    spawn = Spawn("blk0", "virtio-blk", 8, options={"path": "disk.img", "on_full": on_full})
    slot = DeviceSlot(
        spawn, tmp_path, refuse, failures, on_stall=lambda s: stalls.append(s.stalled)
    )
    return slot, stalls


class RetryChannel:
    """A live device's channel for control requests: the events it read before each reply
    (the device sent them before it took the request) reach the slot first."""

    def __init__(self, slot: DeviceSlot) -> None:
        self.slot = slot
        self.asked: list[str] = []
        self.before_reply: list[events.Event] = []
        self.mirror = RegisterMirror(())

    def control(self, op: str, timeout_ms: int, args: object = None) -> dict[str, object]:
        self.asked.append(op)
        for event in self.before_reply:
            self.slot._on_event(event)
        return {"op": "retrying", "seq": 1}


def live_stall_slot(
    tmp_path: Path, failures: Failures
) -> tuple[DeviceSlot, list[str], RetryChannel]:
    slot, stalls = stall_slot(tmp_path, failures)
    channel = RetryChannel(slot)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    return slot, stalls, channel


def test_slot_stall_is_passed_on_once_until_the_device_retries(tmp_path, failures):
    slot, stalls, channel = live_stall_slot(tmp_path, failures)

    slot._on_event(events.Stall("full \u202e"))
    slot._on_event(events.Stall("full again"))  # the pause is under way: nothing new
    stalled = slot.stalled
    slot.resume_stalled()
    slot.resume_stalled()  # not stalled now: the device is asked nothing

    assert (stalls, stalled, channel.asked, slot.stalled) == (
        ["full \\u202e"],
        "full \\u202e",
        ["retry"],
        None,
    )


def test_slot_stall_sent_before_the_retry_is_old_news(tmp_path, failures):
    """A second stall event the device sent before it took the retry (after a snapshot, a
    restart) is read with the retry's reply: it must not pause the VM the operator just
    resumed. One read after the reply is the retry's own: a new stall."""
    slot, stalls, channel = live_stall_slot(tmp_path, failures)
    slot._on_event(events.Stall("full"))
    channel.before_reply.append(events.Stall("full, said again"))

    slot.resume_stalled()
    after_retry = (list(stalls), slot.stalled)
    slot._on_event(events.Stall("still full"))

    assert after_retry == (["full"], None)
    assert (stalls, slot.stalled) == (["full", "still full"], "still full")


def test_slot_failed_retry_keeps_the_stall_of_the_process_that_replaced_it(
    tmp_path, failures, monkeypatch
):
    """The retry meets a dead process; its restart (a warm spare: a few ms) is back and
    stalled anew before resume_stalled() takes the lock again: that stall is kept, or the
    VM would run on with the device's requests held for ever."""
    slot, stalls, _ = live_stall_slot(tmp_path, failures)
    slot._on_event(events.Stall("full"))

    def retry_meets_a_restart(op: str, *args: object, **kw: object) -> dict[str, object]:
        slot.generation += 1  # the new process, READY and stalled meanwhile
        slot.stalled = None
        slot._on_event(events.Stall("full, the new process"))
        raise DeviceFailure("device blk0: its process ended")

    monkeypatch.setattr(slot, "control", retry_meets_a_restart)
    slot.resume_stalled()

    assert (slot.stalled, stalls) == ("full, the new process", ["full", "full, the new process"])


def test_slot_stall_in_an_ended_process_last_words_is_not_passed_on(tmp_path, failures):
    """Drained from a process that ended (its restart's checkpoint): its successor retries,
    and stalls itself if it must; the VM is not paused for the dead one."""
    slot, stalls = stall_slot(tmp_path, failures)
    dead = SimpleNamespace(drain_events=lambda limited: slot._on_event(events.Stall("full")))

    slot._drain_events_locked(dead)  # type: ignore[arg-type]

    assert (stalls, slot.stalled) == ([], None)


@pytest.mark.parametrize(
    ("model", "on_full", "error"),
    [
        ("virtio-blk", "error", "asked to pause the VM, which its on_full is not 'pause'"),
        ("serial", None, "asked to pause the VM, which its model may not"),
    ],
)
def test_slot_stall_from_a_device_not_allowed_to_is_a_broken_channel(
    tmp_path, failures, model, on_full, error
):
    """A stall pauses the VM: only a model that declares it (pause_option), and only where
    the operator chose "pause". Anything else is a device gone wrong."""
    stalls: list[str] = []
    options = {} if on_full is None else {"on_full": on_full}
    spawn = Spawn("dev0", model, 8, options=options)
    slot = DeviceSlot(
        spawn, tmp_path, refuse, failures, on_stall=lambda s: stalls.append(s.stalled)
    )
    with pytest.raises(ChannelError, match=re.escape(error)):
        slot._on_event(events.Stall("full"))
    assert stalls == [] and slot.stalled is None


# -- host input: no more than the device's last input_room says it has room for ---------------
class InputChannel(list[bytes]):
    """A live device's channel: keeps the frames posted to it; drain_events() hands the slot
    the events the test queued (as the channel does with the device's)."""

    connection_ended = False  # a post that fails finds the process dead, not the connection

    def __init__(self, slot: DeviceSlot) -> None:
        super().__init__()
        self.slot = slot
        self.events: list[events.Event] = []
        self.mirror = RegisterMirror(())

    def drain_events(self) -> None:
        queued, self.events = self.events, []
        for event in queued:
            self.slot._on_event(event)

    fail_at: int | None = None  # the post that finds the process dead

    def post(self, frame: bytes) -> None:
        if len(self) == self.fail_at:
            raise ChannelError("its process ended with a posted write unsent")
        self.append(frame)

    def post_many(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.post(frame)

    def typed(self) -> bytes:
        return b"".join(wire.decode_access(frame, 8).data for frame in self)


@pytest.fixture
def live(slot: DeviceSlot) -> InputChannel:
    channel = InputChannel(slot)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    return channel


def test_slot_input_before_the_device_said_its_room_sends_nothing(slot, live):
    assert (slot.input(b"typed"), live) == (0, [])


def test_slot_input_sends_what_the_room_allows_and_more_once_the_guest_made_room(slot, live):
    live.events.append(events.InputRoom(0, 10))
    first = slot.input(b"x" * 25)
    again = slot.input(b"x" * 15)  # none of its room is left
    live.events.append(events.InputRoom(4, 10))  # the guest read some: 10 - (10 - 4) = 4
    third = slot.input(b"y" * 15)
    assert (first, again, third, live.typed()) == (10, 0, 4, b"x" * 10 + b"y" * 4)
    assert (slot.reads, slot.writes) == (0, 0)  # host input is no guest access


def test_slot_input_while_quiesced_sends_nothing_and_after_the_resume_goes(slot, live):
    live.events.append(events.InputRoom(0, 10))
    slot._quiesced = True
    held = slot.input(b"abc")
    slot._quiesced = False
    assert (held, slot.input(b"abc"), live.typed()) == (0, 3, b"abc")


def test_slot_input_to_a_device_failed_for_good_says_none_will_take_it(slot, live):
    slot.state = SlotState.FAILED
    assert (slot.input(b"abc"), live) == (None, [])


def test_slot_input_room_claiming_more_than_was_sent_fails_the_device(slot, live, failures):
    live.events.append(events.InputRoom(5, 100))
    assert slot.input(b"abc") == 0
    assert failures == ["said it received 5 bytes of input, but was sent 0"]


class Dead:
    pid = 1

    def ended(self) -> bool:
        return True


def test_slot_input_failing_while_a_restart_replaces_the_process_leaves_the_new_count(
    slot, live, monkeypatch
):
    """A post finds the process dead; failing it waits for the supervisor (the slot's lock
    released), and meanwhile a restart brings a new process in, whose count starts at 0.
    What the dead one was sent must not be counted against the new one: it was, and the
    new process's room looked used up for its whole life."""
    live.events.append(events.InputRoom(0, 4096))
    live.fail_at = 3
    slot.process, slot.supervised = Dead(), True
    new = InputChannel(slot)

    def restart_meanwhile(timeout: float | None = None) -> bool:
        slot.process, slot.channel = Dead(), new  # type: ignore[assignment]
        slot._input_sent, slot._input_room = 0, None  # attach()
        new.events.append(events.InputRoom(0, 4096))  # the new process's first report
        return True

    monkeypatch.setattr(slot._back, "wait", restart_meanwhile)
    taken = slot.input(b"x" * 64)
    monkeypatch.undo()
    assert (taken, slot._input_sent, slot.input(b"y" * 4096)) == (32, 0, 4096)


# -- the warm spare: what it is given, and a spawner refusing it -------------------------------
def test_slot_spare_spec_holds_no_state_resume_or_fault(tmp_path, failures):
    """The slot's last known state and an armed fault stay with the slot: a spare gets
    them only when it takes over (a deferred spec)."""
    specs: list[DeviceSpec] = []

    def record(spec: DeviceSpec) -> tuple[object, int]:
        specs.append(spec)
        raise DeviceFailure(f"device {spec.name}: recorded")

    state = {"model": "serial", "version": 1, "fields": {}}
    spawn = Spawn("serial0", "serial", 8, state=state, fault={"kind": "crash", "after": 3})
    slot = DeviceSlot(spawn, tmp_path, record, failures, resumer=lambda p, s: None)
    slot.start_spare()
    (spec,) = specs
    assert (spec.deferred, spec.rest()) == (True, dict.fromkeys(("state", "resume", "fault")))


def test_slot_spare_refused_is_logged_and_fails_nothing(tmp_path, failures, caplog):
    slot = DeviceSlot(
        Spawn("serial0", "serial", 8), tmp_path, refuse, failures, resumer=lambda p, s: None
    )
    slot.start_spare()
    assert (slot.spare_pid, slot.state, failures) == (0, SlotState.AWAY, [])
    assert "serial0: no warm spare (device serial0: the launcher refused it)" in caplog.text


def test_slot_without_resumer_starts_no_spare(tmp_path, failures):
    asked: list[DeviceSpec] = []
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, asked.append, failures)
    slot.start_spare()
    assert asked == []


class DyingChannel:
    """A channel whose process dies on every read (each restart brings another such)."""

    reads = 0
    mirror = RegisterMirror(())  # mirrors nothing: every read goes to the device

    def read(self, offset: int, size: int) -> bytes:
        DyingChannel.reads += 1
        if DyingChannel.reads > 5:
            raise AssertionError("the read was retried without bound")
        raise ChannelError("its process ended during a request")


def test_slot_read_that_kills_every_process_is_sent_twice_then_reads_all_ones(slot, monkeypatch):
    """Once to the process, once more to the next: a vCPU is never held by restarts that
    each come back in time (within restart_window / max_restarts)."""
    DyingChannel.reads = 0
    slot.state, slot.channel = SlotState.LIVE, DyingChannel()
    restarts: list[str] = []

    def restarted_at_once(why: str) -> None:
        restarts.append(why)
        slot.channel = DyingChannel()  # the next process, live at once

    monkeypatch.setattr(slot, "_channel_failed_locked", restarted_at_once)

    assert (slot.read(2, 1), DyingChannel.reads, len(restarts)) == (b"\xff", 2, 2)


# -- a restart after a process that did not end --------------------------------------------------
class Outlived:
    """A killed process whose end the launcher reported with its device proper still running
    (a write to a stalled disk that does not finish), or whose end never came."""

    pid = 4242

    def __init__(self, lingered: bool, ends: bool = True) -> None:
        self._lingered, self._ends = lingered, ends

    def kill(self) -> None:
        pass

    def wait(self, timeout_s: float) -> int:
        if not self._ends:
            raise TimeoutError(f"process {self.pid} still runs after {timeout_s:g} s")
        return -9

    def lingered(self) -> bool:
        return self._lingered

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("readonly", "lingered", "ends", "restarted"),
    [
        (False, True, True, False),  # a writer still running: no second writer
        (False, False, False, False),  # its end never reported: the same
        (False, False, True, True),  # gone: restarted
        (True, True, True, False),  # a reader still running: its reads land in guest RAM
        (True, False, True, True),
    ],
    ids=["writer-lingering", "writer-never-ended", "writer-gone", "reader-lingering", "reader"],
)
def test_slot_restarts_no_disk_device_while_the_old_process_may_still_do_io(
    tmp_path, failures, readonly, lingered, ends, restarted
):
    """A successor on the same image while the old process may still do I/O there would
    have its writes overtaken by the old one's, and guest buffers it reused written by the
    old one's reads: the device fails for good instead."""
    options = {"path": "disk.img", "readonly": readonly}
    slot = DeviceSlot(Spawn("blk0", "virtio-blk", 0x6000, options=options), tmp_path, refuse,
                      failures)  # fmt: skip
    slot.process, slot.restarting = Outlived(lingered, ends), True  # type: ignore[assignment]

    with pytest.raises(DeviceFailure) as raised:
        slot.restart()

    if restarted:  # it went on to start a new process, which the spawner refused
        assert "the launcher refused it" in str(raised.value)
    else:
        assert "cannot be restarted: its process did not end" in str(raised.value)
        assert slot.state is SlotState.FAILED and "did not end" in str(slot.failed)


class Unreaped(Outlived):
    """A process that ended (its pidfd polls readable) after its launcher was gone: nobody
    reaps it or says whether its device proper ended."""

    def wait(self, timeout_s: float) -> int:
        raise LauncherError("the launcher has exited")

    def ended(self) -> bool:
        return True


def test_end_of_a_process_whose_launcher_is_gone_says_it_ended_not_that_it_did_not(caplog):
    """A teardown after the launcher died (SIGKILLed, or a unit's stop signalling every
    process) logged "did not end" as an error for each device that had ended."""
    gone = slot_module._end("blk0", Unreaped(lingered=False), None)  # type: ignore[arg-type]

    assert gone is False  # its device proper may still run: no successor on its disk
    assert "did not end" not in caplog.text
    assert "device blk0 (pid 4242) ended, but the launcher has exited" in caplog.text


class OrphanedByLauncher(DeviceProcess):
    """A process that ended before READY after its launcher died (SIGKILLed while a restart
    started it cold): the launcher is the one that reaps it, and it is gone."""

    def _reap(self) -> int:
        raise LauncherError("the launcher has exited")


def test_slot_restart_whose_process_ends_with_its_launcher_fails_the_device_naming_it(
    tmp_path, failures
):
    """Before READY, the restart asked how the new process ended, and the launcher's error
    escaped the restart: the restarter logged a monitor bug with its traceback ("internal
    error in its restart") and the slot stayed away, restarting, for good."""
    ended = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(ended.pid)
    ended.wait()  # reaped: its pidfd polls readable as the ended device's does
    process = OrphanedByLauncher(ended.pid, pidfd)

    def spawner(spec: DeviceSpec) -> tuple[DeviceProcess, int]:
        return process, listen_channel(spec.channel.removeprefix("ipc://")).detach()

    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, spawner, failures)
    slot.restarting = True  # a crash the policy restarts: away until restart() is done

    try:
        with pytest.raises(DeviceFailure, match="device serial0: its restart failed: .*launcher"):
            slot.restart()
        assert slot.state is SlotState.FAILED
    finally:
        slot.close()  # its channel: the context ends only once its sockets are closed
    assert len(failures) == 1 and "the launcher has exited" in failures[0]


# -- writes KVM held (monitor/writebehind.py) --------------------------------------------------
LSR, THR = 5, 0


class HeldChannel(InputChannel):
    """A live serial device's channel with a current MIRROR of LSR (credit for `credit` THR
    writes), counting the times the slot asked for the device's news."""

    def __init__(self, slot: DeviceSlot, credit: int) -> None:
        super().__init__(slot)
        self.mirror = RegisterMirror(((LSR, 1),))
        self.mirror.take(wire.Mirror((b"\x60",), THR, credit, 0))
        self.messages: list[list[bytes]] = []
        self.drains = 0

    def drain_events(self) -> None:
        self.drains += 1
        super().drain_events()

    def post_many(self, frames: list[bytes]) -> None:
        self.messages.append(list(frames))
        self.extend(frames)


def test_slot_on_a_file_answers_no_read_from_the_mirror_past_half_a_journal(tmp_path, failures):
    """A polled driver on an output the slot counts (a regular file): the mirror's credit
    (65535 THR writes) let it run that far past the last checkpoint received while the
    device lagged, past the MAX_JOURNAL frames a restart replays, and a crash then stopped
    the VM. Past MAX_AHEAD_COUNTED frames the read goes to the device, whose reply comes
    after its checkpoints."""

    class Lagging(HeldChannel):
        forwarded = 0

        def read(self, offset: int, size: int) -> bytes:
            self.forwarded += 1  # applied all before it: its checkpoint comes first
            self.mirror.restamp(self.slot._frames + 1)
            applied = self.slot._frames - self.slot._frames % 256  # (PUBLISH_EVERY_COUNTED)
            self.slot._on_event(events.Published({}, applied, 0))
            return b"\x60"

    out = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        slot = DeviceSlot(
            Spawn("serial0", "serial", 8, fds={"out": out}), tmp_path, refuse, failures
        )
        channel = Lagging(slot, credit=0xFFFF)
        slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
        most = 0
        for _ in range(3 * MAX_AHEAD_COUNTED):  # a THR write, an LSR read
            slot.write(THR, b"x")
            assert slot.read(LSR, 1) == b"\x60"
            most = max(most, slot._frames - slot._checkpoint.applied)
    finally:
        os.close(out)

    assert most <= MAX_AHEAD_COUNTED < MAX_JOURNAL
    assert 0 < channel.forwarded < 10  # the mirror answered the rest


@pytest.fixture
def held(slot: DeviceSlot) -> HeldChannel:
    channel = HeldChannel(slot, credit=4)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    return channel


def test_slot_held_writes_go_as_one_message_each_a_journaled_frame(slot, held):
    slot.write_many([(THR, b"a"), (THR, b"b"), (THR, b"c")])

    assert [wire.decode_access(f, 8).data for f in held.messages[0]] == [b"a", b"b", b"c"]
    assert (len(held.messages), slot.held_writes, slot.writes) == (1, 3, 0)
    assert [n for n, _, _ in slot._journal] == [1, 2, 3]  # replayed to a restarted process


def test_slot_read_after_held_writes_within_credit_is_answered_by_the_mirror(slot, held):
    assert slot.read_held(LSR, 1, held=4, held_at=THR) == b"\x60"
    assert (slot.reads, slot.mirrored_reads, held) == (1, 1, [])


def test_slot_read_after_held_writes_past_credit_is_left_to_the_device(slot, held):
    assert slot.read_held(LSR, 1, held=5, held_at=THR) is None
    assert (slot.reads, slot.mirrored_reads) == (0, 0)  # the read is made, and counted, later


def test_slot_read_after_sent_and_held_writes_counts_both_against_the_credit(slot, held):
    slot.write_many([(THR, b"a"), (THR, b"b"), (THR, b"c")])
    assert slot.read_held(LSR, 1, held=1, held_at=THR) == b"\x60"
    assert slot.read_held(LSR, 1, held=2, held_at=THR) is None


def test_slot_mirrored_values_take_the_devices_news_first(slot, held):
    """What write-behind asks (whether the model wants it now): the newest MIRROR's values."""
    held.mirror.take(wire.Mirror((b"\x20",), THR, 4, 0))
    assert (slot.mirrored_values([LSR]), held.drains) == ([b"\x20"], 1)


def test_slot_mirrored_values_of_a_device_not_live_are_none(slot):
    assert slot.mirrored_values([LSR]) is None


# -- a channel broken by the device's death ------------------------------------------------------
class EndsSoon:
    """A device proper that died: its connection ended with it, and its warden (the process
    the monitor holds) ends a moment later, within any wait for it."""

    pid = 7

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.killed = False

    def ended(self, within_s: float = 0) -> bool:
        self.asked.append(within_s)
        return within_s > 0 or len(self.asked) > 1

    def kill(self) -> None:
        self.killed = True


class Connection:
    def __init__(self, ended: bool) -> None:
        self.connection_ended = ended


def ending_under_supervision(
    slot: DeviceSlot, channel: object, monkeypatch: pytest.MonkeyPatch
) -> tuple[EndsSoon, list[float | None]]:
    """A live, supervised process that is ending, on `channel`; the supervisor's verdict
    (process_ended) comes when the slot waits for it: the process, and the waits made."""
    process = EndsSoon()
    slot.state, slot.process, slot.supervised = SlotState.LIVE, process, True  # type: ignore[assignment]
    slot.channel = channel  # type: ignore[assignment]
    handed_over: list[float | None] = []

    def supervisor_takes_it(timeout: float | None = None) -> bool:
        handed_over.append(timeout)
        slot.state = SlotState.AWAY  # process_ended, with the way the process ended
        return True

    monkeypatch.setattr(slot._back, "wait", supervisor_takes_it)
    return process, handed_over


def test_slot_channel_whose_connection_ended_lets_the_process_end_before_killing_it(
    slot, monkeypatch, failures
):
    """The supervisor then says how it ended (a crash fault's SIGSEGV); killed at once, it
    was reported as SIGKILL (1 CI run in 3, once devices started sooner)."""
    process, handed_over = ending_under_supervision(slot, Connection(ended=True), monkeypatch)
    with slot._lock:
        slot._channel_failed_locked("closed its channel with a posted write unsent")

    assert process.asked[0] == GONE_WAIT_MS / 1000
    assert handed_over and not process.killed and failures == []


def test_slot_channel_broken_with_its_connection_up_fails_the_device_at_once(slot, failures):
    """A protocol error, a missed deadline: the process is alive, and no wait is made."""
    process = EndsSoon()
    slot.state, slot.process, slot.supervised = SlotState.LIVE, process, True
    slot.channel = Connection(ended=False)  # type: ignore[assignment]
    with slot._lock:
        slot._channel_failed_locked("sent a frame of 3 bytes")

    assert process.asked == [0] and process.killed and failures == ["sent a frame of 3 bytes"]


def test_slot_failed_for_good_shows_no_pid_of_its_dead_process(slot, failures):
    """on_crash = leave: the dead process stays in the slot, and `ctl status` showed its
    pid, which the kernel may since have given to another process."""
    slot.state, slot.process = SlotState.LIVE, EndsSoon()  # type: ignore[assignment]
    slot.fail("process was killed by signal 11")

    assert (slot.state, slot.pid, failures) == (
        SlotState.FAILED,
        None,
        ["process was killed by signal 11"],
    )


# -- posted writes across a restart slower than RESTART_WAIT_MS --------------------------------
class RestartChannel(InputChannel):
    """A channel a restart drains (the dead process's last words) and closes; its syncs are
    answered."""

    def drain_events(self, limited: bool = True) -> None:
        super().drain_events()

    def sync(self, drain: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def test_slot_posted_write_that_outwaits_a_slow_restart_still_reaches_the_device(
    tmp_path, monkeypatch
):
    """A posted write waits for a restarting device at most RESTART_WAIT_MS; one that gave up
    was dropped, unjournaled: the device came back without it (a lost THR byte, a lost IER
    or virtio status write), the guest told nothing. Before the restart takes its journal,
    it is replayed; after, it is the new process's first frame once READY."""
    monkeypatch.setattr(slot_module, "RESTART_WAIT_MS", 20)
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    slot.channel, slot.state = RestartChannel(slot), SlotState.LIVE  # type: ignore[assignment]
    slot.fail("crashed")  # the policy restarts it: away, restarting
    slot.write(0, b"A")  # gives up waiting before the restarter's turn
    new, resumes = RestartChannel(slot), []

    def slow_start(resume: dict[str, object]) -> None:  # a cold start on a loaded host
        resumes.append(resume)
        slot.write(0, b"B")  # gives up waiting while the new process starts
        slot.process, slot.channel = Dead(), new  # type: ignore[assignment]

    monkeypatch.setattr(slot, "start", slow_start)
    monkeypatch.setattr(slot, "_wait_restarted", lambda: slot._now_live(slot.process))
    slot.restart()

    (resume,) = resumes
    replayed = [wire.decode_access(base64.b64decode(f), 8).data for f in resume["replay"]]
    assert (replayed, new.typed(), slot.state) == ([b"A"], b"B", SlotState.LIVE)
    with slot._lock:  # its READY confirmed its replay, and the sync after B confirmed B
        again = slot._resume_locked()
    assert (len(again["replay"]), again["confirmed"]) == (2, 2)


# -- the supervisor asking the launcher how a process ended ------------------------------------
class SlowReport(DeviceProcess):
    """An ended process whose end the launcher reports only once `released` (a launcher
    SIGSTOPped, or busy with a new zygote's imports: launcher.REPLY_TIMEOUT_S at most)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        super().__init__(pid, pidfd)
        self.asked, self.released = threading.Event(), threading.Event()

    def _reap(self) -> int:
        self.asked.set()
        self.released.wait(3)  # the lock held past this: the test fails, not hangs
        return -11


def test_slot_process_ended_of_a_process_a_restart_took_holds_no_lock_on_the_launcher(
    tmp_path,
):
    """A process the slot failed itself (a missed deadline) and a restart took out: the
    restart waits for its status from the launcher (_end), and the supervisor's
    process_ended, behind that wait, held the slot's lock, so every access and control
    request (a snapshot's, bounded by its timeout) waited on the launcher too."""
    ended = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(ended.pid)
    ended.wait()
    process = SlowReport(ended.pid, pidfd)
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    slot.state, slot.restarting, slot._failed_process = SlotState.AWAY, True, process
    restart_end = threading.Thread(target=process.wait, args=(5,))
    restart_end.start()  # the restart's _end, waiting for the launcher
    supervisor = threading.Thread(target=slot.process_ended, args=(process,))
    refused = threading.Event()

    def snapshot_request() -> None:
        with pytest.raises(DeviceFailure, match="is away"):
            slot.control("quiesce", timeout_ms=50)
        refused.set()

    try:
        assert process.asked.wait(5)
        supervisor.start()
        time.sleep(0.2)  # it meets the restart's wait (a test that ran early would pass)
        request = threading.Thread(target=snapshot_request)
        request.start()
        assert refused.wait(2), "the request waited for the launcher's answer"
        assert not process.released.is_set()
    finally:
        process.released.set()
        for thread in (restart_end, supervisor):
            thread.join(5)
        process.close()


def test_slot_process_ended_does_not_hold_accesses_while_the_launcher_is_silent(tmp_path, failures):
    """process_ended held the slot's lock while the launcher said how the process ended:
    up to the launcher's 60 s reply timeout, with each vCPU access to the device stuck on
    the lock. The verdict still names how it ended."""
    ended = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(ended.pid)
    ended.wait()
    process = SlowReport(ended.pid, pidfd)
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, failures)
    channel = RestartChannel(slot)
    slot.channel = channel  # type: ignore[assignment]
    slot.process, slot.state = process, SlotState.LIVE
    supervisor = threading.Thread(target=slot.process_ended, args=(process,))
    supervisor.start()
    written = threading.Event()
    try:
        assert process.asked.wait(5)
        vcpu = threading.Thread(target=lambda: (slot.write(0, b"A"), written.set()))
        vcpu.start()  # a vCPU's access while the launcher has not answered
        assert written.wait(2), "the access waited for the launcher's answer"
        assert not process.released.is_set()
    finally:
        process.released.set()
        supervisor.join(5)
        process.close()
    assert failures == ["process was killed by signal 11"]


# -- which replayed frames the dead process is known to have applied -----------------------------
class SyncChannel(InputChannel):
    """A live device's channel whose syncs and reads are answered until its process dies."""

    dead = False

    def sync(self, drain: bool = False) -> None:
        if self.dead:
            raise ChannelError("its process ended before it answered the sync")

    def read(self, offset: int, size: int) -> bytes:
        self.sync()
        return bytes(size)


@pytest.mark.parametrize("answered", ["sync", "read"])
def test_slot_resume_counts_the_frames_an_answer_confirmed(slot, failures, answered):
    """A virtio queue enable is a synced write: applied if its sync was answered; if not, the
    process may have died before it read it, and the restart must not take its used ring as
    what the enable left there (devprocs/virtio/pci.py after_restart). The channel is
    ordered: a read's reply, too, comes after the device applied all sent before it."""
    channel = SyncChannel(slot)  # its mirror mirrors nothing: every read goes to the device
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    slot.write(0, b"\x01")
    assert slot.sync() if answered == "sync" else slot.read(1, 1) == b"\x00"
    slot.write(1, b"\x02")
    channel.dead = True
    assert not slot.sync()
    with slot._lock:
        resume = slot._resume_locked()

    confirmed = {"sync": 1, "read": 2}[answered]  # the read is a frame of the journal too
    assert (len(resume["replay"]), resume["confirmed"]) == (confirmed + 1, confirmed)


def test_slot_resume_says_which_replayed_frames_were_sent_before_the_checkpoint_came(tmp_path):
    """Those were on their way as the device saved it, and applied after (rtc.py serves
    them at its instant); one sent after it came was sent after it, whatever the wall
    clock says (a step back)."""
    slot = DeviceSlot(Spawn("rtc", "rtc", 2), tmp_path, refuse, lambda s, why: True)
    with slot._lock:
        for _ in range(3):
            slot._journal_locked(wire.encode_write(0, b"\x0c"))
        slot._checkpoint_locked(Checkpoint({}, 1, 0))  # covers frame 1; 2 and 3 on their way
        slot._journal_locked(wire.encode_write(0, b"\x0c"))
        resume = slot._resume_locked()
    assert (len(resume["replay"]), resume["posted"]) == (3, 2)


def test_slot_read_waiting_for_its_reply_as_a_checkpoint_comes_counts_as_posted(tmp_path):
    """A device's events come before its reply (DeviceChannel._request), and the read is
    journaled once answered: a checkpoint taken in between counted the read as sent after
    it, and the rtc served it at its sending, bringing back an alarm the guest had read."""

    class ReadChannel(InputChannel):
        def read(self, offset: int, size: int) -> bytes:
            self.drain_events()
            return bytes(size)

    slot = DeviceSlot(Spawn("rtc", "rtc", 2), tmp_path, refuse, lambda s, why: True)
    channel = ReadChannel(slot)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    slot.write(0, b"\x0c")
    channel.events.append(events.Published({"model": "rtc"}, 0, 0))
    slot.read(1, 1)
    with slot._lock:
        resume = slot._resume_locked()
    assert (len(resume["replay"]), resume["posted"]) == (2, 2)


class LateChannel:
    """The spare's channel: no READY within SPARE_READY_TIMEOUT_MS."""

    connection_ended = False

    def wait_ready(self, process: object, timeout_ms: int = 0) -> None:
        raise ChannelError("did not start within 2000 ms, before it was ready")

    def close(self) -> None:
        pass


def test_slot_restart_starts_no_cold_process_on_the_image_a_lingering_spare_still_uses(
    tmp_path, monkeypatch
):
    """The spare took the restart's state and missed its READY deadline (a loaded host): it
    may be serving already, its disk I/O in flight, and once killed its device proper still
    runs (a stalled disk). restart() refuses a successor on the same image while the dead
    process may still do I/O there; the spare's cold successor was started all the same."""
    failures = Failures()
    slot = DeviceSlot(
        Spawn("blk0", "virtio-blk", 0x6000, options={"path": "disk.img"}),
        tmp_path, refuse, failures, resumer=lambda process, spec: None,
    )  # fmt: skip
    slot.restarting = True  # a crash the policy restarts
    slot._spare = (Outlived(lingered=True), os.open(os.devnull, os.O_RDONLY))  # type: ignore[assignment]

    def attach() -> None:
        slot.channel = LateChannel()  # type: ignore[assignment]

    monkeypatch.setattr(slot, "attach", attach)

    with pytest.raises(DeviceFailure) as raised:
        slot.restart()

    assert "cannot be restarted" in str(raised.value) and "did not end" in str(raised.value)
    assert slot.state is SlotState.FAILED


def slots_on_one_file(tmp_path: Path, out: int) -> DeviceSlot:
    """The slot of a virtio-console whose output `out` a serial device writes too (both on
    stdio, their default, with stdout redirected to a file), marked as Machine marks it."""
    window = MODELS["virtio-console"].transport.size
    spawns = [
        Spawn("serial0", "serial", 8, fds={"out": out}),
        Spawn("con0", "virtio-console", window, fds={"out": out}),
    ]
    assert mark_shared_outputs(spawns, log_fd=None) == [["serial0", "con0"]]
    return DeviceSlot(spawns[1], tmp_path, refuse, lambda *a: None)


def test_slot_console_restart_on_a_file_the_serial_writes_too_loses_no_byte(tmp_path):
    """The slot's skip is the file's growth since it was made less what the device had
    emitted at its checkpoint: the growth counted the serial's bytes too, and the restarted
    console dropped as many of its own (`splitvmm up vm.toml > vm.log`, or one console with
    `2>&1`: the monitor's log line about the crash). A file someone else writes is counted
    as a pipe is: a restart may repeat bytes, never drop them."""
    log = tmp_path / "vm.log"  # the operator's `> vm.log`
    stdout = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    host = Host(os.dup(stdout))
    try:
        con_slot = slots_on_one_file(tmp_path, stdout)
        ctx = host.context(FdLine(os.dup(stdout)))
        dev = VirtioConsole(ctx)
        driver, _, tx = started(dev)
        transmit(tx, b"login: ")
        driver.kick(1)
        checkpoint = dev.save()  # the last checkpoint the monitor read
        con_slot._checkpoint = Checkpoint(None, 0, ctx.out.emitted)
        os.write(stdout, b"[serial0] the 8250 prints a line\n")  # the serial, same file
        # the console process dies here, nothing of its own in flight
        resume = con_slot._resume_locked()
        ctx2 = host.context(FdLine(os.dup(stdout)), restarted=True)
        ctx2.out.emitted, ctx2.out.skip = resume["emitted"], resume["skip"]
        new = VirtioConsole.restore(ctx2, checkpoint)
        new.after_restart()
        transmit(tx, b"root\n")
        Driver(new).kick(1)
        transmit(tx, b"# uname -a\n")
        Driver(new).kick(1)
    finally:
        host.close()
        os.close(stdout)

    text = log.read_bytes()
    assert text.replace(b"[serial0] the 8250 prints a line\n", b"") == b"login: root\n# uname -a\n"


def test_mark_shared_outputs_groups_devices_and_the_monitors_log_by_file(tmp_path):
    """A file two devices write, or one device and the monitor's log (`2>&1`), is shared;
    one device alone on a file, or on a pipe, is not."""
    shared = os.open(tmp_path / "vm.log", os.O_WRONLY | os.O_CREAT, 0o600)
    alone = os.open(tmp_path / "alone.log", os.O_WRONLY | os.O_CREAT, 0o600)
    again = os.open(tmp_path / "vm.log", os.O_WRONLY)  # the same file, opened twice
    r, w = os.pipe()
    try:
        spawns = [
            Spawn("a", "serial", 8, fds={"out": shared}),
            Spawn("b", "serial", 8, fds={"out": alone}),
            Spawn("c", "serial", 8, fds={"out": w}),
            Spawn("d", "serial", 8, fds={"out": w}),
        ]
        groups = mark_shared_outputs(spawns, log_fd=again)
        marked = [bool((s.transport or {}).get("output_shared")) for s in spawns]
    finally:
        for fd in (shared, alone, again, r, w):
            os.close(fd)

    assert (groups, marked) == ([["the monitor's log", "a"]], [True, False, False, False])


def symlinked_dir(disk: Path) -> Path:
    (disk.parent / "via").symlink_to(disk.parent)
    return disk.parent / "via" / disk.name


def hard_link(disk: Path) -> Path:
    os.link(disk, disk.parent / "console.log")
    return disk.parent / "console.log"


@pytest.mark.parametrize("alias", [symlinked_dir, hard_link], ids=lambda f: f.__name__)
def test_refuse_outputs_on_disks_output_on_the_image_by_another_path_is_refused(tmp_path, alias):
    """config.py compares paths; the files the monitor opened are the same one."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    output = alias(disk)
    image = os.open(disk, os.O_RDWR)
    out = os.open(output, os.O_WRONLY | os.O_APPEND)
    spawns = [
        Spawn("blk0", "virtio-blk", 0, options={"path": str(disk)}, fds={"disk": image}),
        Spawn("serial0", "serial", 8, options={"output": str(output)}, fds={"out": out}),
    ]
    try:
        with pytest.raises(ConfigError) as refused:
            refuse_outputs_on_disks(spawns)
    finally:
        os.close(image)
        os.close(out)

    assert str(refused.value) == (
        f"device 'serial0'.output: '{output}' is the disk image of device 'blk0'; the "
        "device's output would be appended to it"
    )


def test_refuse_outputs_on_disks_output_beside_the_image_is_fine(tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    image = os.open(tmp_path / "disk.img", os.O_RDWR)
    out = os.open(tmp_path / "disk.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    spawns = [
        Spawn("blk0", "virtio-blk", 0, fds={"disk": image}),
        Spawn("serial0", "serial", 8, fds={"out": out}),
    ]
    try:
        refuse_outputs_on_disks(spawns)  # raises nothing
    finally:
        os.close(image)
        os.close(out)


def test_output_on_a_shared_file_is_not_counted_but_takes_each_write_whole(tmp_path):
    """The device's side: on a shared file it publishes as on an uncounted output, while its
    writes still leave whole and at once (the 8250's mirror promises: immediate())."""
    fd = os.open(tmp_path / "vm.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        out = BoundedOutput(FdLine(fd, shared=True))
        assert (out.counted(), out.immediate()) == (False, True)
    finally:
        os.close(fd)


class LateSpareChannel:
    """The spare's channel: the spare wrote to the output file (the bytes of the chains it
    served, or of the frames it replayed), then its READY came after SPARE_READY_TIMEOUT_MS."""

    connection_ended = False

    def __init__(self, out: int, written: bytes) -> None:
        self.out, self.written = out, written

    def wait_ready(self, process: object, timeout_ms: int = 0) -> None:
        os.write(self.out, self.written)
        raise ChannelError("did not start within 2000 ms, before it was ready")

    def close(self) -> None:
        pass


def test_slot_cold_start_after_a_late_spare_skips_what_the_spare_wrote_to_the_file(
    tmp_path, monkeypatch
):
    """The slot's skip is the output file's growth less the checkpoint's count: it is what
    the next process drops unsent (slot.py: "every byte once, none lost"). A spare that
    wrote to the file and then missed its READY deadline is killed and a cold process
    started, with the skip measured before the spare wrote: the cold process sends those
    bytes again."""
    out = os.open(tmp_path / "hvc.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        window = MODELS["virtio-console"].transport.size
        resumed: list[dict[str, object]] = []
        slot = DeviceSlot(
            Spawn("con0", "virtio-console", window, fds={"out": out}),
            tmp_path, refuse, Failures(), resumer=lambda process, spec: None,
        )  # fmt: skip
        os.write(out, b"first\n")  # the dead process's output, its checkpoint counts it
        slot._checkpoint = Checkpoint(None, 0, 6)
        os.write(out, b"sec")  # and after its checkpoint: the line took this, then the crash
        slot.restarting = True  # a crash the policy restarts
        slot._spare = (Outlived(lingered=False), os.open(os.devnull, os.O_RDONLY))  # type: ignore[assignment]
        monkeypatch.setattr(
            slot, "attach", lambda: setattr(slot, "channel", LateSpareChannel(out, b"ond\n"))
        )
        monkeypatch.setattr(slot, "start", resumed.append)  # the cold process's resume
        monkeypatch.setattr(slot, "_wait_restarted", lambda: None)

        slot.restart()
        grown = os.fstat(out).st_size
    finally:
        os.close(out)

    (resume,) = resumed
    assert resume["emitted"] + resume["skip"] == grown == len(b"first\nsecond\n")


class SyncMeetsDeath(Connection):
    """A device proper that died (a crash fault's SIGSEGV right after it applied a queue
    enable): its connection ended with it; the sync after the write finds it gone."""

    def sync(self, drain: bool = False) -> None:
        raise ChannelError("the device closed its end of the channel")


def test_slot_sync_that_meets_a_dead_device_lets_the_process_end_before_killing_it(
    tmp_path, monkeypatch
):
    """As a read or a posted write that meets a dead device (_channel_failed_locked): the
    warden gets GONE_WAIT_MS to end the way the device did, and the supervisor says how
    (process_ended). The sync killed it at once: its end was reported as SIGKILL, and the
    device's last failure as the channel's words, for a crash the README says is SIGSEGV."""
    failures = Failures()
    slot = DeviceSlot(Spawn("rng0", "virtio-rng", VirtioRng.WINDOW), tmp_path, refuse, failures)
    process, handed_over = ending_under_supervision(slot, SyncMeetsDeath(ended=True), monkeypatch)

    assert slot.sync() is False
    assert process.asked[0] == GONE_WAIT_MS / 1000
    assert handed_over and not process.killed and failures == []


class ChildProcess(DeviceProcess):
    """A child of this test, reaped here."""

    def _reap(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def test_slot_teardown_sync_meeting_a_dead_device_waits_for_no_closed_supervisor(tmp_path):
    """Machine.run() closes the supervisor, then Machine.close() syncs every live device. A
    device that died meanwhile has its sync fail through _channel_failed_locked, which, the
    slot still `supervised`, waited END_TIMEOUT_S (5 s) for a process_ended() that no closed
    supervisor calls: every `up` ending that way took 5 s longer. A closed supervisor's slots
    are supervised no more, and the sync fails the device at once."""
    failures = Failures()
    slot = DeviceSlot(Spawn("rng0", "virtio-rng", VirtioRng.WINDOW), tmp_path, refuse, failures)
    child = subprocess.Popen(["sleep", "60"])
    process = ChildProcess(child.pid, os.pidfd_open(child.pid))
    slot.state, slot.process = SlotState.LIVE, process
    slot.channel = SyncMeetsDeath(ended=True)  # type: ignore[assignment]
    supervisor = Supervisor(heartbeat_s=3600)
    supervisor.watch(slot)
    supervisor.start()
    try:
        supervisor.close()  # Machine.run()'s finally
        assert not slot.supervised
        process.kill()  # the device dies after that
        while not process.ended(0.1):
            pass
        assert slot.sync() is False  # Machine._sync_devices
    finally:
        process.kill()
        child.wait()
        process.close()
    assert failures == ["the device closed its end of the channel"]


# A crash restart after a full disk: output.py keeps a file's line after ENOSPC, and the bytes
# it lost are in `emitted` (a chain's completion needs them counted), never in the file's
# growth. The checkpoint reports what the line took (BoundedOutput.taken), which a restart's
# skip is measured against: "every byte once, none lost" (the module docstring).
class FillingFile(FdLine):
    """A regular file's line on a file system that is full while `full`."""

    full = False

    def send(self, data: memoryview) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().send(data)


def test_slot_restart_after_the_disk_was_full_for_a_while_writes_no_byte_twice(tmp_path: Path):
    log = tmp_path / "serial.log"
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        slot = DeviceSlot(Spawn("serial0", "serial", 8, fds={"out": out}), tmp_path, refuse,
                          Failures())  # fmt: skip
        line = FillingFile(os.dup(out))
        uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(line)))
        runtime.Checkpoints(uart)  # what the runtime publishes with each state: its progress
        for byte in b"boot\n":
            uart.write(Reg.RX_TX, bytes([byte]))
        line.full = True  # the disk fills up: these are lost (and said once)
        for byte in b"lost while full\n":
            uart.write(Reg.RX_TX, bytes([byte]))
        line.full = False  # the operator made room
        checkpoint = uart.save()  # a checkpoint the monitor reads, after the episode
        progress = uart.ctx.events.progress
        assert progress is not None
        slot._checkpoint = Checkpoint(None, *progress())
        journal = [wire.encode_write(Reg.RX_TX, bytes([b])) for b in b"login: "]
        for frame in journal:  # the guest goes on; then the process crashes
            runtime._apply(uart, wire.decode_access(frame, 8))

        resume = slot._resume_locked()
        out2 = BoundedOutput(FdLine(os.dup(out)))
        out2.emitted, out2.skip = resume["emitted"], resume["skip"]  # type: ignore[assignment]
        new = Uart8250.restore(DeviceContext(irq=FakeIrq(), out=out2, restarted=True), checkpoint)
        runtime.replay(new, [(f, 0) for f in journal], runtime.Checkpoints(new))
        new.after_restart()
        for byte in b"root\n":
            new.write(Reg.RX_TX, bytes([byte]))
    finally:
        os.close(out)

    assert log.read_bytes() == b"boot\nlogin: root\n"


def test_checkpoint_counts_what_the_file_took_of_a_short_write_before_a_full_disk(tmp_path):
    """The checkpoint's count is what a restart's skip is measured against (the file's growth
    less it): after a short write (the file system's last bytes; RLIMIT_FSIZE here) it must
    be the bytes the file took, neither the bytes lost with them nor less. In a child:
    RLIMIT_FSIZE is the process's."""
    path = tmp_path / "serial.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FdLine(fd), 64)))
            runtime.Checkpoints(uart)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4, hard))  # SIGXFSZ: ignored by Python
            uart.ctx.out.put(b"hello\n")  # 4 bytes fit: a short write, then EFBIG
            for byte in b"more\n":  # the file system still full
                uart.write(Reg.RX_TX, bytes([byte]))
            progress = uart.ctx.events.progress
            os.write(w, str(progress()[1] if progress else -1).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    counted = int(os.read(r, 64))
    os.close(r)
    os.close(fd)
    assert (path.read_bytes(), counted) == (b"hell", 4)


# -- what a lying device's events say, and restarts around them (a mutation audit's) ----------
SERIAL_STATE = {"model": "serial", "version": MODELS["serial"].state_version, "fields": {}}


def test_slot_checkpoint_past_the_frames_sent_is_a_broken_channel(slot, live) -> None:
    """A checkpoint says how many frames the device applied: more than were sent is a lie
    that would empty the journal a restart replays (and refuse every honest checkpoint
    after it)."""
    for _ in range(3):
        slot.write(0, b"A")
    slot._on_event(events.Published(SERIAL_STATE, 3, 0))  # all three: fine
    with pytest.raises(ChannelError, match="published a checkpoint at frame 4, but it was sent 3"):
        slot._on_event(events.Published(SERIAL_STATE, 4, 0))


def test_slot_checkpoint_before_the_last_one_is_a_broken_channel(slot, live) -> None:
    """Checkpoints only go forward: one behind the last would replay frames the journal no
    longer holds (dropped when the later one came)."""
    for _ in range(3):
        slot.write(0, b"A")
    slot._on_event(events.Published(SERIAL_STATE, 2, 0))
    with pytest.raises(ChannelError, match="its last checkpoint was at 2"):
        slot._on_event(events.Published(SERIAL_STATE, 1, 0))


def test_slot_input_room_claiming_one_byte_more_than_was_sent_fails_the_device(slot, live) -> None:
    """The bound exactly: 3 bytes sent, the device says it received 4 (the room it then
    claims would let the monitor send past its buffer)."""
    live.events.append(events.InputRoom(0, 3))
    assert slot.input(b"abc") == 3
    slot._on_event(events.InputRoom(3, 0))  # exactly what was sent: fine
    with pytest.raises(ChannelError, match="said it received 4 bytes of input, but was sent 3"):
        slot._on_event(events.InputRoom(4, 0))


def test_slot_restart_skips_nothing_when_the_checkpoint_counts_more_than_the_file_grew(
    tmp_path: Path,
) -> None:
    """skip = the file's growth less the checkpoint's emitted, never below 0: the count is
    the device's word (a lie, or a file truncated since, as logrotate's copytruncate does),
    and a negative skip is refused by the next process, which then never starts."""
    out = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        slot = DeviceSlot(Spawn("serial0", "serial", 8, fds={"out": out}), tmp_path, refuse,
                          lambda s, why: True)  # fmt: skip
        os.write(out, b"boot\n")  # the file grew by 5
        slot._checkpoint = Checkpoint(None, 0, 12)  # the device says its line took 12
        with slot._lock:
            resume = slot._resume_locked()
    finally:
        os.close(out)
    assert resume["skip"] == 0


def test_slot_ready_of_a_process_no_longer_in_the_slot_leaves_it_away(tmp_path: Path) -> None:
    """A READY that comes once its process was taken out of the slot (vacate() from another
    thread while wait_ready() waited) does not make the slot live with no process in it."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    gone = object()
    assert (slot.process, slot.state) == (None, SlotState.AWAY)
    slot._now_live(gone)  # type: ignore[arg-type]
    assert slot.state is SlotState.AWAY


def test_slot_restart_past_the_journal_hands_no_spare_a_journal_with_frames_missing(
    tmp_path: Path,
) -> None:
    """More frames than MAX_JOURNAL since the last checkpoint: the restart is refused before
    a warm spare is handed the rest (it would go on without the frames dropped, and the
    check after a spare failed to take over is never reached once one takes over)."""
    failures: list[str] = []
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse,
                      lambda s, why: failures.append(why) or True)  # fmt: skip
    resumed: list[object] = []

    def resumer(process: object, spec: object) -> None:
        resumed.append(spec)
        raise DeviceFailure("the test's spare takes over nothing")

    slot._resumer = resumer  # type: ignore[assignment]
    slot._spare = (Outlived(lingered=False), os.open(os.devnull, os.O_RDONLY))  # type: ignore[assignment]
    slot.process, slot.state, slot.restarting = Outlived(lingered=False), SlotState.AWAY, True  # type: ignore[assignment]
    slot._lost = 5  # frames 1-5 fell out of the journal; the checkpoint is at 0

    with pytest.raises(DeviceFailure, match="more than 4096 frames since its last checkpoint"):
        slot.restart()
    assert resumed == []


def test_slot_writes_lost_from_the_journal_while_it_restarted_fail_the_device(
    slot, failures
) -> None:
    """Posted writes that came while a restart was away past RESTART_WAIT_MS go to the new
    process once READY; when the journal dropped some of them (more than MAX_JOURNAL) the
    device cannot go on transparently and has failed, rather than get the rest."""
    process = Outlived(lingered=False)
    channel = SyncedChannel(slot)
    slot.process, slot.channel = process, channel  # type: ignore[assignment]
    slot.state, slot.restarting = SlotState.AWAY, True
    with slot._lock:
        for _ in range(3):
            slot._journal_locked(wire.encode_write(0, b"A"))
    slot._resumed_at, slot._lost = 0, 1  # frame 1 went out of the journal

    slot._now_live(process)  # type: ignore[arg-type]

    assert failures == ["more than 4096 writes came while it restarted"]
    assert (slot.state, list(channel)) == (SlotState.FAILED, [])


class SyncedChannel(InputChannel):
    def sync(self, drain: bool = False) -> None:
        pass


def test_slot_route_request_in_an_ended_process_last_words_is_not_answered(tmp_path) -> None:
    """As an MSI request's (test_slot.py): the answer could not go to a process that ended,
    and its send failing ended the drain, losing its last checkpoint after the request."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    answers: list[bytes] = []
    slot.channel = SimpleNamespace(answer=answers.append)  # type: ignore[assignment]

    def last_words(limited: bool) -> None:
        slot._on_event(events.RouteRequest(9, 4))

    slot._drain_events_locked(SimpleNamespace(drain_events=last_words))  # type: ignore[arg-type]
    assert answers == []
    slot._on_event(events.RouteRequest(9, 4))  # from a live process: answered
    assert len(answers) == 1
