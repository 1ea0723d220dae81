"""DeviceSlot: one configured device, across the processes that serve it.

The Bus points at the slot, never at a process. A slot outlives any one process
of its device: it keeps the device's configuration and fds, a generation counter
(one per process started into it), the current process and its channel
(monitor/channel.py), the device's last known state, its restart budget, and the
guest accesses that arrive while the device is away:

    AWAY    no process serves the device: it is starting, or (once crash restarts
            exist) between a crash and its restart. An access waits until the
            device is back, at most AWAY_WAIT_MS, then reads as all-ones.
    LIVE    its process said READY: accesses go over its channel.
    FAILED  it failed and stays dead: accesses read as all-ones at once.

start(), wait_ready() and vacate() change the process in the slot: one thread
at a time calls them (the machine's, then its restarter's: restart()).
Accesses and control requests may come from any thread; the slot's lock
serializes them on the channel.

Crash restart (on_crash = "restart"): the new process must go on exactly where the
dead one was when it died, not where the last snapshot was. The design:

* Checkpoints. The device's runtime publishes its state every PUBLISH_EVERY frames
  (PUBLISH_EVERY_COUNTED where its output is a regular file, or none: protocol/events.py)
  with `applied`, the number of frames (reads, writes, host input) it had applied, and
  `emitted`, the output bytes its line had taken. It publishes after the reply to the
  last frame a checkpoint covers.
* The journal. The slot numbers the same frames: a posted frame when it is sent
  (sent to a dead process or not), a read once its reply came back (a read without
  a reply was never answered to the guest: it is sent again, once, to the new
  process). Every frame past the last checkpoint received stays in the journal
  (at most MAX_JOURNAL; past that the device cannot be restarted transparently and
  its crash stops the VM, saying so). A checkpoint received drops what it covers.
* The restart. The new process starts from the checkpoint's state and re-applies
  the journal before READY (read replies thrown away): the serial model is a
  function of its state and its frames, so it ends in the dead process's state,
  the guest's reads included (an RBR read after the checkpoint pops its byte
  again: no input byte comes back twice). Each frame is journaled with the host's
  wall clock when it was sent and re-applied as of then: the rtc is a function of
  its frames and of when they came (a time the guest set an hour before the crash
  was set then, not at the restart). A checkpoint lost with the dead process
  costs only a longer replay: the journal is trimmed by checkpoints received.
* No output byte twice. The replay produces again the output bytes the dead
  process produced after its checkpoint, some of which reached the line. For an
  output that is a regular file (a log, or stdio redirected to a file) the slot
  knows exactly how many did: the file grew by that much since the slot was made
  (fstat), so the new process drops `skip = grown - checkpoint.emitted` bytes
  unsent: every byte once, none lost. Unless another writes the file too (another
  device, the monitor's own log: mark_shared_outputs): its output is then counted as a
  pipe's, since the growth is theirs too. For a pipe, socket or terminal no such
  count exists: bytes sent after the last checkpoint received (at most MAX_AHEAD
  frames' worth, for a driver that polls: no read is answered from the register
  mirror further ahead than that) may come out twice, never lost (a relay through
  the monitor would count them too: not built yet).
* Accesses in the gap wait on the slot (AWAY), up to RESTART_WAIT_MS, since a
  restart takes longer than a read's deadline on a loaded host.
* A warm spare. Most of a new process's time to READY is a Python interpreter starting
  and importing (~110 of ~120 ms for the serial device, devprocs/runtime.py run()). A
  slot given a `resumer` (the machine gives one to each device whose on_crash is
  "restart") keeps one spare process of its device: started like any other (the same
  spawner, the launcher's, with the same fds: an exec of its own, with its own address
  space layout, not a fork of a pre-imported process), from a deferred spec
  (protocol/spec.py): it imports its runtime and model, runs setup(), enters its sandbox
  up to connecting its channel, and waits there on its stdin for the spec's DEFERRED part
  (state, resume, fault), holding no guest data. A restart hands it the checkpoint and
  journal (the resumer: the launcher links the spare's listening socket to the channel's
  path and writes the rest down its stdin; the slot unlinks the spare's name once READY) and it goes on as a fresh process would:
  connect, rlimits, seccomp, restore, replay, READY (devprocs/runtime.py run(): ~4 ms
  there, against ~120-200 ms for a cold process). The restarter starts the next spare once
  the device is back (a spare needs ~110 ms, more on a loaded host, to be warm; one taken
  before finishes its imports first), off the restart's path. A spare that ends while it
  waits (the supervisor watches it: spare_ended()) is replaced at once, so that the next
  crash does not start cold, up to MAX_SPARE_LOSSES in a row without a restart taking one
  (a spare that cannot live is a host's problem, and replacing it for ever would spawn in
  a loop); one that fails before READY is ended and the restart starts a process cold; a
  spare that cannot start is logged, never a failure of the device. The spare is never
  the slot's process: `pid`, crash() and the supervisor's process watch see only the
  process that serves. close() ends it.

Guarantee, for a driver that waits for THRE: no input byte lost or repeated; no
output byte lost; no output byte repeated when the output is a regular file.
"""

from __future__ import annotations

import base64
import enum
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from splitvmm.errors import ConfigError, DeviceFailure, KvmError, SplitvmmError, escaped, shown
from splitvmm.monitor.channel import (
    CONTROL_TIMEOUT_MS,
    GONE_WAIT_MS,
    READ_TIMEOUT_MS,
    READY_TIMEOUT_MS,
    SPARE_READY_TIMEOUT_MS,
    ChannelError,
    DeviceChannel,
)
from splitvmm.monitor.irqroutes import MsiVectors
from splitvmm.monitor.rundir import check_socket_path
from splitvmm.protocol import events, wire
from splitvmm.protocol.models import (
    MODELS,
    OUTPUT_SHARED,
    PROGRESS_HOST_IO_BYTE,
    FdKind,
    PciFunction,
    PortWindow,
)
from splitvmm.protocol.polling import PollWindow, max_poll_ns
from splitvmm.protocol.spec import DeviceSpec, spare_path
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.record import Struct, field
from splitvmm.sandbox.spawn import DeviceProcess, how_ended

log = logging.getLogger("splitvmm.slot")

# An access to a device that is away waits no longer than one to a device that is there may
# (its read deadline): a pause waits for every vCPU to finish its access (coordinator.py).
AWAY_WAIT_MS = READ_TIMEOUT_MS
# A route the host refused (KVM_SET_GSI_ROUTING failed): said apart from a device's refused
# requests, which a guest may cause at will and which would hide it (RateLimitedLog)
HOST_REFUSED = "the host refused the route"
MAX_FAILED_STARTS = 3  # restarts in a row whose process fails before READY: then it has failed
MAX_SPARE_LOSSES = 3  # warm spares in a row that end while they wait: then none till a restart
END_TIMEOUT_S = 5.0  # a killed device is gone at once; its status follows from the launcher
# The restart budget's defaults, systemd's (StartLimitBurst=5 within StartLimitIntervalSec=10s):
# a device that crashes faster than that is not restarted again.
RESTART_BURST = 5
RESTART_INTERVAL_S = 10.0
# While a crashed device is being restarted, an access waits for its new process (a Python
# interpreter's start, ~0.1-1 s on a loaded host) rather than read all-ones.
RESTART_WAIT_MS = READY_TIMEOUT_MS
MAX_JOURNAL = 4096  # frames kept past the last checkpoint (one comes every 32 or 256 frames)
# On an output it cannot count, the slot answers no read from the register mirror while it has
# sent this many frames past the last checkpoint it received (after taking the device's news):
# the read goes to the device, whose reply comes after its checkpoints. A crash then repeats at
# most this many frames' output, however far a device lags its posted writes.
MAX_AHEAD = 2 * events.PUBLISH_EVERY
# On any output, no read is answered from the mirror while the slot has sent this many frames
# past the last checkpoint it received: a device that lags its posted writes (a process just
# restarted, a busy host) let a guest that polls LSR run up to the mirror's credit (65535
# writes) ahead, past what the journal keeps, and its crash then stopped the VM.
MAX_AHEAD_COUNTED = MAX_JOURNAL // 2
# `ctl devices` asks each device for its counters: it does not queue behind a vCPU's access
# or a control request that holds the slot (counters are not worth a stall; it shows none).
STATS_LOCK_WAIT_S = 0.05
# `ctl crash-device` waits this long for an access or request that holds the slot (each has
# its deadline), then signals the device without the lock (one held on its host-I/O flag).
CRASH_LOCK_WAIT_S = READ_TIMEOUT_MS / 1000

# A read whose device died before answering goes once more, to its next process; if that one
# dies too, the read is all-ones. A read that kills every process it reaches would otherwise
# hold the vCPU for as long as restarts come back (forever, when each takes longer than
# restart_window / max_restarts).
READ_ATTEMPTS = 2

# Starts a device process: the process, and its channel's listening socket (an fd we own).
# The launcher's spawn for the machine; tests start theirs with sandbox.spawn.spawn_child.
Spawner = Callable[[DeviceSpec], tuple[DeviceProcess, int]]
# Gives a warm spare (started by the Spawner from a deferred spec) the rest of its spec: the
# launcher's resume; tests give their own children theirs (sandbox.spawn.resume_child).
Resumer = Callable[[DeviceProcess, DeviceSpec], None]


class Spawn(Struct):
    """What a device's processes get: its model and options, and role -> fd to pass."""

    name: str
    model: str
    window: int
    options: dict[str, object] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    state: dict[str, object] | None = None  # restore: the device's saved state document
    fault: dict[str, object] | None = None  # crash testing: armed in the first process only
    transport: dict[str, object] | None = None  # DeviceSpec.transport: where a PCI function sits
    msi: MsiVectors | None = None  # a PCI function's MSI-X vectors, routed when it asks
    user: tuple[int, int] | None = None  # DeviceSpec.user: the host user it runs as


class Checkpoint(Struct, frozen=True):
    """A state the device published, and the frames and output bytes it covers."""

    state: dict[str, object] | None
    applied: int = 0
    emitted: int = 0


class SlotState(enum.Enum):
    AWAY = "away"
    LIVE = "running"
    FAILED = "failed"


class RestartBudget(Struct):
    """At most `burst` restarts within any `interval_s` seconds. Bookkeeping only: the
    crash-restart policy asks it before it restarts a device."""

    burst: int = RESTART_BURST
    interval_s: float = RESTART_INTERVAL_S
    _restarts: deque[float] = field(default_factory=deque)

    def remaining(self, now: float) -> int:
        while self._restarts and self._restarts[0] <= now - self.interval_s:
            self._restarts.popleft()
        return self.burst - len(self._restarts)

    def take(self, now: float) -> bool:
        """Count a restart at `now` (time.monotonic()) if the budget has one left."""
        if self.remaining(now) <= 0:
            return False
        self._restarts.append(now)
        return True


class DeviceSlot:
    def __init__(
        self,
        spawn: Spawn,
        runtime_dir: Path,
        spawner: Spawner,
        on_failure: Callable[[DeviceSlot, str], bool],
        resumer: Resumer | None = None,
        on_stall: Callable[[DeviceSlot], None] | None = None,
    ) -> None:
        """`on_failure(slot, why)` applies the device's on_crash policy; True: a restart
        follows (restart() from another thread), and accesses wait for it. With a `resumer`
        the slot keeps a warm spare for its restarts (start_spare(), the module docstring).
        `on_stall(slot)`: the device holds a request until the VM's next resume (why: the
        slot's `stalled`) and asks for a pause (protocol/events.py stall), with the slot's
        lock held."""
        self.name = spawn.name
        self.model = spawn.model
        self.window = spawn.window
        self._options = spawn.options
        self._fds = spawn.fds  # the machine owns them; each process gets them again
        self._transport = spawn.transport
        self._user = spawn.user
        self._msi = spawn.msi
        channel_path = runtime_dir / f"{spawn.name}.sock"
        check_socket_path(channel_path, f"device {spawn.name}: channel path", device_named=True)
        self.endpoint = f"ipc://{channel_path}"
        self._spawner = spawner
        if resumer is not None:  # its spares bind a longer path: past sun_path, none binds
            try:
                spare = Path(spare_path(self.endpoint))
                check_socket_path(spare, f"device {spawn.name}: warm spare path", device_named=True)
            except SplitvmmError as e:  # said once here, not at each restart; the VM runs on
                log.warning("%s; its restarts start cold", e)
                resumer = None
        self._resumer = resumer
        self._spare: tuple[DeviceProcess, int] | None = None  # a warm spare, its listener
        self._spare_losses = 0  # spares that ended waiting, since one last took over
        self.warm_restarts = 0  # restarts a spare took over
        self._on_failure = on_failure
        self._on_stall = on_stall
        # Why the device waits for the VM's resume to take a request up again (its stall
        # event), until that resume tells it to (resume_stalled()); None: it does not
        self.stalled: str | None = None
        self._ended_events = False  # the events being handled are an ended process's
        self.last_state = spawn.state  # what a new process starts from (the last snapshot's)
        self._fault = spawn.fault  # taken by the first process: a restarted one gets none
        self.generation = 0  # processes started into the slot so far
        # Restarts done, one per crash the policy restarted: not generation - 1, which counts
        # a warm spare that failed to take over (it was put in the slot) and the cold process
        # started after it as two.
        self.restarts = 0
        self.process: DeviceProcess | None = None
        self._crashed: DeviceProcess | None = None  # the process crash() sent its signal
        self.channel: DeviceChannel | None = None
        self._listener: int | None = None  # launched, not attached yet: ours to close
        self.state = SlotState.AWAY
        self.failed: str | None = None  # why it failed, while FAILED
        self.waiting = 0  # accesses waiting for the device to be back
        self.restarting = False  # AWAY after a crash, until restart() put a new process in
        self.supervised = False  # a Supervisor watches its processes (process_ended)
        self.crashes = 0
        self._failed_starts = 0  # restarts in a row whose process failed before READY
        self.last_failure = ""  # why the device failed last (it may be back since)
        self.recover_ms: float | None = None  # crash -> serving again, the last restart
        self.longest_stall_ms = 0.0  # the longest an access waited for the device to be back
        # Guest accesses forwarded to the device (what costs the monitor an exit), over the
        # slot's life: the fast path (ioeventfds, irqfds) never counts here.
        self.reads = 0
        self.writes = 0
        self.mirrored_reads = 0  # of those reads, the ones its register mirror answered
        self.held_writes = 0  # writes KVM held, which cost no exit (monitor/writebehind.py)
        # How vCPUs wait for the device's replies (protocol/polling.py): one window for every
        # process of the slot's, so that its counters are the slot's
        self.reply_poll = PollWindow(max_poll_ns())
        self._crashed_at = 0.0
        self._checkpoint = Checkpoint(spawn.state)
        # The frames sent when the monitor received that checkpoint: those of them past it
        # were on their way as the device saved it, and applied after ("posted", rtc.py).
        # A snapshot's state is received before any frame.
        self._checkpoint_at = 0
        self._frames = 0  # reads, writes and input the device got, over the slot's life
        self._reading = 0  # 1 while a read waits for its reply (journaled after it)
        # (number, frame, host wall-clock ns when it was sent) past the checkpoint
        self._journal: deque[tuple[int, bytes, int]] = deque()
        self._lost = 0  # the highest frame number the journal dropped (MAX_JOURNAL)
        self._resumed_at = 0  # the last frame the restart under way was given to replay
        # The highest frame number a process is known to have applied: a sync or a read it
        # answered (all sent before it), or a READY (a restart's replay). Past it, a frame may
        # have been lost with a dead process unread: its restart is told which ("confirmed").
        self._confirmed = 0
        # A file another device writes too grows by its bytes as well: not counted either
        shared = (spawn.transport or {}).get(OUTPUT_SHARED) is True
        self._out_fd, self._out_base = (None, 0) if shared else _regular_output(spawn)
        # An output whose growth cannot be read (a pipe, socket or terminal): MAX_AHEAD holds.
        self._uncounted = self._out_fd is None and _output_fd(spawn) is not None
        self._host_io = _host_io_flag(spawn)
        self._gave_up_host_io = False  # give_up_host_io(): the VM is stopping
        # A process failed through its channel, whose end the supervisor has not reported
        # yet: process_ended says how it ended even once a restart replaced it.
        self._failed_process: DeviceProcess | None = None
        self._lock = threading.Lock()
        self._back = threading.Condition(self._lock)  # notified when the state leaves AWAY
        self._quiesced = False  # by a snapshot, until its resume: host input waits (input())
        # Host input for the process in the slot (input()): the bytes sent to it, and its
        # last input_room event (received, room); both start anew with each process.
        self._input_sent = 0
        self._input_room: events.InputRoom | None = None
        # `lives` when the last quiesce was answered, under the lock: the process a snapshot
        # quiesced, whom its coordinator checks is still the slot's (coordinator.py).
        self.quiesced_lives: tuple[int, int] | None = None
        self._reports = RateLimitedLog(log)  # a device's reports: one line a second at most

    @property
    def pid(self) -> int | None:
        """The pid of the process that serves the device; None while none does. A process
        that failed stays in the slot until a restart replaces it (for ever, if the device
        is left dead), but it is dead: its pid, freed once the launcher reaps it, may be
        another process's by now, which whoever reads `ctl status` would signal."""
        process = self.process
        return process.pid if process is not None and self.state is SlotState.LIVE else None

    @property
    def ready(self) -> bool:
        return self.state is SlotState.LIVE

    @property
    def lives(self) -> tuple[int, int]:
        """(crashes, generation): changes once a crash is seen, before any process replaces
        the dead one, and again when one does (the coordinator's check that a snapshot's
        devices are the processes that saved their states)."""
        return self.crashes, self.generation

    # -- the process in the slot ---------------------------------------------------------------
    def start(self, resume: dict[str, object] | None = None) -> None:
        """Start the device's next process from its last known state (or, after a crash,
        from its last checkpoint and `resume`). Accesses wait until wait_ready() has seen
        its READY."""
        self.launch(resume)
        self.attach()

    def launch(self, resume: dict[str, object] | None = None) -> None:
        """The first half of start(): ask for the device's next process, from its last known
        state (or its last checkpoint and `resume`), and keep its channel's listening socket
        unserved. The process starts and may connect at once (the kernel queues it); a
        machine launches its devices before it is confined, and serves their channels
        only afterwards (monitor/confinement.py)."""
        self._fill(*self._spawner(self.next_spec(resume)))

    def next_spec(self, resume: dict[str, object] | None = None) -> DeviceSpec:
        """The spec launch() asks for: a machine that asks for several devices at once
        (Launcher.send_spawn) asks with it, then hands launched() each one's reply."""
        with self._lock:
            self._check_empty_locked()
            spec = self._spec_locked(resume)
            self._fault = None
        return spec

    def launched(self, process: DeviceProcess, listener: int) -> None:
        """The process asked for with next_spec(), and its channel's listening socket."""
        self._fill(process, listener)

    def _check_empty_locked(self) -> None:
        if self.process is not None or self.state is not SlotState.AWAY:
            raise DeviceFailure(f"device {self.name}: its slot is {self.state.value}, not empty")

    def _spec_locked(self, resume: dict[str, object] | None) -> DeviceSpec:
        """The next process's spec: from the last known state, or after a crash from the
        last checkpoint and `resume`."""
        return DeviceSpec(
            self.name,
            self.model,
            self.endpoint,
            self._fds,
            self._options,
            state=self._checkpoint.state if resume is not None else self.last_state,
            resume=resume,
            fault=self._fault,
            transport=self._transport,
            user=self._user,
        )

    def _fill(self, process: DeviceProcess, listener: int) -> None:
        with self._lock:
            self.generation += 1
            self.process, self._listener = process, listener

    def attach(self) -> None:
        """The second half of start(): serve the channel of the process launch() started."""
        with self._lock:
            process, listener, self._listener = self.process, self._listener, None
        if process is None or listener is None:
            raise DeviceFailure(f"device {self.name}: no process of it was launched")
        try:
            channel = DeviceChannel(
                self.model,
                self.endpoint,
                listener,
                self._on_event,
                self._host_io,
                access_poll=self.reply_poll,
            )
        except BaseException:
            with self._lock:
                self.process = None
            _end(self.name, process, None)
            Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
            raise
        channel.watch_process(process)
        with self._lock:
            self.channel = channel
            if self._gave_up_host_io:  # a restart while the VM stops
                channel.give_up_host_io()
            self._input_sent, self._input_room = 0, None  # its process says its room anew

    def wait_ready(self) -> None:
        """The process started last is READY: the device is back. DeviceFailure otherwise,
        unless the VM is stopping (give_up_host_io): the device is then failed quietly, and
        the VM's outcome says why it ends."""
        with self._lock:
            process, channel = self.process, self.channel
        if process is None or channel is None:
            raise DeviceFailure(f"device {self.name}: no process of it was started")
        try:
            channel.wait_ready(process)
        except ChannelError as e:
            if self._gave_up_host_io:
                self.fail(str(e), logged=False)
                return
            # The VM's first process of it: the DeviceFailure is the VM's error, which `up`
            # prints; logged too, it came out twice. A restart's is logged (the VM runs on).
            self.fail(str(e), logged=self.generation > 1 or self.restarting)
            raise DeviceFailure(f"device {self.name}: {self.failed}") from None
        self._now_live(process)

    def _now_live(self, process: DeviceProcess) -> None:
        """`process` said READY: the device is back, if it is still the slot's process. A PCI
        function restored or restarted asks for its MSI-X routes again right after READY, and
        holds each vector's interrupts pending until its route is done (devprocs/virtio/
        msix.py): one round trip takes those requests now, not at the first access or the
        next heartbeat (~1 s after a restart's, with I/O stalled meanwhile)."""
        restored = self.restarting or self.last_state is not None
        with self._lock:
            if self.process is process and self.state is SlotState.AWAY:
                self.state = SlotState.LIVE
                # its replay applied the journal it was given (late writes go after this)
                self._confirmed = self._resumed_at if self.restarting else self._frames
                if self.restarting:  # back: a spare may be kept again (MAX_SPARE_LOSSES)
                    self.restarting, self._failed_starts, self._spare_losses = False, 0, 0
                    self.recover_ms = (time.monotonic() - self._crashed_at) * 1e3
                    log.warning(
                        "device %s is back (pid %d, process %d) %.0f ms after its crash",
                        self.name, process.pid, self.generation, self.recover_ms,
                    )  # fmt: skip
                    self._send_late_locked()
                self._back.notify_all()
                self._quiesced = False  # a new process is never quiesced
                self.stalled = None  # nor stalled: it retries what its predecessor held
        if restored and isinstance(MODELS[self.model].transport, PciFunction):
            self.heartbeat(READ_TIMEOUT_MS)  # a vCPU's access under way reads them instead

    def _send_late_locked(self) -> None:
        """Posted writes journaled while a restart was away past RESTART_WAIT_MS, after it
        took its replay (_post_frames_locked): its process, now READY, gets them first."""
        late = [(n, frame) for n, frame, _ in self._journal if n > self._resumed_at]
        if self._lost > self._resumed_at:  # some went out of the journal: not transparent
            self._fail_locked(f"more than {MAX_JOURNAL} writes came while it restarted")
            return
        # One at a time, each answered before the next goes, as the guest's own synced
        # writes are: answered, a frame is applied, and a later restart replays it as
        # confirmed (the guest may never sync again: a late queue enable and DRIVER_OK, then
        # only ioeventfds), never zeroing a ring this process took up. Sent together, a
        # DRIVER_OK the process applied ran the queue before the one sync was answered: a
        # death then left the enable unconfirmed, and the next restart zeroed the used ring
        # under chains the guest had seen done.
        for n, frame in late:
            if self.channel is None:
                return
            try:
                self.channel.post_many([frame])
                self.channel.sync()
            except ChannelError as e:
                self._channel_failed_locked(str(e))
                return
            self._confirmed = n

    def restart(self) -> None:
        """After a crash the policy restarts: a new process from the last checkpoint, which
        re-applies the frames past it (the module docstring). DeviceFailure if it cannot."""
        with self._lock:
            process, channel = self.process, self.channel
            self.process = self.channel = None
            if channel is not None:
                self._drain_events_locked(channel)  # the dead process's last checkpoint
        gone = _end(self.name, process, channel)
        with self._lock:
            if self.state is not SlotState.AWAY or not self.restarting:
                return  # closed meanwhile
            if not gone and self._holds_disk():
                self._refuse_restart_locked(
                    "its process did not end (disk I/O that does not finish?): its writes "
                    "could overtake a new one's on the same image, its reads land in guest "
                    "RAM the guest has reused"
                )
            if self._lost > self._checkpoint.applied:
                self._refuse_restart_locked(
                    f"more than {MAX_JOURNAL} frames since its last checkpoint"
                )
            resume = self._resume_locked()
            self.restarts += 1
        try:
            if self._take_over(resume):
                return
            if self._gave_up_host_io:  # the VM stopped while its spare started: no cold one
                raise DeviceFailure(f"device {self.name}: the VM is stopping")
            with self._lock:  # anew: a spare given up may have written to the output since
                if self._lost > self._checkpoint.applied:
                    self._refuse_restart_locked(
                        f"more than {MAX_JOURNAL} frames since its last checkpoint"
                    )
                resume = self._resume_locked()
            self.start(resume)
        except DeviceFailure as e:
            self.fail(f"its restart failed: {e}")
            raise
        except Exception as e:  # the launcher gone or broken, an fd or a socket failing
            self.fail(f"its restart failed: {e}")
            raise DeviceFailure(f"device {self.name}: its restart failed: {e}") from e
        self._wait_restarted()

    def _wait_restarted(self) -> None:
        """The new process a restart started cold is READY, or it failed before: a crash like
        any other, which the policy may restart again within its budget (the device is then
        away until the restarter's next turn), or DeviceFailure. A kill loop that met the new
        process in its start stopped the VM, with budget left."""
        with self._lock:
            process, channel = self.process, self.channel
        assert process is not None and channel is not None  # start() put them there
        try:
            channel.wait_ready(process)
        except ChannelError as e:
            if self._gave_up_host_io:  # the VM is stopping: no crash of the device's, no log
                self.fail(str(e), logged=False)
                raise DeviceFailure(f"device {self.name}: {self.failed}") from None
            with self._lock:
                again = self._crashed_in_restart_locked(process, str(e))
            if not again:
                raise DeviceFailure(f"device {self.name}: {self.failed}") from None
            return
        self._now_live(process)

    def _crashed_in_restart_locked(self, process: DeviceProcess, reason: str) -> bool:
        """`process`, started by a restart, failed before READY: True if the policy restarts
        the device again (it stays away, restarting), False if it failed for good."""
        if self.process is not process or self.state is not SlotState.AWAY:
            return False  # closed meanwhile
        self._count_crash_locked(reason, "failed in its restart")
        self._failed_starts += 1
        # A process that never gets READY fails only at READY_TIMEOUT_MS: slower than any
        # restart budget's window, which then never fills. So a few in a row are the end.
        if self._failed_starts < MAX_FAILED_STARTS and self._on_failure(self, reason):
            return True
        if self._failed_starts >= MAX_FAILED_STARTS:
            reason = f"{reason}; its last {MAX_FAILED_STARTS} restarts failed before READY"
        self._fail_for_good_locked(f"its restart failed: {reason}")
        return False

    # -- the warm spare (the module docstring) ---------------------------------------------------
    def start_spare(self) -> DeviceProcess | None:
        """Start a warm spare, if the slot keeps one and has none: the process kept, for the
        supervisor to watch (spare_ended()). One that cannot start is logged: the next
        restart starts its process cold. Called by the one thread that calls restart(),
        never on a restart's path."""
        with self._lock:
            if (
                self._resumer is None
                or self._spare is not None
                or self.state is SlotState.FAILED
                or self._spare_losses >= MAX_SPARE_LOSSES
            ):
                return None
            spec = self._spec_locked(None).spare()
        try:
            spare: tuple[DeviceProcess, int] | None = self._spawner(spec)
        except (SplitvmmError, OSError) as e:
            if not self._gave_up_host_io:  # not the VM's stop, which gave up the spawn
                log.warning(
                    "device %s: no warm spare (%s): its next restart starts cold", self.name, e
                )
            return None
        assert spare is not None
        process = spare[0]
        with self._lock:
            if not self._failed():  # not closed meanwhile: keep it
                self._spare, spare = spare, None
        if spare is not None:
            self._end_spare(*spare)
            return None
        return process

    def spare_ended(self, process: DeviceProcess) -> bool:
        """The supervisor saw `process` end: if it was still the slot's warm spare, it is
        ended (its listener closed, its name freed) and True, for the restarter to start
        another, unless MAX_SPARE_LOSSES went in a row. A spare that took over since is the
        slot's process: its end is process_ended()'s."""
        with self._lock:
            if self._spare is None or self._spare[0] is not process:
                return False
            self._drop_spare_locked()
            self._spare_losses += 1
            again = self._spare_losses < MAX_SPARE_LOSSES and not self._failed()
        log.warning(
            "device %s: its warm spare (pid %d) %s: %s",
            self.name,
            process.pid,
            _how(process),
            "starting another" if again else "no more spares until a restart needs one",
        )
        _end(self.name, process, None)
        return again

    @property
    def spare_pid(self) -> int:
        spare = self._spare
        return spare[0].pid if spare is not None else 0

    def _take_over(self, resume: dict[str, object]) -> bool:
        """Put the warm spare in the slot and hand it `resume`: True once it is READY. False
        if there is none, or it ended or failed before READY (it is ended): start cold."""
        with self._lock:
            self._check_empty_locked()
            spare, self._spare = self._spare, None
            spec = self._spec_locked(resume)
        if spare is None or self._resumer is None:
            return False
        process, listener = spare
        try:
            self._resumer(process, spec)
        except (SplitvmmError, OSError) as e:
            if not self._gave_up_host_io:  # not the VM's stop, which gave up the request
                log.warning(
                    "device %s: its spare cannot take over (%s): starting cold", self.name, e
                )
            self._end_spare(process, listener)
            return False
        self._fill(process, listener)
        self.attach()
        with self._lock:
            channel = self.channel
        assert channel is not None  # attach() put it there; only this thread changes it
        try:
            channel.wait_ready(process, SPARE_READY_TIMEOUT_MS)
        except ChannelError as e:
            if not self._gave_up_host_io:  # not the VM's stop: the spare's own failure
                log.warning(
                    "device %s: its spare failed before READY (%s): starting cold", self.name, e
                )
            with self._lock:
                self.process = self.channel = None
            # It had its state: READY may have come just after the deadline, and its disk
            # I/O with it. No cold successor on that image while it may still run (restart())
            if not _end(self.name, process, channel) and self._holds_disk():
                with self._lock:
                    self._refuse_restart_locked(
                        "its warm spare, given up before READY, did not end (disk I/O that "
                        "does not finish?): its writes could overtake a new one's on the same "
                        "image, its reads land in guest RAM the guest has reused"
                    )
            return False
        finally:  # its first name: free for the next spare's socket
            Path(spare_path(self.endpoint)).unlink(missing_ok=True)
        self.warm_restarts += 1
        self._spare_losses = 0
        self._now_live(process)
        return True

    def _failed(self) -> bool:
        """Read anew, as _live()."""
        return self.state is SlotState.FAILED

    def _end_spare(self, process: DeviceProcess, listener: int) -> None:
        self._free_spare_name(listener)
        _end(self.name, process, None)

    def _drop_spare_locked(self) -> DeviceProcess | None:
        """Take the warm spare out of the slot, its name freed at once: the process, for the
        caller to end outside the lock. "No spare" must always mean that the next one can
        bind spare_path(); freeing it after the lock, a start_spare() in between (another
        thread's) met EADDRINUSE."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        self._free_spare_name(spare[1])
        return spare[0]

    def _free_spare_name(self, listener: int) -> None:
        os.close(listener)
        Path(spare_path(self.endpoint)).unlink(missing_ok=True)

    def _resume_locked(self) -> dict[str, object]:
        cp = self._checkpoint
        skip = 0
        if self._out_fd is not None:
            grown = os.fstat(self._out_fd).st_size - self._out_base
            skip = max(0, grown - cp.emitted)
        replay = [base64.b64encode(frame).decode() for _, frame, _ in self._journal]
        replay_wall_ns = [sent for _, _, sent in self._journal]
        self._resumed_at = self._frames
        confirmed = sum(1 for n, _, _ in self._journal if n <= self._confirmed)
        posted = sum(1 for n, _, _ in self._journal if n <= self._checkpoint_at)
        return {
            "applied": cp.applied,
            "emitted": cp.emitted,
            "skip": skip,
            "replay": replay,
            "replay_wall_ns": replay_wall_ns,
            "confirmed": confirmed,  # the replay's first frames the dead process applied
            "posted": posted,  # of them, the first ones sent before its checkpoint came
        }

    def crash(self, signum: int) -> int:
        """Send `signum` to the device's process (ctl crash-device); its pid. That is the
        process the launcher started, the device's warden (sandbox/device.py): it dies of
        `signum`, and the device proper, its child, dies with it by SIGKILL (its parent-death
        signal), a moment later.

        A request waiting past its deadline on the device's host-I/O flag (channel.py) holds
        the lock for as long as the flag stays set, which a compromised device decides: the
        process is then signalled without the lock (its end, which that request polls for,
        ends the request at once) rather than waited for; this call hung with it, and the
        control worker too. Giving up the request's wait instead failed the device as
        "no reply" (SIGKILL, not `signum`) and answered "no process" (ctl's 75: try again)."""
        if not self._lock.acquire(timeout=CRASH_LOCK_WAIT_S):
            return self._signal(signum)  # only crash() reads _crashed, one request at a time
        try:
            return self._signal(signum)
        finally:
            self._lock.release()

    def _signal(self, signum: int) -> int:
        """crash(): `signum` to the process in the slot, once; its pid."""
        process = self.process
        if process is None or self.state is not SlotState.LIVE:
            raise DeviceFailure(f"device {self.name} is {self.state.value}: no process")
        if process is self._crashed:
            # Its end not heard of yet (the supervisor applies on_crash then): signalled
            # again, it said so of a process that dies of the first signal, for one crash.
            raise DeviceFailure(
                f"device {self.name}: process {process.pid} was sent its crash already; "
                "its on_crash policy applies once its end is seen"
            )
        process.send_signal(signum)
        self._crashed = process  # every signal crash() sends ends a process
        return process.pid

    def vacate(self) -> None:
        """End the device's process and close its channel: the device is away, and accesses
        wait for the next process that start() puts in (or for fail())."""
        with self._lock:
            process, channel = self.process, self.channel
            self.process = self.channel = None
            self._drop_listener_locked()
            self.state, self.failed = SlotState.AWAY, None
        _end(self.name, process, channel)

    def _drop_listener_locked(self) -> None:
        """Close the listening socket of a process launched and never attached."""
        if self._listener is not None:
            os.close(self._listener)
            self._listener = None

    def process_ended(self, process: DeviceProcess) -> None:
        """The supervisor saw `process` end: the device failed, if it still serves it."""
        with self._lock:
            current = process is self.process
            # An earlier process ended on purpose (vacate), or failed through its channel
            # first, and a restart (a warm spare's: a few ms) may have replaced it already.
            if not current and process is not self._failed_process:
                return
            if current and self.channel is not None:  # its last words: its last known state
                self._drain_events_locked(self.channel)
        # Without the lock: the launcher says how it ended in a few ms, or once the device
        # proper, which may outlive its warden in a system call, is gone (ORPHAN_WAIT_S), or
        # once it is done with a spawn (a new zygote's imports), or never (stopped: its
        # REPLY_TIMEOUT_S). An access meanwhile meets the dead channel, and waits for this
        # verdict at most END_TIMEOUT_S (_channel_failed_locked), not on the lock.
        how = _how(process)
        with self._lock:
            if process is self.process and not self.restarting:
                self._fail_locked(f"process {how}")
                return
            said = process is self.process or process is self._failed_process
            if process is self._failed_process:
                self._failed_process = None
        if said:  # its channel said so first (a restart may have replaced it since)
            log.warning("device %s (pid %d) %s", self.name, process.pid, how)

    # -- accesses (from vCPU threads, the console, the coordinator) -----------------------------
    def read(self, offset: int, size: int) -> bytes:
        """The device's answer; all-ones if it failed for good. A read whose device died
        before answering is sent again to its next process (once: a read that was not
        answered is in no checkpoint and no journal). The device's register mirror answers
        when it can (monitor/mirror.py): such a read is no frame, and never journaled."""
        with self._lock:
            self.reads += 1
            mirrored = self._mirrored_locked(offset, size)
            if mirrored is not None:
                return mirrored
            for _ in range(READ_ATTEMPTS):
                channel = self._await_live()
                if channel is None:
                    break  # away past the wait, or failed: all-ones
                sent = time.time_ns()
                # A checkpoint the channel takes before the reply came after this read was
                # sent: the read (journaled once answered) is one of the frames on its way.
                self._reading = 1
                try:
                    data = channel.read(offset, size)
                except ChannelError as e:
                    self._reading = 0  # unanswered: in no journal, its number not used
                    self._checkpoint_at = min(self._checkpoint_at, self._frames)
                    self._channel_failed_locked(str(e))
                    continue  # restarting: wait for the new process
                self._reading = 0
                self._journal_locked(wire.encode_read(0, offset, size), sent)
                self._confirmed = self._frames  # an ordered channel: it applied all before it
                channel.mirror.sent(None)
                return data
            return b"\xff" * size

    def read_held(self, offset: int, size: int, held: int, held_at: int) -> bytes | None:
        """A read at `offset` that came after `held` writes at `held_at` KVM holds for this
        device (monitor/writebehind.py), if the mirror answers it exactly with them counted
        as sent; None: the caller delivers them (write_many), then reads as usual."""
        with self._lock:
            data = self._mirrored_locked(offset, size, held, held_at)
            if data is not None:
                self.reads += 1
            return data

    def mirrored_values(self, offsets: Sequence[int]) -> list[bytes] | None:
        """What the device's newest MIRROR says of its registers at `offsets`, all from that
        one (None: it is not live, published none, or marks one not valid): whether its
        model wants write-behind now (monitor/writebehind.py), not a guest read's answer."""
        with self._lock:
            channel = self.channel
            if self.state is not SlotState.LIVE or channel is None:
                return None
            try:
                channel.drain_events()
            except ChannelError as e:
                self._channel_failed_locked(str(e))
                return None
            return channel.mirror.values(offsets)

    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Guest writes, (offset, data) in the order made, that KVM held without an exit
        (monitor/writebehind.py): posted in one write, each a frame of its own (journaled,
        counted and replayed like any posted write)."""
        with self._lock:
            self.held_writes += len(writes)
            self._post_frames_locked(
                [(wire.encode_write(o, d), _credited(o, d)) for o, d in writes]
            )

    def _mirrored_locked(
        self, offset: int, size: int, held: int = 0, held_at: int = 0
    ) -> bytes | None:
        """The mirror's answer, if it has one exactly; None: ask the device."""
        channel = self.channel
        if self.state is not SlotState.LIVE or channel is None or not channel.mirror.covers(offset):
            return None  # the read goes to the device, whose channel reads the device's news
        mirror = channel.mirror
        ahead = self._too_far_ahead_locked(held)
        if ahead or mirror.news_due():
            try:
                channel.drain_events()  # the device's newest MIRROR, and whatever else it said
            except ChannelError as e:
                self._channel_failed_locked(str(e))
                return None
            if ahead and self._too_far_ahead_locked(held):
                return None  # the device's reply comes after its checkpoints
        data = mirror.answer(offset, size, self._frames, held, held_at)
        if data is not None:
            self.mirrored_reads += 1
        return data

    def _too_far_ahead_locked(self, held: int = 0) -> bool:
        """MAX_AHEAD frames sent past the last checkpoint received, on an uncounted output
        (MAX_AHEAD_COUNTED on any other), counting `held` writes KVM holds (they are sent
        before anything the read lets the guest do next)."""
        limit = MAX_AHEAD if self._uncounted else MAX_AHEAD_COUNTED
        return self._frames + held - self._checkpoint.applied >= limit

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.writes += 1
            self._post_frames_locked(((wire.encode_write(offset, data), _credited(offset, data)),))

    def input(self, data: bytes) -> int | None:
        """Host input for a console device: as much of `data`, from its front, as the device
        has room for (its last input_room event, protocol/events.py, less what was sent to it
        since), in frame-sized chunks; how many bytes went. The caller keeps the rest and
        offers it again (monitor/console.py pump): input waits on the host side, and a paste
        larger than the device's buffer loses nothing. 0 while the device cannot take input:
        it is starting or restarting (its process has not said its room yet), or a snapshot
        has it quiesced (input applied then would change a state it saved already, and the
        interrupt it raised would be in the vCPUs' saved state with its byte in no device's).
        None once it has failed for good: nothing will take input again."""
        with self._lock:
            if self.state is SlotState.FAILED:
                return None
            channel = self.channel
            if self.state is not SlotState.LIVE or channel is None or self._quiesced:
                return 0
            try:
                channel.drain_events()  # its newest input_room
            except ChannelError as e:
                self._channel_failed_locked(str(e))
                return 0
            said = self._input_room
            if said is None:
                return 0
            room = said.left(self._input_sent)
            sent, end = 0, min(len(data), room)
            while sent < end and self._live() and self.channel is channel:
                chunk = data[sent : min(sent + wire.MAX_INPUT_CHUNK, end)]
                # Counted before it goes: a post that fails may wait (the lock released) while
                # a restart puts a new process in, whose count starts at 0 (attach()). The
                # chunk is journaled as it goes: that restart re-applies it.
                self._input_sent += len(chunk)
                sent += len(chunk)
                self._post_frames_locked(((wire.encode_input(chunk), None),))
            return sent

    def _post_frames_locked(self, frames: Sequence[tuple[bytes, int | None]]) -> None:
        """Post (frame, the offset of the one-byte write it is or None: _credited) in order,
        in one write, to the live device (waiting while it is away); each journaled and
        counted first."""
        channel = self._await_live()
        if channel is None:
            if self.restarting:  # still away past RESTART_WAIT_MS: the restart re-applies
                for frame, _ in frames:  # it, or its process gets it once READY (_now_live)
                    self._journal_locked(frame)
            return
        for frame, write_at in frames:
            self._journal_locked(frame)  # re-sent to the next process if this one died
            channel.mirror.sent(write_at)
        try:
            channel.post_many([frame for frame, _ in frames])
        except ChannelError as e:
            self._channel_failed_locked(str(e))

    def sync(self, drain: bool = False) -> bool:
        """Wait until a live device applied everything sent so far (posted writes included);
        `drain`: before its end (DeviceChannel.sync)."""
        with self._lock:
            if self.state is not SlotState.LIVE or self.channel is None:
                return False
            try:
                self.channel.sync(drain)
            except ChannelError as e:
                self._channel_failed_locked(str(e))  # a dead process: how it ended, as a read
                return False
            self._confirmed = self._frames
            return True

    def give_up_host_io(self) -> None:
        """The VM is stopping: no request to this device waits past its deadline for a host
        I/O call any more (DeviceChannel.give_up_host_io), this process's or a restart's.
        Without the slot's lock, which a waiting request holds; from any thread."""
        self._gave_up_host_io = True
        channel = self.channel
        if channel is not None:
            channel.give_up_host_io()

    def control(
        self, op: str, timeout_ms: int = CONTROL_TIMEOUT_MS, args: dict[str, object] | None = None
    ) -> dict[str, object]:
        """A control request (quiesce, save, resume, retry, fault or link with `args`); the
        checked reply, or DeviceFailure. A saved state becomes the device's last known state; a
        retry's reply ends the stall (resume_stalled)."""
        with self._lock:
            return self._control_locked(op, timeout_ms, args)

    def arm_fault(self, fault: dict[str, object]) -> int:
        """Arm `fault` in the process that serves the device (ctl inject-fault): its pid, read
        under the lock its reply came under. A fault that fires at the next access may end
        that process as soon as the lock goes, and `pid` read then named none (the device
        away) or the process a restart put in its place."""
        with self._lock:
            self._control_locked("fault", CONTROL_TIMEOUT_MS, fault)
            process = self.process
        assert process is not None  # the process _await_live found serving answered
        return process.pid

    def _control_locked(
        self, op: str, timeout_ms: int, args: dict[str, object] | None
    ) -> dict[str, object]:
        if op == "resume":
            self._quiesced = False  # whatever comes of it: input goes again after it
        channel = self._await_live(timeout_ms)  # a snapshot's pause is bounded by it
        if channel is None:
            why = f"has failed: {self.failed}" if self.failed else "is away"
            raise DeviceFailure(f"device {self.name} {why}")
        if op == "quiesce":  # a snapshot: reads go to the device until it resumes
            channel.mirror.paused = True
            channel.mirror.invalidate()
        try:
            reply = channel.control(op, timeout_ms, args)
        except ChannelError as e:
            self._channel_failed_locked(str(e))  # a dead process: how it ended, as a read
            raise DeviceFailure(f"device {self.name}: {e}") from None
        if op == "quiesce":
            self._quiesced = True
            self.quiesced_lives = self.lives
        elif op == "save":
            self.last_state = reply
        elif op == "resume":  # its new MIRROR came before the reply
            channel.mirror.paused = False
        elif op == "retry":
            # Under the lock that took the reply: a stall event read with it (sent
            # before the device retried) is the old one, ignored as the slot was still
            # stalled; one read after it is the retry's, and a new stall
            self.stalled = None
        return reply

    def resume_stalled(self) -> None:
        """The VM resumes: a device that stalled takes its request up again (its control
        op "retry"). A device that cannot be asked has failed: its on_crash policy applies,
        and a new process takes the request up from the used ring anyway."""
        if self.stalled is None:
            return
        generation = self.generation
        try:
            self.control("retry")
        except DeviceFailure as e:
            with self._lock:  # that process is gone; a new one stalls anew if it must
                if self.generation == generation:  # (one that did already is stalled)
                    self.stalled = None
            log.warning("device %s: not told to retry after its stall: %s", self.name, e)

    def heartbeat(self, timeout_ms: int) -> None:
        """Ping a live device that nothing else is talking to (monitor/supervisor.py): one
        that does not answer within `timeout_ms` is hung and has failed. A device busy with
        an access or a control request is skipped: that request has its own deadline."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            channel = self.channel
            if self.state is not SlotState.LIVE or channel is None:
                return
            try:
                channel.ping(timeout_ms)  # False: waiting on its disk, not hung
            except ChannelError as e:
                process = self.process
                if self.supervised and process is not None and process.ended():
                    # Dead, not hung: the supervisor (this thread) sees its pidfd next and
                    # says how it ended (process_ended); waiting for that here would wait
                    # for ourselves. A vCPU reading from the register mirror leaves the
                    # lock free, so the heartbeat may be first to meet a dead device.
                    return
                self._channel_failed_locked(f"missed its heartbeat: {e}")
        finally:
            self._lock.release()

    def stats(self) -> dict[str, int] | None:
        """The device's counters (DeviceChannel.stats), or None: it is not live, the slot is
        busy, or it did not answer in time. A device that breaks the request has failed."""
        if not self._lock.acquire(timeout=STATS_LOCK_WAIT_S):
            return None
        try:
            process = self.process
            if self.state is not SlotState.LIVE or self.channel is None or process is None:
                return None
            if process.ended():  # its supervisor will say how; asking would only wait
                return None
            try:
                return self.channel.stats()
            except ChannelError as e:
                self._channel_failed_locked(str(e))
                return None
        finally:
            self._lock.release()

    def wait_back(self, timeout_s: float) -> bool:
        """Whether the device is live, waiting up to `timeout_s` while it is away (a restart
        under way). Not a guest's stall: nothing counts it (longest_stall_ms, waiting)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.state is SlotState.AWAY and (left := deadline - time.monotonic()) > 0:
                self._back.wait(left)
            return self._live()

    def _await_live(self, limit_ms: float | None = None) -> DeviceChannel | None:
        """The channel of the live device; while it is away, wait (the lock released) until it
        is back, at most AWAY_WAIT_MS (RESTART_WAIT_MS while it restarts), and at most
        `limit_ms`. None if it is not back by then, or has failed."""
        if self.state is not SlotState.AWAY:
            return self.channel if self.state is SlotState.LIVE else None
        start = time.monotonic()
        while self.state is SlotState.AWAY:
            wait_ms: float = RESTART_WAIT_MS if self.restarting else AWAY_WAIT_MS
            wait_ms = wait_ms if limit_ms is None else min(wait_ms, limit_ms)
            left = start + wait_ms / 1000 - time.monotonic()
            if left <= 0:
                break
            self.waiting += 1
            try:
                self._back.wait(left)
            finally:
                self.waiting -= 1
        stall_ms = (time.monotonic() - start) * 1e3
        self.longest_stall_ms = max(self.longest_stall_ms, stall_ms)
        return self.channel if self._live() else None

    def _live(self) -> bool:
        """Read anew: another thread changed the state while this one waited."""
        return self.state is SlotState.LIVE

    # -- events: what the device says unasked (protocol/events.py), checked by its channel ------
    def _on_event(self, event: events.Event) -> None:
        """Called by the channel with the slot's lock held (every channel call is)."""
        match event:
            case events.Published(state, applied, emitted):
                self.last_state = state
                if applied is not None and emitted is not None:
                    self._checkpoint_locked(Checkpoint(state, applied, emitted))
            case events.Report(message):
                # checked as one line, but bidi overrides, separators and invisible
                # characters are printable to that check: escaped, as any device's words
                shown = escaped(message)
                self._reports.warning("report", "device %s reports: %s", self.name, shown)
            case events.Stall(message):
                model = MODELS[self.model]
                if not model.pauses(self._options):
                    option = model.pause_option
                    allowed = f"its {option} is not 'pause'" if option else "its model may not"
                    raise ChannelError(f"asked to pause the VM, which {allowed}")
                if self._ended_events:
                    return  # the last words of a process that ended: its successor retries
                if self.stalled is None:
                    self.stalled = escaped(message)
                    if self._on_stall is not None:
                        self._on_stall(self)
            case events.RouteRequest(route_id, gsi):
                ok, reason = self._route_allowed(gsi)
                if self.channel is not None and not self._ended_events:  # none to answer
                    self.channel.answer(events.encode_route_done(route_id, ok, reason))
            case events.InputRoom(received, _):
                if received > self._input_sent:
                    raise ChannelError(
                        f"said it received {received} bytes of input, but was sent "
                        f"{self._input_sent}"
                    )
                self._input_room = event
            case events.MsiRequest(route_id, vector, address, data):
                reason = self._msi_route(vector, address, data)
                if reason:  # the guest's vector never fires: said, as the device is told
                    kind = "msi-host" if reason.startswith(HOST_REFUSED) else "msi"
                    self._reports.warning(
                        kind, "device %s: MSI-X vector %d not routed: %s", self.name, vector,
                        escaped(reason),
                    )  # fmt: skip
                if self.channel is not None and not self._ended_events:
                    self.channel.answer(events.encode_route_done(route_id, not reason, reason))

    def _route_allowed(self, gsi: int) -> tuple[bool, str]:
        """A device may be routed only the interrupt line its descriptor gives it (the
        monitor installed it already); MSI routes come with the PCI transport."""
        transport = MODELS[self.model].transport
        line = transport.irq if isinstance(transport, PortWindow) else None
        if line is not None and gsi == line:
            return True, ""
        return False, f"{self.model} devices signal GSI {line}, not {gsi}"

    def _msi_route(self, vector: int, address: int, data: int) -> str:
        """Install the MSI route the device asked for; '' once done, else why not."""
        if self._msi is None:
            return f"{self.model} devices have no MSI-X vectors"
        try:
            return self._msi.route(vector, address, data)
        except KvmError as e:  # the host's failure, not the device's: refused, and said
            return f"{HOST_REFUSED}: {e}"

    # -- the journal: frames past the last checkpoint (the module docstring) --------------------
    def _journal_locked(self, frame: bytes, sent: int | None = None) -> None:
        """`sent`: the host's wall clock (CLOCK_REALTIME ns) when the frame went out, now by
        default: a replay re-applies each frame as of then (a clock model reads that time)."""
        self._frames += 1
        self._journal.append((self._frames, frame, time.time_ns() if sent is None else sent))
        if len(self._journal) > MAX_JOURNAL:
            self._lost = self._journal.popleft()[0]

    def _checkpoint_locked(self, cp: Checkpoint) -> None:
        if cp.applied > self._frames or cp.applied < self._checkpoint.applied:
            raise ChannelError(
                f"published a checkpoint at frame {cp.applied}, but it was sent "
                f"{self._frames} and its last checkpoint was at {self._checkpoint.applied}"
            )
        # Its line's count only grows (a restart carries it over): one that went back made
        # the next process, an honest one, drop that many more of the guest's output bytes
        # unsent (_resume_locked: skip is the file's growth less it)
        if cp.emitted < self._checkpoint.emitted:
            raise ChannelError(
                f"published a checkpoint of {cp.emitted} output bytes, but its last had "
                f"{self._checkpoint.emitted}"
            )
        self._checkpoint, self._checkpoint_at = cp, self._frames + self._reading
        while self._journal and self._journal[0][0] <= cp.applied:
            self._journal.popleft()

    def _drain_events_locked(self, channel: DeviceChannel) -> None:
        """What a process that ended sent (its last checkpoint): all of it, as it sends no
        more (at most MAX_DRAINED frames), and charged to nothing."""
        self._ended_events = True
        try:
            channel.drain_events(limited=False)
        except ChannelError as e:  # the device is failing anyway; say what else it did
            log.warning("device %s: %s", self.name, e)
        finally:
            self._ended_events = False

    # -- failure and teardown -------------------------------------------------------------------
    def fail(self, reason: str, logged: bool = True) -> None:
        """The device failed; a restart that fails is the end of it. Not `logged` where the
        caller's error says it."""
        with self._lock:
            if self.restarting:
                self._fail_for_good_locked(reason)
                return
            self._fail_locked(reason, logged)

    def _fail_locked(self, reason: str, logged: bool = True) -> None:
        """The device failed: its on_crash policy restarts it (accesses wait) or not."""
        if self.state is SlotState.FAILED or self.restarting:
            return
        self._count_crash_locked(reason, "failed", logged)
        # The policy restarts only a device that was serving (state LIVE when it is asked).
        if self._on_failure(self, reason) and self.state is SlotState.LIVE:
            self.state, self.restarting = SlotState.AWAY, True
            self._back.notify_all()  # an access waiting for the verdict waits for the restart
            return
        self._fail_for_good_locked(reason)

    def _count_crash_locked(self, reason: str, how: str, logged: bool = True) -> None:
        """Its process is killed (if it is not dead yet), and the crash logged and counted."""
        process = self.process
        if process is not None:
            process.kill()
            self._failed_process = process  # process_ended says how it ended, later
        if logged:
            pid = 0 if process is None else process.pid
            log.error("device %s (pid %d) %s: %s", self.name, pid, how, reason)
        self.crashes += 1
        self.last_failure, self._crashed_at = reason, time.monotonic()

    def _channel_failed_locked(self, reason: str) -> None:
        """The channel broke. If the process is dead and a supervisor watches it, let the
        supervisor fail the device (process_ended: it says how the process ended).

        A device that died closed its connection as it went, and its warden, whose pidfd we
        hold, ends a moment later, the way the device did: a connection seen ended gets that
        moment (GONE_WAIT_MS) before the process is taken for alive and killed, which would
        report SIGKILL instead of the device's own end (seen for a crash fault's SIGSEGV)."""
        process, channel = self.process, self.channel
        if process is not None and channel is not None and channel.connection_ended:
            process.ended(GONE_WAIT_MS / 1000)
        if self.supervised and process is not None and process.ended():
            deadline = time.monotonic() + END_TIMEOUT_S
            while self.process is process and self.state is SlotState.LIVE:
                if not self._back.wait(max(0.0, deadline - time.monotonic())):
                    break
        if self.process is process and self.state is SlotState.LIVE:
            self._fail_locked(reason)

    def _refuse_restart_locked(self, why: str) -> NoReturn:
        self._fail_for_good_locked(f"cannot be restarted: {why}")
        raise DeviceFailure(f"device {self.name} cannot be restarted: {why}")

    def _holds_disk(self) -> bool:
        """Whether the device holds a disk image: I/O on it may outlive a killed process."""
        return any(role.kind is FdKind.DISK for role in MODELS[self.model].fds)

    def _fail_for_good_locked(self, reason: str) -> None:
        self.state, self.failed, self.restarting = SlotState.FAILED, reason, False
        self._back.notify_all()  # accesses waiting for the device read all-ones now

    def kill(self) -> None:
        """SIGKILL the device's process and its spare, and return: the VM is going, and
        close() waits for them (a machine kills every device first, so that they end
        together)."""
        with self._lock:
            spare = None if self._spare is None else self._spare[0]
            for process in (self.process, spare):
                if process is not None:
                    process.kill()

    def close(self) -> None:
        """End the device for good (the VM is going), and its spare. The listening socket of
        a process never attached closes once that process has ended: closed first, it reset
        the connection of a device still on its way up, which said "the monitor closed the
        channel" beside the error that ended the VM (a restore's devices that read no guest
        RAM start before its RAM is loaded and checked: monitor/machine.py build)."""
        with self._lock:
            process, channel = self.process, self.channel
            self.process = self.channel = None
            spare = self._drop_spare_locked()
            listener, self._listener = self._listener, None
            if self.state is not SlotState.FAILED:
                self.state = SlotState.FAILED
            self._back.notify_all()
        try:
            _end(self.name, process, channel)
        finally:
            if listener is not None:
                os.close(listener)
        if spare is not None:
            _end(self.name, spare, None)


def _how(process: DeviceProcess) -> str:
    """How a process ended, as the launcher saw it (waits for it, at most END_TIMEOUT_S)."""
    try:
        status = process.wait(END_TIMEOUT_S)
    except (SplitvmmError, TimeoutError) as e:  # the launcher is gone
        return f"ended; its exit status is unknown ({e})"
    return how_ended(status)


def _host_io_flag(spawn: Spawn) -> Callable[[], bool] | None:
    """How the monitor reads whether a device is inside a host I/O call: the flag in its
    progress page (protocol/models.py PROGRESS_HOST_IO_BYTE), read with pread (the monitor
    maps nothing a device writes); None for a device without a progress page, or without a
    disk: the flag is untrusted, and only a disk's call is waited for past a deadline (a
    compromised virtio-console that set it held a vCPU, and its heartbeat, for ever)."""
    fd = _fd_of_kind(spawn, FdKind.PROGRESS)
    if fd is None or _fd_of_kind(spawn, FdKind.DISK) is None:
        return None
    return lambda: os.pread(fd, 1, PROGRESS_HOST_IO_BYTE) == b"\x01"


def _output_fd(spawn: Spawn) -> int | None:
    """The device's output fd, if it has one."""
    return _fd_of_kind(spawn, FdKind.OUTPUT)


def _fd_of_kind(spawn: Spawn, kind: FdKind) -> int | None:
    """The fd of the device's first role of `kind`, if it has one."""
    for role in MODELS[spawn.model].fds:
        fd = spawn.fds.get(role.name)
        if role.kind is kind and fd is not None:
            return fd
    return None


def _regular_output(spawn: Spawn) -> tuple[int | None, int]:
    """The device's output fd and its size now, if it is a regular file (the module
    docstring: how many output bytes a dead process sent is then known exactly)."""
    fd = _output_fd(spawn)
    if fd is None:
        return None, 0
    st = os.fstat(fd)
    return (fd, st.st_size) if stat.S_ISREG(st.st_mode) else (None, 0)


def mark_shared_outputs(spawns: Sequence[Spawn], log_fd: int | None = 2) -> list[list[str]]:
    """Mark each device whose output is a regular file that someone else writes too: another
    device (an 8250 and a console both on stdio redirected to a file, their default; one
    path named twice) or the monitor's own log, `log_fd` (`up vm.toml > vm.log 2>&1`):
    transport[OUTPUT_SHARED]. The file's growth then counts every writer's bytes and says
    none of them what its own line took, so its slot counts nothing (the output is as a
    pipe's: a restart may repeat bytes, never drop its own for another's), and its device
    publishes as on an uncounted output (devprocs/output.py). The groups of writers' names,
    two or more each."""
    files: dict[tuple[int, int], list[str]] = {}
    if log_fd is not None and (key := _file_key(log_fd)) is not None:
        files[key] = ["the monitor's log"]
    for spawn in spawns:
        fd = _output_fd(spawn)
        key = None if fd is None else _file_key(fd)
        if key is not None:
            files.setdefault(key, []).append(spawn.name)
    groups = [names for names in files.values() if len(names) > 1]
    shared = {name for names in groups for name in names}
    for spawn in spawns:
        if spawn.name in shared:
            spawn.transport = {**(spawn.transport or {}), OUTPUT_SHARED: True}
    return groups


def refuse_outputs_on_disks(spawns: Sequence[Spawn]) -> None:
    """ConfigError if a device's output is a disk image of the VM. config.py refuses one
    that names the image's path; this, the same file by another path (a symlinked directory,
    a hard link, a bind mount), whose guest console would be appended to the disk: the files
    the monitor opened, by (st_dev, st_ino), with no window for a path to change after."""
    disks = {key: spawn.name for spawn in spawns for _, key in _files(spawn, FdKind.DISK)}
    for spawn in spawns:
        for option, key in _files(spawn, FdKind.OUTPUT):
            if key in disks:
                raise ConfigError(
                    f"device {shown(spawn.name)}.{option}: {shown(str(spawn.options[option]))} "
                    f"is the disk image of device {shown(disks[key])}; the device's output "
                    "would be appended to it"
                )


def _files(spawn: Spawn, kind: FdKind) -> list[tuple[str, tuple[int, int]]]:
    """(option, _file_key) of each of the device's fds of `kind` that is a regular file."""
    files = []
    for role in MODELS[spawn.model].fds:
        fd = spawn.fds.get(role.name)
        key = None if role.kind is not kind or fd is None else _file_key(fd)
        if key is not None:
            files.append((role.option, key))
    return files


def _file_key(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the regular file behind `fd`; None for anything else, or no fd."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _end(name: str, process: DeviceProcess | None, channel: DeviceChannel | None) -> bool:
    """Kill and reap the process, close the channel; whether the process is known to be gone,
    its device proper included (not when the wait timed out, or the launcher reported its end
    with the device proper still running: DeviceProcess.lingered)."""
    gone = True
    if process is not None:
        process.kill()
        try:
            process.wait(END_TIMEOUT_S)
            gone = not process.lingered()
        except (SplitvmmError, TimeoutError) as e:
            if isinstance(e, SplitvmmError):  # the launcher is gone (e), and wait() asked it
                # only once the pidfd said the process ended; but only the launcher could say
                # whether its device proper did too (a stalled disk's I/O): still not gone
                log.warning("device %s (pid %d) ended, but %s: whether its sandboxed process "
                            "did is not known", name, process.pid, e)  # fmt: skip
            else:
                log.error("device %s (pid %d) did not end: %s", name, process.pid, e)
            gone = False
        process.close()
    if channel is not None:
        channel.close()
    return gone


def _credited(offset: int, data: bytes) -> int | None:
    """How the register mirror counts a guest write (monitor/mirror.py, credit): a write of
    one byte at `offset`; None, as any other frame, for a wider one, which a byte-wide device
    spreads over the next registers too (an ISA bus splits it into byte cycles)."""
    return offset if len(data) == 1 else None
