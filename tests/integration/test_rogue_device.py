"""The monitor survives every way a device can misbehave on its channel, and names it."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.monitor.channel import LATENCY_BUDGET_MS, READ_TIMEOUT_MS, STATS_TIMEOUT_MS
from splitvmm.monitor.control import ControlError
from splitvmm.monitor.coordinator import Coordinator
from splitvmm.monitor.slot import Checkpoint, DeviceSlot, SlotState, Spawn
from splitvmm.monitor.supervisor import HEARTBEAT_TIMEOUT_MS
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol.models import MODELS, PROGRESS_HOST_IO_BYTE
from splitvmm.sandbox.spawn import spawn_child
from tests.rogue_device import BEHAVIOURS, CHECKPOINT_EMITTED, SLOW_DATA, VERSION

SCR = 7  # a read the real serial would answer at once
LSR = 5  # a read the serial's register mirror answers
HEARTBEAT_MS = HEARTBEAT_TIMEOUT_MS


def spawn_rogue(behaviour: str, tmp_path, failures: list[str], *args: str) -> DeviceSlot:
    """A rogue device in a slot, started as our child (the launcher would start none)."""
    irq = EventFd()
    command = (sys.executable, "-m", "tests.rogue_device", behaviour, *args)
    spawn = Spawn("rogue0", "serial", 8, {}, {"irq": irq.fd})
    slot = DeviceSlot(
        spawn,
        tmp_path,
        lambda spec: spawn_child(spec, command),
        lambda slot, reason: failures.append(reason),
    )
    slot.start()
    return slot


@pytest.mark.parametrize(
    "behaviour,reason",
    [
        ("garbage", "unexpected reply"),
        # refused on its ZMTP header, before its body came (monitor/zmtp.py)
        ("oversized", "sent a frame of 2097152 bytes, over the 65536 allowed"),
        ("wrong-seq", "unexpected reply"),
        ("unsolicited", "sent a frame nobody asked for"),
        ("silent", "no reply within"),
        # alive, it closed its end: seen past the read's deadline
        ("hang-up", "closed its end of the channel"),
        ("wide-reply", "reply has data past its size"),
        ("event-flood", "sent more than 256 events around one request"),
        ("bad-event", "bad event: state is for model 'rtc', expected 'serial'"),
        # a snapshot holding it would pass `snapshot verify`, then fail its restore
        ("bad-version", f"sent a state of version {VERSION + 1}, where a serial device saves"),
        # over MAX_DEVICE_FRAME: refused on its header
        ("huge-event", "over the 65536 allowed"),
        # the read (and each drain before a request) no longer waits out a flood: it fails
        # at its deadline, or at its event allowance, whichever this host reaches first
        ("endless-events", ("past its 2000 ms deadline", "sent more than 256 events")),
        ("checkpoint-first", "sent a checkpoint before it published any state"),
        ("bad-checkpoint", "bad checkpoint: CHECKPOINT with size=0 flags=1 seq=0, not all 0"),
        ("mirror-undeclared", "bad register mirror: mirror gives register 6, the model"),
        ("mirror-oversized", "bad register mirror: mirror has data past its registers"),
        ("mirror-credit-outside", "bad register mirror: mirror credit at offset 0x8, outside"),
    ],
)
def test_rogue_reply_kills_device_and_monitor_goes_on(behaviour, reason, tmp_path, caplog):
    failures: list[str] = []
    slot = spawn_rogue(behaviour, tmp_path, failures)
    process = slot.process
    try:
        slot.wait_ready()
        if behaviour == "unsolicited":
            slot.channel._frame_within(2000)  # let its flood arrive before we ask anything
        with caplog.at_level(logging.ERROR, logger="splitvmm.slot"):
            first = slot.read(SCR, 1)
            second = slot.read(SCR, 1)  # a dead device reads as all-ones, without waiting
        process.wait(5)
    finally:
        slot.close()
    assert (first, second) == (b"\xff", b"\xff")
    reasons = (reason,) if isinstance(reason, str) else reason
    assert len(failures) == 1 and any(r in failures[0] for r in reasons), failures
    assert f"device rogue0 (pid {process.pid}) failed" in caplog.text
    assert process.returncode is not None  # killed, not left running


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("bad-ready", "device rogue0: expected READY"),
        # only an `error` frame says why a device cannot start; quoting this one's (absent)
        # message said "refused to start: ''", which points at the device's options
        ("event-ready", "device rogue0: sent 'publish' where READY was expected"),
    ],
)
def test_rogue_ready_garbage_refuses_start(tmp_path, behaviour, reason):
    failures: list[str] = []
    slot = spawn_rogue(behaviour, tmp_path, failures)
    try:
        with pytest.raises(DeviceFailure, match=reason):
            slot.wait_ready()
    finally:
        slot.close()


def test_all_rogue_behaviours_are_tested():
    tested = {
        "garbage",
        "oversized",
        "wrong-seq",
        "unsolicited",
        "silent",
        "hang-up",
        "wide-reply",
        "bad-ready",
        "event-ready",
        "slow",
        "slow-control",
        "slow-drain",
        "publish",
        "report",
        "route",
        "event-flood",
        "bad-event",
        "bad-version",
        "huge-event",
        "endless-events",
        "ping-flood",
        "slow-ping",
        "mirror-flood",
        "checkpoint",
        "checkpoint-first",
        "bad-checkpoint",
        "checkpoint-backwards",
        "mirror-undeclared",
        "mirror-oversized",
        "mirror-credit-outside",
    }
    assert tested == set(BEHAVIOURS)


def test_rogue_reads_from_many_threads_fail_once(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("garbage", tmp_path, failures)
    try:
        slot.wait_ready()
        threads = [threading.Thread(target=slot.read, args=(SCR, 1)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        slot.close()
    assert len(failures) == 1


def test_rogue_slow_just_under_read_deadline_fails_on_latency_budget(tmp_path):
    # Each reply comes at 3/4 of the read deadline: none misses it, two overrun the budget.
    assert 2 * READ_TIMEOUT_MS * 3 // 4 > LATENCY_BUDGET_MS > READ_TIMEOUT_MS * 3 // 4
    failures: list[str] = []
    slot = spawn_rogue("slow", tmp_path, failures)
    try:
        slot.wait_ready()
        reads = [slot.read(SCR, 1) for _ in range(3)]
        slot.process.wait(5)
    finally:
        slot.close()
    assert reads == [bytes([SLOW_DATA]), b"\xff", b"\xff"]
    assert len(failures) == 1 and f"over the budget of {LATENCY_BUDGET_MS} ms" in failures[0]


def test_rogue_slow_to_take_posted_writes_fails_on_latency_budget(tmp_path):
    """Once its socket is full, each guest write to the device waits for room, up to
    WRITE_TIMEOUT_MS. A device that makes room just under that, every time, held the vCPU
    that wrote ~1.5 s a write, for good, and was never failed: a slow reply to a read is
    charged to its latency budget, a slow take of a posted write was not."""
    failures: list[str] = []
    slot = spawn_rogue("slow-drain", tmp_path, failures)
    writes, start = 0, time.monotonic()
    try:
        slot.wait_ready()
        while not failures and time.monotonic() - start < 30:
            slot.write(SCR, b"\x5a")  # a vCPU's posted write
            writes += 1
    finally:
        slot.close()
    assert len(failures) == 1, f"not failed after {writes} writes"
    assert f"over the budget of {LATENCY_BUDGET_MS} ms" in failures[0]


def test_rogue_flooding_events_before_each_pong_fails_its_heartbeat_at_the_deadline(tmp_path):
    """200 publishes of ~25 ms each to check before a pong: the events are held to the
    ping's deadline (they used to run on for seconds past it, and the device lived on)."""
    failures: list[str] = []
    slot = spawn_rogue("ping-flood", tmp_path, failures)
    try:
        slot.wait_ready()
        start = time.monotonic()
        slot.heartbeat(HEARTBEAT_MS)
        took = time.monotonic() - start
    finally:
        slot.close()
    assert len(failures) == 1, failures
    assert f"kept sending events past its {HEARTBEAT_MS} ms deadline" in failures[0]
    assert took < 2 * HEARTBEAT_MS / 1000 + 1  # the deadline, one slow event, the teardown


def test_device_answering_each_ping_late_but_within_its_deadline_is_not_failed(tmp_path):
    """A healthy virtio-blk answers a ping only after a long fdatasync (its event loop does
    it in line): a slow pong within the heartbeat's deadline is no failure, however often."""
    failures: list[str] = []
    slot = spawn_rogue("slow-ping", tmp_path, failures, str(HEARTBEAT_MS * 3 // 4))
    try:
        slot.wait_ready()
        for _ in range(3):
            slot.heartbeat(HEARTBEAT_MS)
        state = slot.state
    finally:
        slot.close()
    assert (failures, state) == ([], SlotState.LIVE)


def test_rogue_flooding_events_behind_its_mirror_costs_each_read_little_then_fails(tmp_path):
    """A read the register mirror answers drains the device's news first: a drain stops at
    DRAIN_LIMIT_S (it took ~64 slow events, ~2 s, a read), and what it took is charged."""
    failures: list[str] = []
    slot = spawn_rogue("mirror-flood", tmp_path, failures)
    try:
        slot.wait_ready()
        select.select([slot.channel._link.fd], [], [], 2)  # its mirror, then the flood
        worst, reads, start = 0.0, [], time.monotonic()
        while not failures and time.monotonic() - start < 30:
            before = time.monotonic()
            reads.append(slot.read(LSR, 1))
            worst = max(worst, time.monotonic() - before)
    finally:
        slot.close()
    assert len(failures) == 1 and f"over the budget of {LATENCY_BUDGET_MS} ms" in failures[0]
    assert reads[0] == b"\x60"  # the mirror answered while the device was still live
    assert worst < 1.0, worst  # DRAIN_LIMIT_S and one event past it, on a loaded host


def test_snapshot_with_device_slow_on_control_fails_at_shared_deadline(tmp_path):
    # quiesce is answered after 1 s, inside the 1.6 s the devices get in all; save may then
    # wait only for what is left, far below the per-request CONTROL_TIMEOUT_MS (10 s).
    vm = SimpleNamespace(name="test", snapshot_dirs=(tmp_path,))
    machine = SimpleNamespace(
        cfg=SimpleNamespace(vm=vm), rundir=SimpleNamespace(path=tmp_path / "r")
    )
    machine.stopping, machine.vcpus, machine.vcpu_fds = False, [], []
    machine.dirty_tracker = lambda: None  # its RAM is copied in the pause
    coordinator = Coordinator(machine, device_deadline_s=1.6)  # type: ignore[arg-type]
    failures: list[str] = []
    slot = spawn_rogue("slow-control", tmp_path, failures, "1000")
    machine.slots = [slot]
    try:
        slot.wait_ready()
        with pytest.raises(ControlError, match=r"snapshot aborted at save: device rogue0") as e:
            coordinator.snapshot(tmp_path / "snap")
    finally:
        slot.close()
    assert "the devices get 1.6 s in all to quiesce, save and resume" in str(e.value)
    waited = re.fullmatch(r"no reply within (\d+) ms", failures[0])
    assert len(failures) == 1 and waited and int(waited[1]) < 1000, failures
    assert not (tmp_path / "snap").exists() and not coordinator.paused


def test_device_stats_answered_in_time_gives_its_counters(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("slow-control", tmp_path, failures, "0")
    try:
        slot.wait_ready()
        counters = slot.stats()
    finally:
        slot.close()
    assert counters == {"late": 1}
    assert failures == []


def test_device_stats_answered_late_is_no_failure_and_its_answer_is_dropped(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("slow-control", tmp_path, failures, str(STATS_TIMEOUT_MS * 2))
    try:
        slot.wait_ready()
        counters = slot.stats()  # given up on after STATS_TIMEOUT_MS
        read = slot.read(SCR, 1)  # the late answer comes before the read's, and is dropped
    finally:
        slot.close()
    assert counters is None
    assert read == b"\x00"
    assert failures == []


# -- events: a device speaks first, and the monitor checks what it says -----------------------
def test_device_published_state_becomes_its_last_known_state(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("publish", tmp_path, failures)
    try:
        slot.wait_ready()
        slot.read(SCR, 1)
        slot.read(SCR, 1)
        last = slot.last_state
    finally:
        slot.close()
    assert failures == []
    assert last == {"model": "serial", "version": VERSION, "fields": {"seq": 2}}


def test_device_checkpoint_holds_its_last_published_state_at_a_later_frame(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("checkpoint", tmp_path, failures)
    try:
        slot.wait_ready()
        slot.read(SCR, 1)  # a state comes before this reply
        slot.read(SCR, 1)  # and another before this one
        slot.read(SCR, 1)  # "the last still holds after the second read", before this one
        checkpoint, journal = slot._checkpoint, [n for n, _, _ in slot._journal]
    finally:
        slot.close()
    assert failures == []
    state = {"model": "serial", "version": VERSION, "fields": {"seq": 2}}
    assert checkpoint == Checkpoint(state, applied=2, emitted=CHECKPOINT_EMITTED)
    assert journal == [3]  # a restart would replay the third read only


def test_rogue_checkpoint_whose_output_count_goes_back_fails_the_device(tmp_path):
    """A checkpoint's `emitted` is what a restart measures its output file's growth against
    (DeviceSlot._resume_locked: skip = grown - emitted): one that went back to 0 was taken,
    and the next process, an honest one, would drop unsent as many of the guest's output
    bytes as the file ever grew by, the dead process's lie outliving it. A device's line
    only takes bytes (a restart carries its count over), as it only applies frames."""
    failures: list[str] = []
    slot = spawn_rogue("checkpoint-backwards", tmp_path, failures)
    try:
        slot.wait_ready()
        first = slot.read(SCR, 1)  # a checkpoint of CHECKPOINT_EMITTED bytes comes before it
        second = slot.read(SCR, 1)  # and one of 0 bytes before this one
        checkpoint = slot._checkpoint
    finally:
        slot.close()
    assert (first, second) == (b"\x00", b"\xff")
    assert checkpoint.emitted == CHECKPOINT_EMITTED  # the last one that held
    reason = f"published a checkpoint of 0 output bytes, but its last had {CHECKPOINT_EMITTED}"
    assert len(failures) == 1 and reason in failures[0], failures


def test_device_report_is_logged_and_device_serves_on(tmp_path, caplog):
    failures: list[str] = []
    slot = spawn_rogue("report", tmp_path, failures)
    try:
        slot.wait_ready()
        with caplog.at_level(logging.WARNING, logger="splitvmm.slot"):
            values = [slot.read(SCR, 1) for _ in range(3)]
    finally:
        slot.close()
    assert (failures, values) == ([], [b"\x00"] * 3)
    shown = "device rogue0 reports: disk on fire \\u202egol.exe\\u202c\\u2028\\u200b"
    assert caplog.text.count(shown) == 1, caplog.text  # escaped, and once a second


def test_device_route_request_granted_only_for_its_own_line(tmp_path):
    failures: list[str] = []
    slot = spawn_rogue("route", tmp_path, failures)
    try:
        slot.wait_ready()
        slot.sync()  # its two requests are answered around this one
        told = slot.read(SCR, 1)
    finally:
        slot.close()
    assert failures == []
    assert told == bytes([0b01])  # GSI 4 (the serial's line) granted, GSI 9 refused


# -- the host-I/O flag (monitor/channel.py): a device "waiting on its host's disk" is waited
# for past its deadlines. The flag is the device's to set, in its progress page.
def spawn_posing_as(model: str, fds: dict[str, int], tmp_path, failures: list[str]) -> DeviceSlot:
    """A silent rogue device posing as `model`, its progress page's host-I/O flag set (the
    lie a compromised device tells in the page it maps), READY."""
    command = (sys.executable, "-m", "tests.rogue_device", "silent")
    window = MODELS[model].transport.size
    slot = DeviceSlot(
        Spawn("rogue0", model, window, {}, fds),
        tmp_path,
        lambda spec: spawn_child(spec, command),
        lambda slot, reason: failures.append(reason),
    )
    slot.start()
    slot.wait_ready()
    os.pwrite(fds["progress"], b"\x01", PROGRESS_HOST_IO_BYTE)
    return slot


@pytest.fixture
def progress_page():
    fd = os.memfd_create("progress", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    yield fd
    os.close(fd)


def test_console_claiming_host_io_holds_no_vcpu_past_its_deadline(tmp_path, progress_page):
    """Only virtio-blk has a disk to wait on. A compromised virtio-console (which has a
    progress page too) that set the flag and went silent held a vCPU's access, the slot's
    lock and its heartbeat for ever; it fails at its deadline as any silent device does."""
    failures: list[str] = []
    slot = spawn_posing_as("virtio-console", {"progress": progress_page}, tmp_path, failures)
    result: list[bytes] = []
    try:
        reader = threading.Thread(target=lambda: result.append(slot.read(0, 4)), daemon=True)
        reader.start()
        reader.join(3 * READ_TIMEOUT_MS / 1000)
        held = reader.is_alive()
    finally:
        slot.give_up_host_io()  # (what a VM's stop does) lets a held read go
        slot.close()
    assert not held, "a vCPU's read still waits on a console device that claims host I/O"
    assert result == [b"\xff" * 4]
    assert len(failures) == 1 and "no reply within" in failures[0], failures


def test_console_claiming_host_io_misses_its_heartbeat(tmp_path, progress_page):
    failures: list[str] = []
    slot = spawn_posing_as("virtio-console", {"progress": progress_page}, tmp_path, failures)
    try:
        for _ in range(3):  # three beats of the supervisor's
            slot.heartbeat(HEARTBEAT_MS)
    finally:
        slot.close()
    assert len(failures) == 1 and "missed its heartbeat" in failures[0], failures


def test_crash_device_ends_a_blk_device_that_holds_a_vcpu_on_its_host_io_flag(
    tmp_path, progress_page
):
    """virtio-blk's flag is waited on past every deadline, by design: a compromised one (or a
    disk that hangs) holds a vCPU's access, and the slot's lock, until the VM stops. `ctl
    crash-device` is the operator's way to end it, but it waited for the same lock: it hung,
    and the control worker with it (every later request refused as busy). It signals the
    process without the lock then: the operator's signal, its pid returned, and the held
    access ends with the process, not as a device that gave "no reply"."""
    disk = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(disk, 1 << 20)
    failures: list[str] = []
    slot = spawn_posing_as(
        "virtio-blk", {"progress": progress_page, "disk": disk}, tmp_path, failures
    )
    process = slot.process
    assert process is not None
    crashed: list[object] = []

    def crash() -> None:
        try:
            crashed.append(slot.crash(signal.SIGTERM))
        except DeviceFailure as e:
            crashed.append(e)

    try:
        reader = threading.Thread(target=slot.read, args=(0, 4), daemon=True)
        reader.start()
        reader.join(READ_TIMEOUT_MS / 1000 + 0.5)  # past the read's deadline: held
        assert reader.is_alive()
        operator = threading.Thread(target=crash, daemon=True)
        operator.start()
        operator.join(3 * READ_TIMEOUT_MS / 1000)
        hung = operator.is_alive()
        reader.join(2 * READ_TIMEOUT_MS / 1000)
        read_held = reader.is_alive()
        process.wait(5)
    finally:
        slot.give_up_host_io()
        slot.close()
        os.close(disk)
    assert not hung, "ctl crash-device hangs on a device that holds a vCPU on its host-I/O flag"
    assert not read_held
    assert crashed == [process.pid], crashed
    assert process.returncode == -signal.SIGTERM
    assert len(failures) == 1 and "no reply within" not in failures[0], failures
