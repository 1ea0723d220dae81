"""A device process spawned by sandbox/spawn.py's start_device, without a VM or /dev/kvm.

`python -m splitvmm.devprocs < SPEC_JSON` with exactly the spec's fds passed
(`pass_fds`), an eventfd as its irq, a pipe as its output, and a ZeroMQ PAIR
channel bound on ipc:// in a private directory. Optionally a test hook (a
cloudpickled callable run inside the sandbox, result as JSON on a pipe).
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle  # type: ignore[import-untyped]
import zmq

from splitvmm.cli.policy import stand_in_fds, stand_in_transport
from splitvmm.protocol import events, wire
from splitvmm.protocol.models import MODELS, FdKind
from splitvmm.protocol.spec import DEVICE_COMMAND, DeviceSpec
from splitvmm.sandbox.spawn import start_device

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 15.0

# Runs the device with enter_sandbox() replaced by a bare connect: the baseline for
# the start-up figure only (tests never run an unsandboxed device otherwise).
UNSANDBOXED = (
    "import runpy, sys; "
    "from splitvmm.devprocs import runtime; from splitvmm.sandbox import device as sandbox; "
    "sandbox.enter_sandbox = lambda model, keep, audit, *, channel, connect, **_: connect(channel); "
    "runpy.run_module('splitvmm.devprocs', run_name='__main__')"
)


class SandboxedDevice:
    def __init__(
        self,
        rundir: Path,
        model: str = "serial",
        *,
        hook: Callable[[dict[str, int]], dict[str, object]] | None = None,
        extra_fds: dict[str, int] | None = None,
        seccomp: str = "kill",
        sandboxed: bool = True,
        stderr_to_file: bool = True,
        out: int | None = None,
        stderr_fd: int | None = None,
        transport: dict[str, object] | None = None,
        user: tuple[int, int] | None = None,
    ) -> None:
        """out: the device's output fd (default: a pipe read back by output()); stderr_fd:
        its stderr (default: a file, or /dev/null without stderr_to_file); transport: what
        the monitor would add to a virtio device's stand-in transport; user: the host (uid,
        gid) it runs as (DeviceSpec.user), its runtime dir and channel opened to it as the
        monitor and the launcher do (monitor/rundir.py, sandbox/spawn.py listen_channel)."""
        # Pickle first: a hook that cannot be pickled must fail before anything is open.
        encoded = base64.b64encode(cloudpickle.dumps(hook)).decode() if hook else ""
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 2000)  # a dead device must fail the test, not hang it
        self.endpoint = f"ipc://{rundir}/{model}0.sock"
        self.sock.bind(self.endpoint)
        if user is not None:
            os.chmod(rundir, 0o711)
            os.chmod(self.endpoint.removeprefix("ipc://"), 0o602)
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # A virtio model's roles (guest RAM, eventfds, a disk) as the monitor would make them.
        descriptor = MODELS[model]
        virtio = any(role.kind is FdKind.GUEST_RAM for role in descriptor.fds)
        self.stand_ins = stand_in_fds(descriptor, rundir, {}) if virtio else {}
        transport = {**stand_in_transport(), **(transport or {})} if virtio else None
        fds = {"irq": self.irq, "out": out_w if out is None else out, **self.stand_ins}
        fds.update(extra_fds or {})
        self.result_r = -1
        if hook is not None:
            self.result_r, fds["hook_result"] = os.pipe2(os.O_CLOEXEC)
        spec = DeviceSpec(
            f"{model}0", model, self.endpoint, fds, seccomp=seccomp, hook=encoded,
            transport=transport, user=user,
        )  # fmt: skip
        self.stderr_path = rundir / f"{model}0.stderr"
        argv = list(DEVICE_COMMAND)  # the spec goes on stdin
        if not sandboxed:
            argv = [sys.executable, "-c", UNSANDBOXED]
        with open(self.stderr_path if stderr_to_file else os.devnull, "wb") as stderr:
            self.started = time.monotonic()
            error_fd = stderr.fileno() if stderr_fd is None else stderr_fd
            self.proc = start_device(tuple(argv), spec, stderr=error_fd)
        os.close(out_w)
        if hook is not None:
            os.close(fds["hook_result"])
        self._seq = 0

    # -- lifecycle -----------------------------------------------------------------------
    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds from spawn to READY; AssertionError with the device's stderr otherwise."""
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no READY within {timeout} s; stderr:\n{self.stderr()}")
        wire.decode_ready(self.sock.recv())
        return time.monotonic() - self.started

    def device_pid(self) -> int:
        """The device proper: the warden's only child (pid 1 of its PID namespace)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        children = path.read_text().split()
        if len(children) != 1:
            raise AssertionError(f"warden {self.proc.pid} has children {children}")
        return int(children[0])

    def hook_result(self, timeout: float = READY_TIMEOUT_S) -> dict[str, object] | None:
        """The hook's JSON result; None if the pipe closed empty (the device died first)."""
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.result_r], [], [], left)[0]:
                raise AssertionError(f"hook result pending after {timeout} s:\n{self.stderr()}")
            chunk = os.read(self.result_r, 65536)
            if not chunk:
                return json.loads(data) if data else None
            data += chunk

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        if not self.stderr_path.exists():
            return "(stderr went to /dev/null)"
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        """Kill the device (its warden, which takes the device along); idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.sock.closed:
            return
        self.sock.close()
        self.zctx.term()
        for fd in (self.irq, self.out_r, self.result_r, *self.stand_ins.values()):
            if fd >= 0:
                os.close(fd)

    # -- the channel ---------------------------------------------------------------------
    def read(self, offset: int, size: int = 1) -> bytes:
        self._seq += 1
        self.sock.send(wire.encode_read(self._seq, offset, size))
        return wire.decode_read_done(self._reply("READ"), self._seq, size)

    def write(self, offset: int, data: bytes) -> None:
        self.sock.send(wire.encode_write(offset, data))

    def sync(self) -> None:
        self._seq += 1
        self.sock.send(wire.encode_sync(self._seq))
        wire.decode_sync_done(self._reply("SYNC"), self._seq)

    def _reply(self, what: str) -> bytes:
        """The next frame that is neither a MIRROR nor an event (the device's register mirror,
        its checkpoints, its room for input: what it sends unasked)."""
        while True:
            if not self.sock.poll(2000):
                raise AssertionError(f"no reply to {what}; stderr:\n{self.stderr()}")
            buf: bytes = self.sock.recv()
            if not wire.is_mirror(buf) and not events.is_event(buf):
                return buf

    def output(self) -> bytes:
        try:
            return os.read(self.out_r, 65536)
        except BlockingIOError:
            return b""
