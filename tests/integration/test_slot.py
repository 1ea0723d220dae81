"""The monitor's side of a real serial device process: its slot, its channel, its death.

No /dev/kvm needed: the device gets an eventfd for its irq and a pipe for its output. The
device is our own child (sandbox/spawn.py spawn_child), as a test may have threads that
rule out forking a launcher; tests/sandbox/test_launcher.py covers the launcher's way.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from splitvmm.cli.policy import stand_in_transport
from splitvmm.config import parse_config
from splitvmm.devprocs.serial import RX_BUFFER_MAX, Ier, Lcr, Lsr, Reg
from splitvmm.devprocs.virtio.guestram import GuestRam
from splitvmm.errors import DeviceFailure, SplitvmmError
from splitvmm.monitor import channel as channel_module
from splitvmm.monitor import console
from splitvmm.monitor import mirror as mirror_module
from splitvmm.monitor import slot as slot_module
from splitvmm.monitor.budget import Deadline
from splitvmm.monitor.channel import ChannelError
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.mirror import NEWS_EVERY
from splitvmm.monitor.rundir import MAX_SOCKET_PATH
from splitvmm.monitor.slot import MAX_AHEAD, DeviceSlot, RestartBudget, SlotState, Spawn
from splitvmm.monitor.supervisor import Supervisor
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol import wire
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import DEVICE_COMMAND, MAX_SPEC, DeviceSpec, spare_path
from splitvmm.record import replace
from splitvmm.sandbox.spawn import ChildProcess, readable, resume_child, spawn_child
from tests.unit.test_coordinator_commit import coordinator
from tests.unit.test_machine_stop import bare_machine


class Harness:
    def __init__(
        self,
        tmp_path,
        spawner=spawn_child,
        resumer=None,
        restarts=False,
        output_file: bool = False,
        started: bool = True,
    ) -> None:
        """The device's output is a pipe, or with `output_file` a regular file (out_r reads
        it from its start). Without `started`, the slot is made and nothing more: the test
        starts it and waits for READY."""
        self.irq = EventFd()
        if output_file:
            self.out_w = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT, 0o600)
            self.out_r = os.open(tmp_path / "serial.log", os.O_RDONLY)
        else:
            self.out_r, self.out_w = os.pipe()
        self.failures: list[str] = []
        self.failed = threading.Event()
        spawn = Spawn(
            "serial0", "serial", 8, {"output": "stdio"}, {"irq": self.irq.fd, "out": self.out_w}
        )
        self.restarts = restarts  # the on_crash policy: restart (True) or not
        self.slot = DeviceSlot(spawn, tmp_path, spawner, self._on_failure, resumer=resumer)
        if started:
            self.slot.start()
            self.slot.wait_ready()

    def _on_failure(self, slot: DeviceSlot, reason: str) -> bool:
        self.failures.append(reason)
        self.failed.set()
        return self.restarts

    def close(self) -> None:
        self.slot.close()
        self.irq.close()
        os.close(self.out_r)
        os.close(self.out_w)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


@pytest.fixture
def file_harness(tmp_path):
    h = Harness(tmp_path, output_file=True)
    yield h
    h.close()


def test_slot_thr_writes_reach_output_fd_in_order(harness):
    for byte in b"hi!":
        harness.slot.write(Reg.RX_TX, bytes([byte]))
    assert harness.slot.sync()
    assert os.read(harness.out_r, 16) == b"hi!"


def typed(slot: DeviceSlot, data: bytes, timeout: float = 10) -> None:
    """Offer `data` to slot.input() until the device took all of it, as the console's pump
    does (its process says its room in an event that follows READY)."""
    deadline = time.monotonic() + timeout
    while data:
        taken = slot.input(data)
        assert taken is not None, "the device takes no more input"
        data = data[taken:]
        assert time.monotonic() < deadline, f"{len(data)} byte(s) not taken"
        if data:
            time.sleep(0.005)


def test_slot_input_is_read_back_through_rbr(harness):
    typed(harness.slot, b"typed text")
    lsr = harness.slot.read(Reg.LSR, 1)[0]
    received = b"".join(harness.slot.read(Reg.RX_TX, 1) for _ in range(10))
    assert (lsr & Lsr.DR, received) == (Lsr.DR, b"typed text")


def test_slot_rx_interrupt_signals_the_irq_eventfd(harness):
    harness.slot.write(Reg.IER, b"\x01")
    typed(harness.slot, b"x")
    assert harness.slot.sync()
    assert harness.irq.drain() == 1


def test_slot_killed_device_is_reported_and_reads_all_ones(harness):
    supervisor = Supervisor()
    supervisor.start()
    supervisor.watch(harness.slot)  # a process added to a running supervisor
    os.kill(harness.slot.pid, signal.SIGKILL)
    assert harness.failed.wait(10)
    supervisor.close()
    assert harness.failures == ["process was killed by signal 9"]
    assert harness.slot.read(Reg.SCR, 1) == b"\xff"


def test_slot_crash_of_a_process_already_sent_its_crash_is_refused(harness):
    """ctl crash-device twice before the first one's end is seen (no supervisor here): the
    second signalled a process dying of the first and answered with its pid, a crash that
    did not happen (four "sent" for one crash, back to back)."""
    pid = harness.slot.crash(signal.SIGKILL)
    with pytest.raises(DeviceFailure, match=f"process {pid} was sent its crash already"):
        harness.slot.crash(signal.SIGKILL)
    assert (harness.slot.state, pid) == (SlotState.LIVE, harness.slot.pid)


def test_slot_restarted_device_publishes_a_checkpoint_with_nothing_to_replay(tmp_path):
    """With an empty journal (its last checkpoint covered every frame) the new process
    published none, so writes the slot journaled late (a restart past RESTART_WAIT_MS,
    sent once READY) came after no checkpoint: replayed at a second crash as sent before
    the first, though the process applied them after its READY."""
    h = Harness(tmp_path, restarts=True)
    try:
        h.slot.fail("killed by the test")
        h.slot.restart()
        h.slot.read(Reg.SCR, 1)  # its events come with the reply
        checkpoint = h.slot._checkpoint
    finally:
        h.close()
    assert checkpoint.state is not None and checkpoint.applied == 0


def test_slot_control_to_a_device_dead_and_disconnected_fails_at_once_saying_so(harness):
    """Once the dead device's connection has ended, the channel can send it nothing: the
    request must fail on the pidfd, not wait out the send timeout and be reported as a reply
    that never came."""
    process = harness.slot.process
    assert process is not None
    process.kill()
    process.wait(10)
    channel = harness.slot.channel
    assert channel is not None
    deadline = time.monotonic() + 10  # ZeroMQ's I/O thread sees the connection close,
    while True:  # and says so after what the device sent before it ended (its mirror)
        channel.drain_events(limited=False)
        if channel._dropped():
            break
        assert time.monotonic() < deadline, "the dead device's connection never ended"
        time.sleep(0.005)
    start = time.monotonic()
    with pytest.raises(DeviceFailure) as e:
        harness.slot.control("save")
    assert "its process ended with a request unsent" in str(e.value)
    assert time.monotonic() - start < channel_module.WRITE_TIMEOUT_MS / 2000


def test_slot_channel_path_too_long_fails_cleanly(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    irq = EventFd()
    spawn = Spawn("serial0", "serial", 8, {}, {"irq": irq.fd})
    with pytest.raises(SplitvmmError, match="channel path .* longer than a UNIX socket allows"):
        DeviceSlot(spawn, deep, spawn_child, lambda slot, reason: None)
    irq.close()


def test_slot_device_refusing_its_first_start_is_one_error_not_two(tmp_path, caplog):
    """The VM's first process of a device refuses its options: the DeviceFailure says so,
    and is the VM's error (`up` prints it). The slot logged it too, as for a crash of a
    running device, and the operator read the same line twice."""
    irq = EventFd()
    spawn = Spawn("rtc0", "rtc", 2, {"base": "mars"}, {"irq": irq.fd})
    slot = DeviceSlot(spawn, tmp_path, spawn_child, lambda slot, reason: True)
    try:
        slot.start()
        with pytest.raises(DeviceFailure, match="rtc: base must be one of"):
            slot.wait_ready()
    finally:
        slot.close()
        irq.close()

    assert "base must be one of" not in caplog.text
    assert slot.state is SlotState.FAILED


def test_slot_whose_spare_path_is_too_long_says_so_once_and_restarts_cold(tmp_path, caplog):
    """A channel path of exactly sun_path's size passes its check, but a spare's is 6 bytes
    longer and cannot bind: it was tried (and refused, logged) at every restart. Said once,
    at the start, with why; no spare is tried, and a crash restarts the device cold."""
    pad = MAX_SOCKET_PATH - len(str(tmp_path)) - len("/serial0.sock") - 1
    rundir = tmp_path / ("r" * pad)
    rundir.mkdir()
    h = Harness(rundir, resumer=resume_spare, restarts=True)
    try:
        assert h.slot.start_spare() is None
        crash_and_restart(h)
        assert h.slot.state is SlotState.LIVE and h.slot.warm_restarts == 0
    finally:
        h.close()
    said = [r.getMessage() for r in caplog.records if "warm spare path" in r.getMessage()]
    assert len(said) == 1 and "longer than a UNIX socket allows" in said[0]
    assert "its restarts start cold" in said[0]


def test_device_spec_over_cap_exits_with_one_line_not_a_traceback():
    proc = subprocess.run(
        list(DEVICE_COMMAND),
        input=b" " * (MAX_SPEC + 1),
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        f"splitvmm: device: the spec is over {MAX_SPEC} bytes\n".encode(),
    )


# -- a device away and back (the crash-restart issue re-fills slots this way) ------------------
def wait_for_waiting_access(slot: DeviceSlot) -> None:
    """Until one access waits for the device (the reader thread got there)."""
    deadline = time.monotonic() + 10
    while slot.waiting != 1:
        assert time.monotonic() < deadline, "the access never waited for the device"
        time.sleep(0.001)


def test_slot_read_while_away_waits_for_next_process_started_from_last_state(harness, monkeypatch):
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 60_000)  # the wait ends on READY only
    harness.slot.write(Reg.SCR, b"\x5a")
    harness.slot.control("quiesce")
    harness.slot.control("save")  # the slot's last known state from now on
    harness.slot.control("resume")
    harness.slot.vacate()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(harness.slot.read(Reg.SCR, 1)))
    reader.start()
    wait_for_waiting_access(harness.slot)
    harness.slot.start()
    harness.slot.wait_ready()
    reader.join()
    assert (got, harness.slot.generation, harness.slot.state) == ([b"\x5a"], 2, SlotState.LIVE)


def test_slot_failing_while_away_ends_waiting_reads_with_all_ones(harness, monkeypatch):
    monkeypatch.setattr(slot_module, "AWAY_WAIT_MS", 60_000)  # only fail() may end the wait
    harness.slot.vacate()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(harness.slot.read(Reg.SCR, 1)))
    reader.start()
    wait_for_waiting_access(harness.slot)
    harness.slot.fail("its restart failed")
    reader.join()
    assert (got, harness.failures) == ([b"\xff"], ["its restart failed"])


def test_supervisor_watching_a_restarted_device_fails_it_on_the_new_process_end_only(harness):
    supervisor = Supervisor()
    supervisor.start()
    supervisor.watch(harness.slot)
    harness.slot.vacate()  # its first process ends on purpose: no failure
    harness.slot.start()
    harness.slot.wait_ready()
    supervisor.watch(harness.slot)
    os.kill(harness.slot.pid, signal.SIGKILL)
    assert harness.failed.wait(10)
    supervisor.close()
    assert (harness.failures, harness.slot.generation) == (["process was killed by signal 9"], 2)


def test_slot_process_a_restart_could_not_reap_is_reported_later_without_its_status(
    tmp_path, caplog
):
    """A restart ended the failed process but could not learn its status (the launcher gone:
    its wait raised), and closed its pidfd; the supervisor, on its own copy of that pidfd,
    reported its end afterwards. Waiting on the closed pidfd raised ValueError (poll of fd
    -1) in the supervisor's thread, which died: no device's end was seen again, and no
    hung device failed its heartbeat."""
    h = Harness(tmp_path, restarts=True)
    first = h.slot.process
    assert isinstance(first, ChildProcess)

    def launcher_gone() -> int:
        raise SplitvmmError("the launcher is gone")

    first._reap = launcher_gone  # type: ignore[method-assign]
    try:
        h.slot.fail("missed its heartbeat")  # through its channel: no pidfd said it yet
        h.slot.restart()
        h.slot.process_ended(first)  # what the supervisor's poll does next
        state = h.slot.state
    finally:
        os.waitpid(first.pid, 0)  # our child, that nobody reaped
        h.close()
    assert state is SlotState.LIVE
    assert f"device serial0 (pid {first.pid}) ended; its exit status is unknown" in caplog.text


# -- the warm spare (monitor/slot.py): started, taken over, replaced, ended ----------------------
def resume_spare(process: ChildProcess, spec: DeviceSpec) -> None:
    """The launcher's resume for our own children: the spare's deferred spec is `spec`'s."""
    resume_child(process, spec.spare(), spec)


@pytest.fixture
def spared(tmp_path):
    """A slot whose device restarts, with a warm spare waiting."""
    h = Harness(tmp_path, resumer=resume_spare, restarts=True)
    h.slot.start_spare()
    yield h
    h.close()


def crash_and_restart(h: Harness) -> None:
    """What the machine does for on_crash = restart: the failure, then restart()."""
    h.slot.fail("crashed on purpose")
    h.slot.restart()


def test_slot_restart_gives_up_a_hung_spare_for_a_cold_start_in_time(spared):
    """A spare that hangs (stopped here) was waited for READY_TIMEOUT_MS (15 s), as long as a
    guest's access waits for the restart (RESTART_WAIT_MS): the access gave up first, a read
    answered all-ones. It gets SPARE_READY_TIMEOUT_MS, then the device starts cold."""
    os.kill(spared.slot.spare_pid, signal.SIGSTOP)
    start = time.monotonic()
    crash_and_restart(spared)
    took = time.monotonic() - start
    assert (spared.slot.state, spared.slot.warm_restarts) == (SlotState.LIVE, 0)
    assert took < slot_module.RESTART_WAIT_MS / 1000 / 2, took
    assert spared.slot.read(Reg.SCR, 1) == b"\x00"


def test_slot_restart_past_a_hung_spare_counts_one_restart_for_its_two_processes(
    spared, monkeypatch
):
    """The spare was put in the slot before it failed to get READY, and the cold process
    after it too: `ctl devices` said 2 restarts (generation - 1) for the one crash."""
    monkeypatch.setattr(slot_module, "SPARE_READY_TIMEOUT_MS", 200)  # (only the spare waits)
    machine = Machine.__new__(Machine)  # what `ctl devices` reports of a slot: _device()
    machine._device_cfg = {"serial0": SimpleNamespace(on_crash="restart")}  # type: ignore[dict-item]
    machine._taps = {}
    os.kill(spared.slot.spare_pid, signal.SIGSTOP)
    crash_and_restart(spared)
    shown = machine._device(spared.slot)
    assert (shown["restarts"], shown["generation"], shown["crashes"]) == (1, 3, 1)


def test_slot_wait_back_waits_out_a_restart_and_counts_no_stall(tmp_path):
    """What the coordinator waits with before it pauses a VM whose device is restarting:
    not a guest's stall, so longest_stall_ms (`ctl devices`) does not count it."""
    h = Harness(tmp_path, restarts=True)
    try:
        h.slot.fail("crashed on purpose")
        assert h.slot.state is SlotState.AWAY
        restart = threading.Thread(target=h.slot.restart)
        restart.start()
        back = h.slot.wait_back(10.0)
        restart.join()
        assert (back, h.slot.generation, h.slot.longest_stall_ms) == (True, 2, 0)
    finally:
        h.close()


def pipe_contents(fd: int) -> bytes:
    os.set_blocking(fd, False)
    got = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            got += chunk
    return got


def test_slot_crash_restart_on_a_pipe_repeats_at_most_max_ahead_frames_of_output(tmp_path):
    """A pipe's growth cannot be counted: what the dead process sent after the last
    checkpoint the monitor had comes out again (monitor/slot.py). LSR polls answered from
    the mirror let the monitor run ahead of the device, by at most MAX_AHEAD frames."""
    h = Harness(tmp_path, restarts=True)
    sent = bytearray()
    try:
        for i in range(2000):  # a polled driver: LSR, then THR
            h.slot.read(Reg.LSR, 1)
            sent += bytes([0x41 + i % 26])
            h.slot.write(Reg.RX_TX, sent[-1:])
        crash_and_restart(h)
        sent += b"!"
        h.slot.write(Reg.RX_TX, b"!")
        assert h.slot.sync()
        got = pipe_contents(h.out_r)
    finally:
        h.close()
    repeated = len(got) - len(sent)
    cut = next((i for i, (a, b) in enumerate(zip(got, sent, strict=False)) if a != b), len(sent))
    assert 0 <= repeated <= MAX_AHEAD, repeated
    assert (got[:cut] + got[cut + repeated :], got[cut : cut + repeated]) == (
        bytes(sent),
        got[cut - repeated : cut],
    )


def test_slot_on_a_pipe_answers_from_the_mirror_only_within_max_ahead_of_a_checkpoint(
    harness, monkeypatch
):
    """Its news never taken between requests (as when the device lags), the slot still
    forwards a read once it is MAX_AHEAD frames past the last checkpoint it has."""
    slot = harness.slot
    monkeypatch.setattr(slot.channel, "drain_events", lambda: None)
    ahead_when_mirrored = []
    for i in range(4 * MAX_AHEAD):
        mirrored = slot.mirrored_reads
        ahead = slot._frames - slot._checkpoint.applied
        slot.read(Reg.LSR, 1)
        if slot.mirrored_reads > mirrored:
            ahead_when_mirrored.append(ahead)
        slot.write(Reg.RX_TX, bytes([0x41 + i % 26]))
    assert max(ahead_when_mirrored) < MAX_AHEAD
    assert len(ahead_when_mirrored) > 2 * MAX_AHEAD  # most polls are still the mirror's


def test_slot_restart_takes_over_its_warm_spare_from_the_checkpoint(spared):
    spare = spared.slot.spare_pid
    spared.slot.write(Reg.SCR, b"\x5a")  # journaled: the spare re-applies it
    crash_and_restart(spared)
    assert (spared.slot.pid, spared.slot.warm_restarts, spared.slot.spare_pid) == (spare, 1, 0)
    assert (spared.slot.state, spared.slot.read(Reg.SCR, 1)) == (SlotState.LIVE, b"\x5a")


def test_slot_input_refused_while_quiesced_goes_to_the_process_that_replaces_it(spared):
    """A device that crashed while a snapshot had it quiesced is replaced by a process that
    is not: input the quiesced one could not take goes to it."""
    slot = spared.slot
    typed(slot, b"ab")
    slot.control("quiesce")
    refused = slot.input(b"cd")
    crash_and_restart(spared)
    typed(slot, b"cd")
    assert refused == 0
    assert b"".join(slot.read(Reg.RX_TX, 1) for _ in range(4)) == b"abcd"


def test_slot_input_past_the_device_buffer_waits_for_the_guest_and_none_is_lost(harness):
    """A paste bigger than the device's input buffer: input() takes what it has room for,
    the rest once the guest (RBR reads) has made room; every byte arrives, in order, and
    the device drops none (no overrun)."""
    slot = harness.slot
    paste = bytes(range(256)) * (3 * RX_BUFFER_MAX // 256)
    got = bytearray()
    left = paste
    deadline = time.monotonic() + 60
    first = None
    while len(got) < len(paste):
        assert time.monotonic() < deadline, f"{len(got)} of {len(paste)} bytes read"
        taken = slot.input(left)
        assert taken is not None
        first = taken if first is None and taken else first
        left = left[taken:]
        while slot.read(Reg.LSR, 1)[0] & Lsr.DR:
            got += slot.read(Reg.RX_TX, 1)
    assert first is not None and first <= RX_BUFFER_MAX
    assert bytes(got) == paste
    assert slot.read(Reg.LSR, 1)[0] & Lsr.OE == 0
    assert slot.stats() is not None and slot.stats().get("rx_overrun", 0) == 0


def test_slot_paste_through_the_console_pump_survives_a_snapshot_and_a_crash_restart(spared):
    """The operator's side as `up` runs it: console.pump() reads a pipe holding 3x the
    device's buffer and offers it to slot.input(); the guest's side reads RBR while LSR.DR.
    A snapshot's quiesce and resume a third of the way in (no read meanwhile: the vCPUs are
    paused), a crash restart two thirds in: every byte arrives once, in order."""
    slot = spared.slot
    paste = bytes(32 + i % 95 for i in range(3 * RX_BUFFER_MAX))
    stdin, writer = os.pipe()
    wake_r, wake_w = os.pipe()
    os.write(writer, paste)
    os.close(writer)
    pump = threading.Thread(target=console.pump, args=(stdin, wake_r, slot.input, False))
    pump.start()
    got = bytearray()
    quiesced = restarted = False
    deadline = time.monotonic() + 60
    try:
        while len(got) < len(paste) and time.monotonic() < deadline:
            if not quiesced and len(got) >= len(paste) // 3:
                slot.control("quiesce")
                time.sleep(0.1)  # the pump offers meanwhile, and is refused
                slot.control("resume")
                quiesced = True
            if not restarted and len(got) >= 2 * len(paste) // 3:
                crash_and_restart(spared)
                restarted = True
            if slot.read(Reg.LSR, 1)[0] & Lsr.DR:
                got += slot.read(Reg.RX_TX, 1)
            else:
                time.sleep(0.001)
    finally:
        os.write(wake_w, b"x")
        pump.join(10)
        for fd in (stdin, wake_r, wake_w):
            os.close(fd)
    assert (quiesced, restarted, slot.warm_restarts) == (True, True, 1)
    assert bytes(got) == paste


def test_slot_start_spare_after_a_warm_restart_starts_a_new_one(spared):
    crash_and_restart(spared)
    spared.slot.start_spare()
    assert spared.slot.spare_pid not in (0, spared.slot.pid)


def test_slot_spare_killed_before_the_crash_restart_starts_cold(spared):
    process = spared.slot._spare[0]
    process.kill()
    assert readable(process.pidfd, 10)  # it has exited: its stdin pipe has no reader
    spared.slot.write(Reg.SCR, b"\x33")
    crash_and_restart(spared)
    assert (spared.slot.warm_restarts, spared.slot.generation) == (0, 2)
    assert spared.slot.pid != process.pid and spared.slot.read(Reg.SCR, 1) == b"\x33"
    assert not os.path.exists(spare_path(spared.slot.endpoint))


def watched_spares(h: Harness) -> tuple[Supervisor, list[DeviceSlot]]:
    """A supervisor watching `h`'s spare, and the slots whose spares it saw lost (the
    machine's restarter then starts another: here the test does)."""
    lost: list[DeviceSlot] = []
    supervisor = Supervisor(on_spare_lost=lost.append)
    supervisor.start()
    supervisor.watch_spare(h.slot, h.slot._spare[0])
    return supervisor, lost


def test_slot_spare_killed_while_waiting_is_ended_and_replaced_before_any_crash(spared):
    """A spare that dies while it waits is seen at once (its pidfd), not at the next
    crash: another is started, and that crash is served warm."""
    supervisor, lost = watched_spares(spared)
    try:
        first = spared.slot._spare[0]
        first.kill()
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lost == [spared.slot] and spared.slot.spare_pid == 0
        assert not os.path.exists(spare_path(spared.slot.endpoint))  # its name freed
        replacement = spared.slot.start_spare()  # what the restarter does
        assert replacement is not None and replacement.pid != first.pid
        spared.slot.write(Reg.SCR, b"\x44")
        crash_and_restart(spared)
    finally:
        supervisor.close()
    assert (spared.slot.warm_restarts, spared.slot.pid) == (1, replacement.pid)
    assert spared.slot.read(Reg.SCR, 1) == b"\x44"


def test_slot_spares_that_keep_dying_are_not_replaced_for_ever(spared, monkeypatch):
    monkeypatch.setattr(slot_module, "MAX_SPARE_LOSSES", 2)
    supervisor, lost = watched_spares(spared)
    try:
        for _ in range(2):
            spare = spared.slot._spare[0]
            spare.kill()
            assert readable(spare.pidfd, 10)
            deadline = time.monotonic() + 10
            while spared.slot.spare_pid and time.monotonic() < deadline:
                time.sleep(0.01)
            if spared.slot.start_spare() is not None:
                supervisor.watch_spare(spared.slot, spared.slot._spare[0])
    finally:
        supervisor.close()
    assert lost == [spared.slot]  # the second loss asked for no other
    assert spared.slot.spare_pid == 0 and spared.slot.start_spare() is None


def test_slot_without_a_spare_has_its_spare_name_free_already(spared, monkeypatch):
    """The moment the slot shows no spare, the next can bind: the lost spare's name is
    freed with it, not after the (slow) wait for its end. CI met a start_spare() in that
    window: EADDRINUSE, and no spare."""
    seen_ended = threading.Event()
    go_on = threading.Event()
    how = slot_module._how

    def slow_how(process):
        seen_ended.set()
        go_on.wait(10)
        return how(process)

    monkeypatch.setattr(slot_module, "_how", slow_how)
    spare = spared.slot._spare[0]
    spare.kill()
    assert readable(spare.pidfd, 10)
    ender = threading.Thread(target=spared.slot.spare_ended, args=(spare,))
    ender.start()
    try:
        assert seen_ended.wait(10) and spared.slot.spare_pid == 0
        assert not os.path.exists(spare_path(spared.slot.endpoint))
        assert spared.slot.start_spare() is not None
    finally:
        go_on.set()
        ender.join()


def test_slot_spare_watch_ignores_the_end_of_a_spare_that_took_over(spared):
    """A spare that took over is the slot's process: its end is a crash (process_ended),
    not a lost spare."""
    supervisor, lost = watched_spares(spared)
    try:
        crash_and_restart(spared)
        took_over = spared.slot.process
        assert took_over is not None
        took_over.kill()
        assert readable(took_over.pidfd, 10)
        time.sleep(0.2)  # the supervisor's poll has seen it end
    finally:
        supervisor.close()
    assert lost == []


def test_slot_spare_refused_by_its_spawner_fails_nothing_and_restart_goes_cold(tmp_path):
    def no_spares(spec: DeviceSpec) -> tuple[ChildProcess, int]:
        if spec.deferred:
            raise DeviceFailure(f"device {spec.name}: the launcher refused it")
        return spawn_child(spec)

    h = Harness(tmp_path, spawner=no_spares, resumer=resume_spare, restarts=True)
    try:
        h.slot.start_spare()
        crash_and_restart(h)
        assert (h.slot.state, h.slot.spare_pid, h.slot.warm_restarts) == (SlotState.LIVE, 0, 0)
        assert (h.failures, h.slot.generation) == (["crashed on purpose"], 2)
    finally:
        h.close()


def killing_in_start(calls: list[ChildProcess], which: range = range(2, 3)):
    """A spawner that kills the processes it starts whose number (from 1) is in `which`
    (by default the second: the first restart's) in their start."""

    def spawner(spec: DeviceSpec) -> tuple[ChildProcess, int]:
        process, listener = spawn_child(spec)
        calls.append(process)
        if len(calls) in which:
            process.send_signal(signal.SIGKILL)
        return process, listener

    return spawner


def test_slot_restart_whose_process_dies_before_ready_is_a_crash_the_policy_restarts(tmp_path):
    """A kill loop may meet the new process in its start: that is another crash, for the
    on_crash policy and its budget, not the end of the device (it stopped the VM)."""
    calls: list[ChildProcess] = []
    h = Harness(tmp_path, spawner=killing_in_start(calls), restarts=True)
    try:
        h.slot.write(Reg.SCR, b"\x5a")
        h.slot.fail("killed by the test")
        h.slot.restart()  # its process dies before READY: the policy asks for another
        between = (h.slot.state, h.slot.restarting, h.slot.crashes)
        h.slot.restart()
        after = (h.slot.state, h.slot.read(Reg.SCR, 1), len(calls))
    finally:
        h.close()
    assert between == (SlotState.AWAY, True, 2)
    assert after == (SlotState.LIVE, b"\x5a", 3)
    assert h.failures[0] == "killed by the test" and "before it was ready" in h.failures[1]


def _exit_3_in_sandbox(fds: dict[str, int]) -> dict[str, object]:
    os._exit(3)  # connected, sandboxed, no READY and no word: a crash in the device's start


def _exiting_after_connect(spec: DeviceSpec) -> tuple[ChildProcess, int]:
    """spawn_child, the process exiting with status 3 once connected, before READY."""
    import base64

    import cloudpickle  # type: ignore[import-untyped]

    from splitvmm.record import replace

    hook = base64.b64encode(cloudpickle.dumps(_exit_3_in_sandbox)).decode()
    return spawn_child(replace(spec, hook=hook))


def test_slot_device_that_ended_before_the_monitor_read_its_channel_does_not_hang_it(tmp_path):
    """At a VM's start the monitor reads each device's channel in turn (Machine.run): one
    that crashed after connecting, before the monitor got to it, must be reported, not hang
    the monitor in the greeting it sends on that connection's notice."""
    b = Harness(tmp_path, _exiting_after_connect, started=False)
    b.slot.start()
    process = b.slot.process
    assert process is not None
    assert readable(process.pidfd, 10), "the device did not exit"
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            b.slot.wait_ready()
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(10)
    if waiter.is_alive():  # stuck in ZeroMQ: the slot cannot be closed under it
        pytest.fail("wait_ready hung on a device that had ended")
    try:
        assert len(errors) == 1 and isinstance(errors[0], DeviceFailure), errors
        assert "exited with status 3" in str(errors[0])
    finally:
        b.close()


@pytest.mark.parametrize("attempt", range(5))
def test_slot_device_that_exits_after_connecting_is_reported_with_its_status(tmp_path, attempt):
    """The device proper exits before READY, the monitor reading its channel: its
    connection ends at once, its warden (whose pidfd the monitor holds) a moment later. The
    failure must say how it ended, not 'did not start within 15000 ms' ~0.1 s after its
    spawn (wait_ready spun on the ended connection), nor "within 0 ms" (its wait's length,
    which began after it died, read as its life's)."""
    b = Harness(tmp_path, _exiting_after_connect, started=False)
    try:
        b.slot.start()
        with pytest.raises(DeviceFailure, match="exited with status 3 before it was ready$"):
            b.slot.wait_ready()
    finally:
        b.close()


def test_slot_restart_whose_process_dies_before_ready_fails_for_good_past_the_policy(tmp_path):
    calls: list[ChildProcess] = []
    h = Harness(tmp_path, spawner=killing_in_start(calls), restarts=True)
    try:
        h.slot.fail("killed by the test")
        h.restarts = False  # the budget is spent by now
        with pytest.raises(DeviceFailure, match="restart failed: was killed by signal 9"):
            h.slot.restart()
        state = h.slot.state
    finally:
        h.close()
    assert (state, len(h.failures)) == (SlotState.FAILED, 2)


class SeesEndsAtOnce:
    """A supervisor that reports the end of a process it is given, if it has ended, at once
    (a real one does at its next poll: the pidfd is readable)."""

    def watch(self, slot: DeviceSlot) -> None:
        process = slot.process
        assert process is not None
        if process.ended():
            slot.process_ended(process)


def test_restarter_restart_whose_process_dies_before_ready_logs_its_death_once(tmp_path, caplog):
    """The machine's restarter handed the supervisor the process a restart had left in the
    slot, dead before READY and its death logged: the supervisor logged it again, the second
    line reading like another death ("failed in its restart: exited with status -9 within
    100 ms", then "was killed by signal 9")."""
    calls: list[ChildProcess] = []
    h = Harness(tmp_path, spawner=killing_in_start(calls), restarts=True)
    m = bare_machine()
    m._restarts, m._supervisor, m.slots = queue.Queue(), SeesEndsAtOnce(), [h.slot]
    try:
        h.slot.fail("killed by the test")
        m._restarts.put(h.slot)  # the policy's restart; its process dies before READY
        m._restarts.put(None)
        m._restarter()
        state = (h.slot.state, h.slot.restarting, h.slot.pid)
    finally:
        h.close()
    dead = calls[1].pid
    said = [r.getMessage() for r in caplog.records if f"(pid {dead})" in r.getMessage()]
    assert said == [
        f"device serial0 (pid {dead}) failed in its restart: was killed by signal 9 before "
        "it was ready"
    ]
    assert state == (SlotState.AWAY, True, None)  # the dead process shows no pid either


def test_slot_restarts_failing_before_ready_again_and_again_end_the_device(tmp_path):
    """Each such failure comes only at READY_TIMEOUT_MS for a process that hangs in its start:
    slower than any restart budget fills. MAX_FAILED_STARTS in a row are the end of it."""
    calls: list[ChildProcess] = []
    h = Harness(tmp_path, spawner=killing_in_start(calls, range(2, 100)), restarts=True)
    try:
        h.slot.fail("killed by the test")
        for _ in range(slot_module.MAX_FAILED_STARTS - 1):
            h.slot.restart()
            assert h.slot.state is SlotState.AWAY
        with pytest.raises(DeviceFailure, match="its last 3 restarts failed before READY"):
            h.slot.restart()
        state = h.slot.state
    finally:
        h.close()
    assert (state, len(calls)) == (SlotState.FAILED, 1 + slot_module.MAX_FAILED_STARTS)


def test_slot_close_ends_its_spare_and_its_socket(tmp_path):
    h = Harness(tmp_path, resumer=resume_spare, restarts=True)
    h.slot.start_spare()
    process = h.slot._spare[0]
    h.close()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(spare_path(h.slot.endpoint))


def test_spare_ended_before_its_spec_exits_0_having_connected_nothing(tmp_path):
    """A spare holds no state and makes no connection until the rest of its spec comes:
    given EOF instead, it leaves from where it waits (exit 0), its channel never used."""
    irq = EventFd()
    spec = DeviceSpec("serial0", "serial", f"ipc://{tmp_path}/serial0.sock", {"irq": irq.fd})
    process, listener = spawn_child(spec.spare())
    try:
        process.popen.stdin.close()
        status = process.wait(30)
        pending = readable(listener, 0)  # a connection in the backlog polls readable
    finally:
        os.close(listener)
        process.close()
        irq.close()
    assert (status, pending) == (0, False)


def test_channel_post_to_a_dead_process_fails_at_once_not_at_the_write_timeout(harness):
    """A posted write to a device whose process ended is refused as soon as the pidfd says
    so; it used to wait WRITE_TIMEOUT_MS holding the slot's lock (vCPUs stalled behind it)."""
    channel, process = harness.slot.channel, harness.slot.process
    assert channel is not None and process is not None
    process.kill()
    process.wait(5)
    with pytest.raises(ChannelError, match="its process ended"):
        for _ in range(100_000):  # past any queue ZeroMQ may still take
            channel.post(bytes(24))


# -- the register mirror (monitor/mirror.py) ---------------------------------------------------
def test_slot_read_after_posted_write_elsewhere_sees_its_effect(harness):
    slot = harness.slot
    slot.read(Reg.LCR, 1)  # the mirror is current
    slot.write(Reg.LCR, bytes([Lcr.DLAB | Lcr.WLEN8]))
    slot.write(Reg.IER, b"\x07")  # DLM, with DLAB set
    got, mirrored = slot.read(Reg.IER, 1), slot.mirrored_reads
    again = slot.read(Reg.IER, 1)  # current again: the device published before its reply
    assert (got, again, slot.mirrored_reads - mirrored) == (b"\x07", b"\x07", 1)


def test_slot_read_after_a_restamped_forwarded_read_is_answered_by_the_mirror(harness):
    slot = harness.slot
    slot.write(Reg.SCR, b"\x5a")
    slot.read(Reg.IIR_FCR, 1)  # forwarded (IIR is not mirrored); it changes no mirrored value
    mirrored = slot.mirrored_reads
    got = slot.read(Reg.SCR, 1)
    assert (got, slot.mirrored_reads - mirrored) == (b"\x5a", 1)


def test_slot_lsr_after_credited_thr_write_is_the_devices_value(file_harness):
    slot = file_harness.slot
    slot.read(Reg.LSR, 1)
    mirrored = slot.mirrored_reads
    slot.write(Reg.RX_TX, b"A")  # credited: the output file takes it at once
    from_mirror = slot.read(Reg.LSR, 1)
    slot.channel.mirror.paused = True  # the device itself, for comparison
    from_device = slot.read(Reg.LSR, 1)
    assert (from_mirror, slot.mirrored_reads - mirrored) == (from_device, 1)
    assert slot.sync() and os.read(file_harness.out_r, 8) == b"A"


def test_slot_word_write_at_the_credit_offset_is_no_credit_write(file_harness):
    """`outw 0x3f8` is THR, then IER (the device splits it as an ISA bus does). Counted as
    a THR write within the credit, the IER read after it came from the mirror, which said
    IER was still 0."""
    slot = file_harness.slot
    slot.read(Reg.LSR, 1)  # the mirror current, with its THR credit
    slot.write(Reg.RX_TX, bytes([ord("A"), Ier.RDI]))
    assert slot.read(Reg.IER, 1) == bytes([Ier.RDI])
    assert slot.sync() and os.read(file_harness.out_r, 8) == b"A"


def test_slot_lsr_after_thr_writes_to_a_pipe_is_the_devices_value_from_the_mirror(harness):
    """A pipe (or terminal) may not take a byte the moment it is written; LSR does not say
    whether it did (devprocs/serial.py), so the device's credit holds on it too."""
    slot = harness.slot
    slot.read(Reg.LSR, 1)
    mirrored = slot.mirrored_reads
    slot.write(Reg.RX_TX, b"A")
    slot.write(Reg.RX_TX, b"B")
    from_mirror = slot.read(Reg.LSR, 1)
    slot.channel.mirror.paused = True  # the device itself, for comparison
    from_device = slot.read(Reg.LSR, 1)
    assert (from_mirror, slot.mirrored_reads - mirrored) == (from_device, 1)
    assert slot.sync() and os.read(harness.out_r, 8) == b"AB"


def drains_counted(slot: DeviceSlot, monkeypatch) -> list[int]:
    """How often the slot asks its channel for the device's news (one entry a time)."""
    channel, asked = slot.channel, []
    assert channel is not None
    drain = channel.drain_events

    def counted() -> None:
        asked.append(1)
        drain()

    monkeypatch.setattr(channel, "drain_events", counted)
    return asked


def test_slot_quiet_device_is_asked_for_news_once_in_news_every_reads(harness, monkeypatch):
    # the count alone: eight reads may take longer than the news's age on a loaded host
    monkeypatch.setattr(mirror_module, "NEWS_MAX_AGE_NS", 1 << 62)
    slot = harness.slot
    slot.write(Reg.SCR, b"\x5a")
    slot.read(Reg.SCR, 1)  # current again, and quiet: IER is 0, DLAB clear
    asked, mirrored = drains_counted(slot, monkeypatch), slot.mirrored_reads
    quiet = [slot.read(Reg.SCR, 1) for _ in range(2 * NEWS_EVERY)]
    assert (quiet, len(asked)) == ([b"\x5a"] * 2 * NEWS_EVERY, 2)
    assert slot.mirrored_reads - mirrored == 2 * NEWS_EVERY
    # THRI on, posted: the quiet mirror is behind a write its credit does not cover, so the
    # next read goes to the device, whose new mirror is not quiet: news at every read.
    slot.write(Reg.IER, bytes([Ier.THRI]))
    mirrored = slot.mirrored_reads
    ier = slot.read(Reg.IER, 1)
    asked.clear()
    loud = [slot.read(Reg.SCR, 1) for _ in range(3)]
    assert (ier, slot.mirrored_reads - mirrored, loud, len(asked)) == (
        bytes([Ier.THRI]),
        3,
        [b"\x5a"] * 3,
        3,
    )


def test_slot_lsr_overrun_cleared_by_exactly_one_read_through_the_mirror(harness):
    slot = harness.slot
    # Input past the device's room (input() never sends it; a monitor that did): LSR.OE set
    flood = b"x" * (RX_BUFFER_MAX + 8)
    for i in range(0, len(flood), wire.MAX_INPUT_CHUNK):
        with slot._lock:
            slot._post_frames_locked(
                ((wire.encode_input(flood[i : i + wire.MAX_INPUT_CHUNK]), None),)
            )
    mirrored = slot.mirrored_reads
    first, second = slot.read(Reg.LSR, 1)[0], slot.read(Reg.LSR, 1)[0]
    third = slot.read(Reg.LSR, 1)[0]
    assert (first & Lsr.OE, second & Lsr.OE, third & Lsr.OE) == (Lsr.OE, 0, 0)
    # The first went to the device (OE set: not valid in its mirror), which cleared OE; its
    # mirror, sent before that reply, answers the next two.
    assert slot.mirrored_reads - mirrored == 2


def test_slot_quiesced_device_answers_its_reads_itself(harness):
    slot = harness.slot
    slot.write(Reg.SCR, b"\x5a")
    slot.read(Reg.SCR, 1)
    slot.control("quiesce")
    mirrored = slot.mirrored_reads
    during = slot.read(Reg.SCR, 1), slot.read(Reg.SCR, 1)
    quiesced_mirrored = slot.mirrored_reads - mirrored
    slot.control("resume")
    after = slot.read(Reg.SCR, 1)
    assert (during, quiesced_mirrored, after) == ((b"\x5a", b"\x5a"), 0, b"\x5a")
    assert slot.mirrored_reads - mirrored == 1  # resumed: the device's new mirror answers


def test_slot_input_while_quiesced_reaches_the_device_after_its_resume(harness):
    """Input applied to a quiesced device changed a state it had saved already (and its
    interrupt went into the vCPUs' saved state): it is not taken until the resume."""
    slot = harness.slot
    slot.control("quiesce")
    refused = slot.input(b"late")
    during = slot.read(Reg.LSR, 1)[0] & Lsr.DR
    saved = slot.control("save")
    slot.control("resume")
    typed(slot, b"late")
    received = b"".join(slot.read(Reg.RX_TX, 1) for _ in range(4))
    assert (refused, during, saved["fields"]["rx"], received) == (0, 0, "", b"late")


def test_slot_restarted_device_starts_with_no_mirror_of_the_old_process(harness):
    slot = harness.slot
    slot.write(Reg.SCR, b"\x5a")
    slot.read(Reg.SCR, 1)
    slot.read(Reg.SCR, 1)  # answered by the old process's mirror
    slot.vacate()
    slot.start()  # from the slot's last state: none was saved, so a fresh device
    slot.wait_ready()
    assert slot.read(Reg.SCR, 1) == b"\x00"


# -- a PCI function's MSI-X routes after a restart ------------------------------------------
class FakeMsi:
    """The monitor's MSI routing (monitor/irqroutes.py MsiVectors), every route granted."""

    def __init__(self) -> None:
        self.routed: list[int] = []

    def route(self, vector: int, address: int, data: int) -> str:
        self.routed.append(vector)
        return ""


class SlotBackedDevice:
    """What tests.virtio.support.Driver drives: here the slot, as a vCPU's accesses do."""

    def __init__(self, slot: DeviceSlot, fds: dict[str, int]) -> None:
        self.slot = slot
        self.ctx = SimpleNamespace(fds=fds)

    def read(self, offset: int, size: int) -> bytes:
        return self.slot.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.slot.write(offset, data)

    def event_sources(self) -> list[object]:
        return []


MSIX_WAIT_S = 2.0  # the supervisor's heartbeat comes every 1 s: no test of ours runs one


def test_virtio_restarted_with_msix_on_interrupts_at_once_not_at_the_next_heartbeat(tmp_path):
    """The new process asks for its routes right after READY and holds its interrupts until
    they are done: the slot takes those requests at once (they used to wait for the next
    channel call, the heartbeat's, up to ~1 s with the guest's I/O stalled)."""
    from tests.unit.test_virtio_pci import msix_on
    from tests.virtio.support import Driver, Ring, close_fds, host_fds

    fds = host_fds("virtio-rng")
    transport = stand_in_transport()
    ram = GuestRam.map(fds["ram"], fds["dirty"], [tuple(r) for r in transport["ram"]])
    msi = FakeMsi()
    spawn = Spawn(
        "rng0", "virtio-rng", MODELS["virtio-rng"].transport.size, {}, fds,
        transport=transport, msi=msi,
    )  # fmt: skip
    slot = DeviceSlot(spawn, tmp_path, spawn_child, lambda slot, reason: True)
    try:
        slot.start()
        slot.wait_ready()
        driver, ring = Driver(SlotBackedDevice(slot, fds)), Ring(ram)
        driver.start(ring, vector=0)
        msix_on(driver, 0)
        driver.status()  # an access: the monitor takes the route request on its way
        ring.add([(*ring.buffer(8), True)])
        os.eventfd_write(fds["notify0"], 1)
        assert readable(fds["msix0"], MSIX_WAIT_S)
        os.eventfd_read(fds["msix0"])

        slot.fail("killed by the test")
        slot.restart()
        # after_restart()'s interrupt, for a completion the dead process may not have sent
        assert readable(fds["msix0"], MSIX_WAIT_S), "no interrupt after the restart"
        os.eventfd_read(fds["msix0"])
        ring.add([(*ring.buffer(8), True)])
        os.eventfd_write(fds["notify0"], 1)
        assert readable(fds["msix0"], MSIX_WAIT_S), "no interrupt for a request after it"
        used = ring.used_idx()
    finally:
        slot.close()
        ram.close()
        close_fds(fds)
    assert used == 2 and msi.routed == [0, 0]


def test_a_slots_window_waits_for_every_process_of_its_device_and_both_ends_count(tmp_path):
    """The window a vCPU's wait looks through is the slot's, handed to each process's channel:
    a restart learns nothing anew, and the counters `ctl devices` shows are the slot's. The
    device's own end counts its looks among its counters."""
    machine = Machine.__new__(Machine)  # what `ctl devices` reports of a slot: _device()
    machine._device_cfg = {"serial0": SimpleNamespace(on_crash="restart")}  # type: ignore[dict-item]
    machine._taps = {}
    h = Harness(tmp_path, restarts=True)
    try:
        window = h.slot.reply_poll
        window.polls, window.caught = 7, 5
        assert h.slot.channel is not None and h.slot.channel.access_poll is window
        crash_and_restart(h)
        assert h.slot.generation == 2 and h.slot.channel.access_poll is window
        assert machine._device(h.slot)["reply_polls"] == {"looked": 7, "caught": 5}
        assert h.slot.read(Reg.SCR, 1) == b"\x00"
        counters = h.slot.stats()
        assert counters is not None and {"channel_polls", "channel_polls_caught"} <= set(counters)
    finally:
        h.close()


class RestartingHarness(Harness):
    """on_crash = restart, with a restarter thread as the machine's (Machine._restarter): it
    lives on, as a device process started from a thread dies with that thread (PDEATHSIG)."""

    def __init__(self, tmp_path) -> None:
        self.restarts_asked: queue.SimpleQueue = queue.SimpleQueue()
        self.restarter = threading.Thread(target=self._restarter, daemon=True)
        self.restarter.start()
        super().__init__(tmp_path, restarts=True)

    def _restarter(self) -> None:
        while (slot := self.restarts_asked.get()) is not None:
            slot.restart()

    def _on_failure(self, slot, reason):
        super()._on_failure(slot, reason)
        self.restarts_asked.put(slot)
        return True

    def close(self) -> None:
        self.restarts_asked.put(None)
        self.restarter.join(10)
        super().close()


def test_snapshot_quiesce_of_a_device_dead_but_not_yet_seen_goes_to_its_restart(
    tmp_path, monkeypatch
):
    h = RestartingHarness(tmp_path)
    try:
        coord, _ = coordinator(tmp_path, monkeypatch)
        coord.machine.slots = [h.slot]
        pid = h.slot.crash(signal.SIGKILL)  # what `ctl crash-device` does
        h.slot.process.wait(10)  # dead; no supervisor has said so yet: the slot is still LIVE
        assert h.slot.state is SlotState.LIVE
        quiesced: dict[str, tuple[int, int]] = {}

        states = coord._quiesce_devices(Deadline(5.0), quiesced)  # raised: snapshot aborted

        coord._check_generations(states)  # the process that answered is the one saved
        assert (h.slot.pid != pid, quiesced) == (True, {"serial0": (1, 2)})
        coord._resume_devices(quiesced, Deadline(5.0))
    finally:
        h.close()


@pytest.mark.parametrize("op", ["quiesce", "save"])
def test_control_to_a_dead_supervised_device_fails_it_with_how_its_process_ended(
    tmp_path, monkeypatch, op
):
    h = Harness(tmp_path)  # on_crash: the device is not restarted
    try:
        process, channel = h.slot.process, h.slot.channel
        h.slot.supervised = True  # as Supervisor.watch() marks it; its poll is played below
        process.send_signal(signal.SIGSEGV)
        assert process.ended(10)  # dead, its end not reported yet
        asked = threading.Event()
        real_control = channel.control

        def control(*args, **kwargs):  # the request is on its way, the slot's lock held
            asked.set()
            return real_control(*args, **kwargs)

        monkeypatch.setattr(channel, "control", control)

        def supervisor_reports_the_end() -> None:  # what the supervisor's poll does next
            asked.wait(10)
            h.slot.process_ended(process)

        supervisor = threading.Thread(target=supervisor_reports_the_end)
        supervisor.start()
        with pytest.raises(DeviceFailure):
            h.slot.control(op)
        supervisor.join(10)
        assert (h.failures, h.slot.last_failure) == (
            ["process was killed by signal 11"],
            "process was killed by signal 11",
        )
    finally:
        h.close()


def _hang_before_ready(fds: dict[str, int]) -> dict[str, object]:
    import select

    # connected, sandboxed, no READY: a device slow to start (a loaded host); its irq
    # eventfd never becomes readable (poll: what a device's filter allows)
    waiting = select.poll()
    waiting.register(fds["irq"], select.POLLIN)
    waiting.poll(60_000)
    return {}


def _hanging_in_start(spec: DeviceSpec) -> tuple[ChildProcess, int]:
    import sys

    import cloudpickle  # type: ignore[import-untyped]

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # outside the device's path
    hook = base64.b64encode(cloudpickle.dumps(_hang_before_ready)).decode()
    return spawn_child(replace(spec, hook=hook))


def test_machine_stopped_while_a_device_starts_returns_the_stop_at_once(tmp_path):
    """A stop signal while a device starts (before its READY): the VM stops at once with
    the signal's outcome, not READY_TIMEOUT_MS later with the device's "did not start"
    (exit 1, the operator's signal lost)."""
    cfg = parse_config({"boot": {"kernel": "bzImage"}}, tmp_path, check_files=False)
    m = Machine(cfg, runtime_root=tmp_path)
    h = Harness(tmp_path, _hanging_in_start, started=False)
    h.slot.start()
    m.slots = [h.slot]
    m._spawned_at[h.slot.name] = time.perf_counter()
    stopper = threading.Timer(0.3, m.stop, [Outcome(143, "stopped by SIGTERM")])
    stopper.start()
    start = time.monotonic()
    try:
        outcome = m.run()  # DeviceFailure "did not start within 15000 ms" before the fix
    finally:
        took = time.monotonic() - start
        stopper.cancel()
        h.close()
    assert (outcome.status, outcome.message) == (143, "stopped by SIGTERM")
    assert took < 2, took


def test_slot_restart_whose_process_hangs_before_ready_ends_when_the_vm_stops(tmp_path):
    """The VM stops (Machine.stop: give_up_host_io) while a crash restart waits for its new
    process's READY: the restart ends then, the device failed for good (a vCPU's access
    waiting for it reads all-ones), not READY_TIMEOUT_MS later (the vCPUs' join waited)."""
    calls: list[DeviceSpec] = []

    def first_then_hanging(spec: DeviceSpec) -> tuple[ChildProcess, int]:
        calls.append(spec)
        return spawn_child(spec) if len(calls) == 1 else _hanging_in_start(spec)

    h = Harness(tmp_path, spawner=first_then_hanging, restarts=True)
    stopper = threading.Timer(0.3, h.slot.give_up_host_io)
    try:
        h.slot.fail("killed by the test")
        stopper.start()
        start = time.monotonic()
        with pytest.raises(DeviceFailure):
            h.slot.restart()  # waited 15 s, then left the device away for another restart
        took = time.monotonic() - start
        state = h.slot.state
    finally:
        stopper.cancel()
        h.close()
    assert state is SlotState.FAILED
    assert took < 2, took


def test_slot_restart_through_a_spare_ends_when_the_vm_stops_without_a_cold_start(tmp_path, caplog):
    """The VM stops (give_up_host_io) while a crash restart waits for its warm spare's
    READY (a loaded host: the spare is stopped here): the restart ends as a cold one's wait
    does (8d8fda5), the device failed for good, quietly; no cold process is spawned for a
    VM that is going (its spawn may wait on the launcher's zygote), and no "its spare failed
    before READY ... starting cold" warning for a stop that was no failure."""
    spawned: list[DeviceSpec] = []

    def counting(spec: DeviceSpec) -> tuple[ChildProcess, int]:
        spawned.append(spec)
        return spawn_child(spec)

    h = Harness(tmp_path, spawner=counting, resumer=resume_spare, restarts=True)
    stopper = threading.Timer(0.3, h.slot.give_up_host_io)
    try:
        h.slot.start_spare()
        assert len(spawned) == 2  # the first process and its spare
        os.kill(h.slot.spare_pid, signal.SIGSTOP)
        h.slot.fail("killed by the test")
        caplog.clear()  # the crash's own line: what comes after it is the restart's
        stopper.start()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(DeviceFailure):
            h.slot.restart()  # the spare given up at the stop, then a cold process spawned
        took = time.monotonic() - start
        state = h.slot.state
    finally:
        stopper.cancel()
        h.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (state, len(spawned), said) == (SlotState.FAILED, 2, [])
    assert took < 2, took


def test_slot_syncs_with_the_output_stalled_neither_wait_nor_fail_the_device(tmp_path):
    """The slot's sync -- the one pci/function.py makes after every synced write of a virtio function
    (config space, MSI-X table, common configuration) and slot.py after each late write of a
    restart -- is answered at once. Each one waited FLUSH_TIMEOUT_MS (1 s) for the stalled line,
    and the third within 10 s took the device over the slot's latency budget (2.5 s): a healthy
    device failed, and with on_crash = "stop" (the default) the VM with it."""
    h = Harness(tmp_path)
    try:
        fcntl.fcntl(h.out_w, fcntl.F_SETPIPE_SZ, 4096)
        for _ in range(3 * 4096):  # the pipe's 4 KiB, the device's 4 KiB, then dropped
            h.slot.write(Reg.RX_TX, b"x")
        synced = [h.slot.sync() for _ in range(4)]  # four synced writes of a driver's
        assert (synced, h.failures) == ([True] * 4, [])
    finally:
        h.close()


class Committing:
    """A suspend's writer whose commit (an fsync of the whole of guest RAM, seconds for a large
    VM) sees a device crash, and the machine's restarter take its turn meanwhile."""

    def __init__(self, target, during) -> None:
        self.target, self.during = target, during

    def __enter__(self) -> Committing:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def commit(self, sign_key: bytes | None):
        self.during()
        self.target.mkdir()
        return self.target


def test_suspend_holds_the_restart_of_a_device_that_crashed_after_its_save(tmp_path, monkeypatch):
    """A suspended VM stays stopped, devices included: a device that crashed while the
    snapshot was committed, once it had saved its state, was restarted at once, and its new
    process, never quiesced, served what the guest had queued before the snapshot. Here a
    transmit chain made available just before the pause (its kick not served yet): the
    restarted virtio-net sent its frame to the TAP, while the snapshot holds the chain as
    not taken, for its restore to send again. The frame went out twice. Its restart now
    waits for the snapshot's end: a suspend's VM stops first."""
    from tests.virtio.support import (
        DRIVER_OK,
        F_VERSION_1,
        FEATURES_OK,
        Driver,
        Ring,
        close_fds,
        host_fds,
    )

    peers: dict[str, int] = {}
    fds = host_fds("virtio-net", peers=peers)
    transport = stand_in_transport()
    ram = GuestRam.map(fds["ram"], fds["dirty"], [tuple(r) for r in transport["ram"]])
    m = bare_machine()
    m._device_cfg = {"net0": SimpleNamespace(on_crash="restart")}  # type: ignore[dict-item]
    m._launcher = SimpleNamespace(exited=lambda: False, abandon=lambda why: None)
    m._budgets, m._restarts, m._supervisor = {"net0": RestartBudget()}, queue.Queue(), None
    size = MODELS["virtio-net"].transport.size
    spawn = Spawn("net0", "virtio-net", size, {}, fds, transport=transport, msi=FakeMsi())
    slot = DeviceSlot(spawn, tmp_path, spawn_child, m._device_failed)
    coord, _ = coordinator(tmp_path, monkeypatch)
    coord.machine.slots, m.coordinator = [slot], coord
    saved: dict[str, object] = {}

    def crash_and_the_restarters_turn() -> None:
        slot.fail("crashed while the suspend committed")  # the machine's policy: restart
        m._restarts.put(None)
        m._restarter()
        slot.sync()  # a restarted process served its kicks by now (none, away: False)

    def write(target, deadline, quiesced, tracker, stop, stays_stopped):
        states = coord._quiesce_devices(deadline, quiesced)
        coord._check_generations(states)  # as _write: every device is the one it saved
        saved.update(states["net0"][1])
        return Committing(target, crash_and_the_restarters_turn)

    monkeypatch.setattr(coord, "_write", write)
    try:
        slot.start()
        slot.wait_ready()
        driver, tx = Driver(SlotBackedDevice(slot, fds)), Ring(ram)
        assert driver.negotiate(F_VERSION_1) & FEATURES_OK
        driver.setup_queue(1, tx)
        driver.set_status(driver.status() | DRIVER_OK)
        assert slot.sync()  # DRIVER_OK served (it looks at the rings): the chain comes after
        tx.add([(*tx.buffer(bytes(12) + b"\xff" * 6 + b"\x52" * 6 + b"\x08\x00"), False)])

        m._snapshot({"path": str(tmp_path / "snap")}, suspend=True)

        sent = []
        with contextlib.suppress(BlockingIOError):
            while True:
                sent.append(os.read(peers["tap"], 65536))
    finally:
        slot.close()
        ram.close()
        close_fds(fds | peers)
    assert (m.stopping, saved["fields"]["queues"][1]["last_avail"]) == (True, 0)  # type: ignore[index]
    assert sent == [], "a frame the suspended VM's restore sends was sent already"


def test_slot_held_writes_faster_than_the_device_applies_them_do_not_fail_it(tmp_path, monkeypatch):
    """A guest that writes THR blind (a loop that never reads LSR, or `rep outsb`) with
    write-behind armed hands the device KVM's ring, 169 writes, in one post each time it
    fills, far faster than the device applies them (~11 us a frame here): the monitor's send
    buffer fills with thousands of frames, and each post waits for room while the device
    works through them (~80 ms here, every few batches). That is the device's work, not a
    stall: charged to its latency budget as a slow reply, it failed in ~3 s of such output
    (with on_crash = "stop", the default, the VM). The budget is cut to 500 ms here, so that
    a few hundred thousand writes spend it."""
    monkeypatch.setattr(channel_module, "LATENCY_BUDGET_MS", 500)
    h = Harness(tmp_path, output_file=True)
    ring = [(Reg.RX_TX, b"A")] * 169  # KVM_COALESCED_MMIO_MAX on 4 KiB pages
    try:
        for _ in range(1500):
            h.slot.write_many(ring)
        synced = h.slot.sync()
    finally:
        h.close()
    assert (synced, h.failures) == (True, [])
