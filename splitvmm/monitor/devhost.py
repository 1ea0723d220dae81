"""DeviceHost: the monitor's side of one device process.

Spawns the process (exec, never a bare fork of our threaded monitor) with
exactly the fds it needs, forwards guest accesses over its ZeroMQ channel and
checks every reply. Anything wrong -- a malformed frame, a wrong sequence
number, a missed deadline, EOF -- kills the process and reports a
DeviceFailure; the machine's on_crash policy decides what happens next.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from splitvmm.devprocs.spec import DeviceSpec
from splitvmm.errors import DeviceFailure, ProtocolError
from splitvmm.protocol import wire

log = logging.getLogger("splitvmm.devhost")

READ_TIMEOUT_MS = 2000  # a device that does not answer a read by then has failed
WRITE_TIMEOUT_MS = 2000  # a device that stops draining posted writes has failed
READY_TIMEOUT_MS = 15000  # interpreter start + imports + sandbox entry


@dataclass(slots=True)
class Spawn:
    """What a device process gets: its model and options, and role -> fd to pass."""

    name: str
    model: str
    window: int
    options: dict[str, object] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)


class DeviceHost:
    def __init__(
        self,
        spawn: Spawn,
        zctx: zmq.Context,
        runtime_dir: Path,
        on_failure: Callable[[DeviceHost, str], None],
    ) -> None:
        self.name = spawn.name
        self.model = spawn.model
        self.window = spawn.window
        self._on_failure = on_failure
        self._lock = threading.Lock()  # one access at a time on the channel (vCPUs share it)
        self._seq = 0
        self.failed: str | None = None
        self.endpoint = f"ipc://{runtime_dir}/{spawn.name}.sock"
        self.sock = zctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, WRITE_TIMEOUT_MS)
        self.sock.bind(self.endpoint)
        spec = DeviceSpec(spawn.name, spawn.model, self.endpoint, spawn.fds, spawn.options)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitvmm.devprocs", spec.to_json()],
            pass_fds=tuple(spawn.fds.values()),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        if not self.sock.poll(READY_TIMEOUT_MS):
            self.fail(f"did not start within {READY_TIMEOUT_MS} ms")
            raise DeviceFailure(f"device {self.name}: {self.failed}")
        try:
            wire.decode_ready(self.sock.recv())
        except ProtocolError as e:
            self.fail(f"sent garbage instead of READY: {e}")
            raise DeviceFailure(f"device {self.name}: {self.failed}") from None

    # -- accesses (called from vCPU threads) -----------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self.failed:
                return b"\xff" * size
            seq = self._next_seq()
            reply = self._request(wire.encode_read(seq, offset, size))
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
            reply = self._request(wire.encode_sync(seq))
            if reply is None:
                return False
            try:
                wire.decode_sync_done(reply, seq)
            except ProtocolError as e:
                self._fail_locked(str(e))
                return False
            return True

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _request(self, frame: bytes) -> bytes | None:
        """Send a frame and wait for one reply; None (device failed) on error or deadline."""
        try:
            self.sock.send(frame)
            if not self.sock.poll(READ_TIMEOUT_MS):
                raise ProtocolError(f"no reply within {READ_TIMEOUT_MS} ms")
            return self.sock.recv()
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
            self.proc.kill()

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("device %s (pid %d) did not die", self.name, self.pid)
        self.sock.close()
        path = self.endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
