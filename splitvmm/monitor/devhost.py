"""DeviceHost: the monitor's side of one device process.

Spawns the process (exec, never a bare fork of our threaded monitor) with
exactly the fds it needs, forwards guest accesses over its ZeroMQ channel and
checks every reply. Anything wrong -- a malformed frame, a wrong sequence
number, a missed deadline, slow replies past the latency budget, EOF -- kills
the process and reports a DeviceFailure; the machine's on_crash policy decides
what happens next.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq

from splitvmm.errors import DeviceFailure, ProtocolError
from splitvmm.monitor.budget import LatencyBudget
from splitvmm.protocol import control, wire
from splitvmm.protocol.spec import DEVICE_COMMAND, MAX_SPEC, DeviceSpec

log = logging.getLogger("splitvmm.devhost")

MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1
READ_TIMEOUT_MS = 2000  # a device that does not answer a read by then has failed
# ... and one that answers every read just under that deadline stalls the vCPUs (and any
# pause waiting for them) for good. Replies slower than SLOW_REPLY_MS (a healthy round trip
# is 0.1-0.3 ms here; 50 ms is a loaded host's whole scheduling period on top) add up over
# LATENCY_WINDOW_S; more than LATENCY_BUDGET_MS of them (two replies near the deadline) is a
# failure. A healthy device, even one a guest polls back to back, never has a slow reply.
SLOW_REPLY_MS = 50
LATENCY_WINDOW_S = 10
LATENCY_BUDGET_MS = 2500
WRITE_TIMEOUT_MS = 2000  # a device that stops draining posted writes has failed
CONTROL_TIMEOUT_MS = 10000  # quiesce may wait for in-flight I/O to finish
READY_TIMEOUT_MS = 15000  # interpreter start + imports + sandbox entry
READY_POLL_MS = 100  # how often we look whether it died before READY


@dataclass(slots=True)
class Spawn:
    """What a device process gets: its model and options, and role -> fd to pass."""

    name: str
    model: str
    window: int
    options: dict[str, object] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    state: dict[str, object] | None = None  # restore: the device's saved state document
    # The program run with the spec as its last argument; tests put a rogue device here.
    command: tuple[str, ...] = DEVICE_COMMAND


# Environment variables a device process inherits: only what the device code reads itself
# (sandbox/policy.py). Nothing else of the monitor's environment (credentials in it,
# LD_PRELOAD, PYTHONPATH...) reaches a process that parses guest data. The interpreter needs
# none: sys.executable finds its virtual environment through pyvenv.cfg, without PATH.
DEVICE_ENV = ("SPLITVMM_POLICY_DIR",)


def start_device(
    command: tuple[str, ...], spec: DeviceSpec, stderr: int | None = None
) -> subprocess.Popen[bytes]:
    """exec a device process with its spec on stdin (not in argv, which Linux caps at 128 KiB
    an argument) and exactly the spec's fds.

    Its fds 0 and 1 are /dev/null (0 once it has read the spec), so
    a device never reads the operator's terminal nor writes to it except through the fd
    given to it as its output (when that is stdio, a dup of our stdout above fd 2, so that
    /dev/null can take fd 1). Its fd 2 is our stderr (or `stderr`): a device's warnings and
    a crashing device's traceback must reach the operator, and a device that can write there
    can do no more than its `out` role allows already.
    """
    spec, dups = _fds_above_stdio(spec)
    data = spec.to_json().encode()
    try:
        if len(data) > MAX_SPEC:
            raise DeviceFailure(
                f"device {spec.name}: its spec and saved state take {len(data)} bytes, "
                f"over the {MAX_SPEC} a device reads"
            )
        proc = subprocess.Popen(
            list(command),
            pass_fds=tuple(spec.fds.values()),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
            env={k: os.environ[k] for k in DEVICE_ENV if k in os.environ},
            # Its own session: a Ctrl-C or a signal to our process group must not kill the
            # device before the monitor has synced it; the monitor decides when it ends
            # (and PR_SET_PDEATHSIG ends it if the monitor dies).
            start_new_session=True,
        )
    finally:
        for fd in dups:
            os.close(fd)
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        proc.kill()
        proc.wait()
        raise DeviceFailure(f"device {spec.name}: exited before reading its spec") from None
    return proc


def _fds_above_stdio(spec: DeviceSpec) -> tuple[DeviceSpec, list[int]]:
    """The spec with every fd numbered 0-2 (output = stdio) replaced by a dup above 2, which
    the caller closes once the device has it; the device's 0-2 are set apart (start_device)."""
    dups: list[int] = []
    fds = dict(spec.fds)
    for role, fd in spec.fds.items():
        if fd in (0, 1, 2):
            fds[role] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            dups.append(fds[role])
    return replace(spec, fds=fds), dups


class DeviceHost:
    def __init__(
        self,
        spawn: Spawn,
        zctx: zmq.Context | None,
        runtime_dir: Path,
        on_failure: Callable[[DeviceHost, str], None],
    ) -> None:
        """Listen on the channel and spawn the device; with `zctx`, attach at once.

        The machine passes no context: it spawns every device, confines itself, and only
        then attaches, so ZeroMQ's threads are born confined (monitor/confinement.py). The
        device may connect before that: the kernel queues its connection on our listening
        socket, which ZeroMQ adopts (ZMQ_USE_FD) with its backlog.
        """
        self.name = spawn.name
        self.model = spawn.model
        self.window = spawn.window
        self._on_failure = on_failure
        self._lock = threading.Lock()  # one access at a time on the channel (vCPUs share it)
        self._seq = 0
        self._budget = LatencyBudget(LATENCY_BUDGET_MS, LATENCY_WINDOW_S, SLOW_REPLY_MS)
        self.failed: str | None = None
        self.ready = False  # READY received: the channel carries only replies from now on
        self.endpoint = f"ipc://{runtime_dir}/{spawn.name}.sock"
        if len(self.endpoint.removeprefix("ipc://").encode()) > MAX_SOCKET_PATH:
            raise DeviceFailure(
                f"device {spawn.name}: channel path {self.endpoint} is longer than a UNIX "
                f"socket allows ({MAX_SOCKET_PATH} bytes): use a shorter vm.name, device name "
                "or XDG_RUNTIME_DIR"
            )
        self.sock: zmq.Socket | None = None
        self._listener: socket.socket | None = _listen(self.endpoint.removeprefix("ipc://"))
        try:
            self.proc = self._spawn(spawn)
        except BaseException:
            self._close_channel()
            raise
        self.pid = self.proc.pid
        # Signals go through a pidfd: it cannot hit a recycled pid, and the confined
        # monitor may send no signal by pid at all (policies/<arch>/monitor.policy).
        self.pidfd = os.pidfd_open(self.pid)
        if zctx is not None:
            try:
                self.attach(zctx)
            except BaseException:
                self.close()
                raise

    def attach(self, zctx: zmq.Context) -> None:
        """Serve the channel with ZeroMQ, which adopts our listening socket."""
        if self._listener is None:
            raise DeviceFailure(f"device {self.name}: its channel is attached or closed")
        sock = zctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, WRITE_TIMEOUT_MS)
        # A hostile device cannot make us buffer much: ZeroMQ drops the connection on a
        # frame over MAXMSGSIZE, and holds at most RCVHWM unread frames.
        sock.setsockopt(zmq.MAXMSGSIZE, control.MAX_CONTROL)
        sock.setsockopt(zmq.RCVHWM, 64)
        sock.setsockopt(zmq.USE_FD, self._listener.fileno())
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError:
            sock.close()
            raise
        self._listener.detach()  # ZeroMQ owns (and closes) the fd from now on
        self._listener = None
        self.sock = sock

    def _close_channel(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)

    def _spawn(self, spawn: Spawn) -> subprocess.Popen[bytes]:
        spec = DeviceSpec(
            spawn.name, spawn.model, self.endpoint, spawn.fds, spawn.options, state=spawn.state
        )
        return start_device(spawn.command, spec)

    def wait_ready(self) -> None:
        """READY, or a DeviceFailure saying why not (the device's own words, truncated)."""
        waited = 0
        while not self.sock.poll(READY_POLL_MS):
            waited += READY_POLL_MS
            status = self.proc.poll()
            if status is not None or waited >= READY_TIMEOUT_MS:
                why = f"exited with status {status}" if status is not None else "did not start"
                self.fail(f"{why} within {waited} ms, before it was ready")
                raise DeviceFailure(f"device {self.name}: {self.failed}")
        buf = self.sock.recv()
        try:
            if control.is_control(buf):
                msg = control.decode(buf)
                text = str(msg.get("message", ""))[: control.MAX_ERROR_TEXT]
                raise ProtocolError(f"refused to start: {text!r}")
            wire.decode_ready(buf)
            self.ready = True
        except ProtocolError as e:
            self.fail(str(e))
            raise DeviceFailure(f"device {self.name}: {e}") from None

    # -- accesses (called from vCPU threads) -----------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self.failed:
                return b"\xff" * size
            seq = self._next_seq()
            reply = self._access(wire.encode_read(seq, offset, size))
            if reply is None:
                return b"\xff" * size
            try:
                return wire.decode_read_done(reply, seq, size)
            except ProtocolError as e:
                self._fail_locked(str(e))
                return b"\xff" * size

    def sync(self) -> bool:
        """Wait until the device applied everything sent so far (posted writes included)."""
        with self._lock:
            if self.failed:
                return False
            seq = self._next_seq()
            reply = self._access(wire.encode_sync(seq))
            if reply is None:
                return False
            try:
                wire.decode_sync_done(reply, seq)
            except ProtocolError as e:
                self._fail_locked(str(e))
                return False
            return True

    def control(self, op: str, timeout_ms: int = CONTROL_TIMEOUT_MS) -> dict[str, object]:
        """A control request (quiesce, save, resume); the checked reply, or DeviceFailure."""
        with self._lock:
            if self.failed:
                raise DeviceFailure(f"device {self.name} has failed: {self.failed}")
            seq = self._next_seq()
            reply = self._request(control.encode({"op": op, "seq": seq}), timeout_ms)
            if reply is None:
                raise DeviceFailure(f"device {self.name}: {self.failed}")
            try:
                return control.check_reply(control.decode(reply), op, seq, self.model)
            except ProtocolError as e:
                self._fail_locked(str(e))
                raise DeviceFailure(f"device {self.name}: {e}") from None

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _access(self, frame: bytes) -> bytes | None:
        """A read or sync, which a vCPU waits for: its deadline, then the latency budget."""
        start = time.monotonic()
        reply = self._request(frame, READ_TIMEOUT_MS)
        if reply is None:
            return None
        over_ms = self._budget.charge((time.monotonic() - start) * 1e3)
        if over_ms is not None:
            self._fail_locked(
                f"its slow replies took {over_ms:.0f} ms within {LATENCY_WINDOW_S} s, over "
                f"the budget of {LATENCY_BUDGET_MS} ms"
            )
            return None
        return reply

    def _request(self, frame: bytes, timeout_ms: int) -> bytes | None:
        """Send a frame and wait for one reply; None (device failed) on error or deadline."""
        try:
            if self.sock.get(zmq.EVENTS) & zmq.POLLIN:  # only replies come, only when asked
                raise ProtocolError("sent a frame nobody asked for")
            self.sock.send(frame)
            # A blocking recv with a deadline: one wait fewer than poll() then recv().
            self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
            return self.sock.recv()
        except zmq.Again:
            self._fail_locked(f"no reply within {timeout_ms} ms")
            return None
        except (ProtocolError, zmq.ZMQError) as e:
            self._fail_locked(str(e))
            return None

    def write(self, offset: int, data: bytes) -> None:
        self._post(wire.encode_write(offset, data))

    def input(self, data: bytes) -> None:
        """Host input for a console device, in frame-sized chunks."""
        for i in range(0, len(data), wire.MAX_INPUT_CHUNK):
            self._post(wire.encode_input(data[i : i + wire.MAX_INPUT_CHUNK]))

    def _post(self, frame: bytes) -> None:
        with self._lock:
            if self.failed:
                return
            try:
                self.sock.send(frame)
            except zmq.ZMQError as e:  # EAGAIN after SNDTIMEO: the device stopped draining
                self._fail_locked(f"stopped taking posted writes ({e})")

    # -- failure and teardown ------------------------------------------------------
    def fail(self, reason: str) -> None:
        with self._lock:
            self._fail_locked(reason)

    def _fail_locked(self, reason: str) -> None:
        if self.failed:
            return
        self.failed = reason
        self.kill()
        log.error("device %s (pid %d) failed: %s", self.name, self.pid, reason)
        self._on_failure(self, reason)

    def exited(self, status: int) -> None:
        """The supervisor saw the process end (status as from os.waitstatus_to_exitcode)."""
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        self.fail(f"process {how}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it died on its own meanwhile

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("device %s (pid %d) did not die", self.name, self.pid)
        self._close_channel()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _listen(path: str) -> socket.socket:
    """The channel's listening UNIX socket, 0600 (inside the 0700 runtime dir)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(1)  # one peer: the device (PAIR)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock
