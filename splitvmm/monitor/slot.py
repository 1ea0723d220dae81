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
at a time calls them (the machine's; later the one that restarts devices).
Accesses and control requests may come from any thread; the slot's lock
serializes them on the channel.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from splitvmm.errors import DeviceFailure, SplitvmmError
from splitvmm.monitor.channel import (
    CONTROL_TIMEOUT_MS,
    READ_TIMEOUT_MS,
    ChannelError,
    DeviceChannel,
)
from splitvmm.protocol import events, wire
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.sandbox.spawn import DeviceProcess

log = logging.getLogger("splitvmm.slot")

MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1
# An access to a device that is away waits no longer than one to a device that is there may
# (its read deadline): a pause waits for every vCPU to finish its access (coordinator.py).
AWAY_WAIT_MS = READ_TIMEOUT_MS
END_TIMEOUT_S = 5.0  # a killed device is gone at once; its status follows from the launcher
# The restart budget's defaults, systemd's (StartLimitBurst=5 within StartLimitIntervalSec=10s):
# a device that crashes faster than that is not restarted again.
RESTART_BURST = 5
RESTART_INTERVAL_S = 10.0

# Starts a device process: the process, and its channel's listening socket (an fd we own).
# The launcher's spawn for the machine; tests start theirs with sandbox.spawn.spawn_child.
Spawner = Callable[[DeviceSpec], tuple[DeviceProcess, int]]


@dataclass(slots=True)
class Spawn:
    """What a device's processes get: its model and options, and role -> fd to pass."""

    name: str
    model: str
    window: int
    options: dict[str, object] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    state: dict[str, object] | None = None  # restore: the device's saved state document


class SlotState(enum.Enum):
    AWAY = "away"
    LIVE = "running"
    FAILED = "failed"


@dataclass(slots=True)
class RestartBudget:
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
        zctx: zmq.Context[zmq.Socket[bytes]],
        on_failure: Callable[[DeviceSlot, str], None],
    ) -> None:
        self.name = spawn.name
        self.model = spawn.model
        self.window = spawn.window
        self._options = spawn.options
        self._fds = spawn.fds  # the machine owns them; each process gets them again
        self.endpoint = f"ipc://{runtime_dir}/{spawn.name}.sock"
        if len(self.endpoint.removeprefix("ipc://").encode()) > MAX_SOCKET_PATH:
            raise DeviceFailure(
                f"device {spawn.name}: channel path {self.endpoint} is longer than a UNIX "
                f"socket allows ({MAX_SOCKET_PATH} bytes): use a shorter vm.name, device name "
                "or XDG_RUNTIME_DIR"
            )
        self._spawner = spawner
        self._zctx = zctx
        self._on_failure = on_failure
        self.last_state = spawn.state  # what a new process starts from (the last snapshot's)
        self.generation = 0  # processes started into the slot so far
        self.restarts = RestartBudget()
        self.process: DeviceProcess | None = None
        self.channel: DeviceChannel | None = None
        self._listener: int | None = None  # launched, not attached yet: ours to close
        self.state = SlotState.AWAY
        self.failed: str | None = None  # why it failed, while FAILED
        self.waiting = 0  # accesses waiting for the device to be back
        self._lock = threading.Lock()
        self._back = threading.Condition(self._lock)  # notified when the state leaves AWAY
        self._reports = RateLimitedLog(log)  # a device's reports: one line a second at most

    @property
    def pid(self) -> int:
        process = self.process
        return process.pid if process is not None else 0

    @property
    def ready(self) -> bool:
        return self.state is SlotState.LIVE

    # -- the process in the slot ---------------------------------------------------------------
    def start(self) -> None:
        """Start the device's next process from its last known state. Accesses wait until
        wait_ready() has seen its READY."""
        self.launch()
        self.attach()

    def launch(self) -> None:
        """The first half of start(): ask for the device's next process, from its last known
        state, and keep its channel's listening socket unserved. The process starts and may
        connect at once (the kernel queues it); a machine launches its devices before its
        ZeroMQ sockets may exist (monitor/confinement.py), and attaches them afterwards."""
        with self._lock:
            if self.process is not None or self.state is not SlotState.AWAY:
                raise DeviceFailure(
                    f"device {self.name}: its slot is {self.state.value}, not empty"
                )
            spec = DeviceSpec(
                self.name,
                self.model,
                self.endpoint,
                self._fds,
                self._options,
                state=self.last_state,
            )
        process, listener = self._spawner(spec)
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
            channel = DeviceChannel(self.model, self.endpoint, listener, self._zctx, self._on_event)
        except BaseException:
            with self._lock:
                self.process = None
            _end(self.name, process, None)
            Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
            raise
        with self._lock:
            self.channel = channel

    def wait_ready(self) -> None:
        """The process started last is READY: the device is back. DeviceFailure otherwise."""
        with self._lock:
            process, channel = self.process, self.channel
        if process is None or channel is None:
            raise DeviceFailure(f"device {self.name}: no process of it was started")
        try:
            channel.wait_ready(process)
        except ChannelError as e:
            self.fail(str(e))
            raise DeviceFailure(f"device {self.name}: {self.failed}") from None
        with self._lock:
            if self.process is process and self.state is SlotState.AWAY:
                self.state = SlotState.LIVE
                self._back.notify_all()

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
            if process is not self.process:
                return  # an earlier process of the device, ended on purpose (vacate)
            self._drain_events_locked()  # what it published last is its last known state
            # The lock is held while the launcher says how it ended (a few ms): an access
            # meanwhile waits here, not on a dead device until its deadline.
            try:
                status = process.wait(END_TIMEOUT_S)
            except (SplitvmmError, TimeoutError) as e:  # the launcher is gone
                how = f"ended; its exit status is unknown ({e})"
            else:
                how = (
                    f"was killed by signal {-status}"
                    if status < 0
                    else f"exited with status {status}"
                )
            self._fail_locked(f"process {how}")

    # -- accesses (from vCPU threads, the console, the coordinator) -----------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            channel = self._await_live()
            if channel is not None:
                try:
                    return channel.read(offset, size)
                except ChannelError as e:
                    self._fail_locked(str(e))
            return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self._post(wire.encode_write(offset, data))

    def input(self, data: bytes) -> None:
        """Host input for a console device, in frame-sized chunks."""
        for i in range(0, len(data), wire.MAX_INPUT_CHUNK):
            self._post(wire.encode_input(data[i : i + wire.MAX_INPUT_CHUNK]))

    def _post(self, frame: bytes) -> None:
        with self._lock:
            channel = self._await_live()
            if channel is not None:
                try:
                    channel.post(frame)
                except ChannelError as e:
                    self._fail_locked(str(e))

    def sync(self) -> bool:
        """Wait until a live device applied everything sent so far (posted writes included)."""
        with self._lock:
            if self.state is not SlotState.LIVE or self.channel is None:
                return False
            try:
                self.channel.sync()
            except ChannelError as e:
                self._fail_locked(str(e))
                return False
            return True

    def control(self, op: str, timeout_ms: int = CONTROL_TIMEOUT_MS) -> dict[str, object]:
        """A control request (quiesce, save, resume); the checked reply, or DeviceFailure.
        A saved state becomes the device's last known state."""
        with self._lock:
            channel = self._await_live()
            if channel is None:
                why = f"has failed: {self.failed}" if self.failed else "is away"
                raise DeviceFailure(f"device {self.name} {why}")
            try:
                reply = channel.control(op, timeout_ms)
            except ChannelError as e:
                self._fail_locked(str(e))
                raise DeviceFailure(f"device {self.name}: {e}") from None
            if op == "save":
                self.last_state = reply
            return reply

    def _await_live(self) -> DeviceChannel | None:
        """The channel of the live device; while it is away, wait (the lock released) until it
        is back, at most AWAY_WAIT_MS. None if it is not back by then, or has failed."""
        deadline = None
        while self.state is SlotState.AWAY:
            deadline = deadline or time.monotonic() + AWAY_WAIT_MS / 1000
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.waiting += 1
            try:
                self._back.wait(left)
            finally:
                self.waiting -= 1
        return self.channel if self.state is SlotState.LIVE else None

    # -- events: what the device says unasked (protocol/events.py), checked by its channel ------
    def _on_event(self, event: events.Event) -> None:
        """Called by the channel with the slot's lock held (every channel call is)."""
        match event:
            case events.Published(state):
                self.last_state = state  # a restart starts from it, not from the last snapshot
            case events.Report(message):
                self._reports.warning("report", "device %s reports: %s", self.name, message)
            case events.RouteRequest(route_id, gsi):
                ok, reason = self._route_allowed(gsi)
                if self.channel is not None:
                    self.channel.post(events.encode_route_done(route_id, ok, reason))

    def _route_allowed(self, gsi: int) -> tuple[bool, str]:
        """A device may be routed only the interrupt line its descriptor gives it (the
        monitor installed it already); MSI routes come with the PCI transport."""
        line = MODELS[self.model].transport.irq
        if gsi == line:
            return True, ""
        return False, f"{self.model} devices signal GSI {line}, not {gsi}"

    def _drain_events_locked(self) -> None:
        if self.channel is None:
            return
        try:
            self.channel.drain_events()
        except ChannelError as e:  # the device is failing anyway; say what else it did
            log.warning("device %s: %s", self.name, e)

    # -- failure and teardown -------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        with self._lock:
            self._fail_locked(reason)

    def _fail_locked(self, reason: str) -> None:
        if self.state is SlotState.FAILED:
            return
        self.state, self.failed = SlotState.FAILED, reason
        if self.process is not None:
            self.process.kill()
        log.error("device %s (pid %d) failed: %s", self.name, self.pid, reason)
        self._back.notify_all()  # accesses waiting for the device read all-ones now
        self._on_failure(self, reason)

    def close(self) -> None:
        """End the device for good (the VM is going)."""
        with self._lock:
            process, channel = self.process, self.channel
            self.process = self.channel = None
            self._drop_listener_locked()
            if self.state is not SlotState.FAILED:
                self.state = SlotState.FAILED
            self._back.notify_all()
        _end(self.name, process, channel)


def _end(name: str, process: DeviceProcess | None, channel: DeviceChannel | None) -> None:
    if process is not None:
        process.kill()
        try:
            process.wait(END_TIMEOUT_S)
        except (SplitvmmError, TimeoutError) as e:
            log.error("device %s (pid %d) did not end: %s", name, process.pid, e)
        process.close()
    if channel is not None:
        channel.close()
