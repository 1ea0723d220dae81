"""The launcher: the process that starts device processes for the monitor.

Why a process of its own. The monitor confines itself before the guest runs
(monitor/confinement.py), and a confined monitor can start no device: its
seccomp filter has no execve or fork; Landlock forbids mounts to a landlocked
process and to its children (a device's sandbox mounts its empty root); and a
root monitor without CAP_SETFCAP cannot let a device map uid 0 into its user
namespace. So the monitor forks the launcher first, while it has one thread and
holds nothing of the VM (no /dev/kvm, no guest RAM, no device fd yet), and asks
it for every device process from then on -- and, later, for every restart.

Over a SOCK_SEQPACKET socketpair (messages keep their bounds; fds ride along):

    launcher -> monitor  ready                       once, when it is set up
    monitor -> launcher  spawn {id, size} + fds      then `size` bytes of spec JSON,
                                                     in chunks (a message must fit
                                                     the socket's send buffer)
    launcher -> monitor  spawned {id, pid} + pidfd and the channel's listening socket
                         refused {id, message}       one of the two for each spawn
    monitor -> launcher  resume {id, pid, size}      then `size` bytes of JSON: the rest
                                                     of a warm spare's spec (below)
    launcher -> monitor  resumed {id} | refused {id, message}
                         exited {pid, status}        for each device it started (it
                                                     is their parent and reaps them)

What a compromised monitor can ask of it, and no more:
- start DEVICE_COMMAND (this interpreter, `-m splitvmm.devprocs`), never a
  command from the request, for a model of protocol.models.MODELS, holding
  exactly the fds the request carries, one per role of that model;
- with seccomp "kill" and no test hook: `splitvmm policy audit` and the test
  harnesses, which need a tracing filter or a hook, call start_device themselves;
- listen on that device's channel, `<runtime dir>/<name>.sock`: the runtime
  dir is fixed when the launcher starts and the name is a plain file name, so
  it makes no other file;
- tell the exit status of the devices it started. Signals go through the
  pidfd the monitor holds: the launcher kills nothing on request.
- give a warm spare it started (a deferred spec: protocol/spec.py, monitor/slot.py) the
  rest of its spec, once: its socket, `<name>.sock.spare`, gets its channel's path as a
  second name (sandbox/spawn.py resume_child), and the rest goes down its stdin, checked
  as a spawn's spec is.
A request is at most MAX_SPEC bytes of spec and MAX_FDS fds; at most MAX_DEVICES
devices live at once, spares included.

Its own confinement: it keeps the privileges the monitor had when it forked it --
a root launcher must keep CAP_SETFCAP (a device maps uid 0 into its user
namespace) and may not be landlocked or filtered (every device inherits both
before entering its own sandbox, which unshares and mounts) -- so the narrow
request above is the barrier. It has no_new_privs, its own session (the
terminal's Ctrl-C is the monitor's to handle), PR_SET_PDEATHSIG on the monitor,
and ends when the monitor's end of the socket closes, killing the devices it
started (each would die with it anyway: PR_SET_PDEATHSIG). It holds the socket,
/dev/null as stdin and stdout, and the operator's stderr, which devices inherit.
"""

from __future__ import annotations

import array
import fcntl
import gc
import itertools
import json
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from splitvmm.errors import DeviceFailure, ProtocolError, SplitvmmError, clip
from splitvmm.native import confine
from splitvmm.protocol import faults
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import DEFERRED, MAX_SPEC, DeviceSpec
from splitvmm.sandbox.spawn import (
    ChildProcess,
    DeviceProcess,
    check_spec_size,
    readable,
    resume_child,
    spawn_child,
)

T = TypeVar("T")

MAX_FDS = 16  # fds of one device: a virtio device's irqfds, ioeventfds, RAM and backend fit
MAX_DEVICES = 64  # live devices of one VM: a compromised monitor gets no fork bomb
MAX_MESSAGE = 4096  # a request header or a reply; the spec comes in chunks after its header
CHUNK = 64 << 10  # a SOCK_SEQPACKET message must fit the socket's send buffer (~208 KiB)
CHUNK_TIMEOUT_S = 5.0  # the rest of a request, once its header came
READY_TIMEOUT_S = 10.0  # a fork and a few syscalls
REPLY_TIMEOUT_S = 30.0  # a spawn is a fork, an exec and the spec written to a pipe
SEND_TIMEOUT_S = 10.0  # a launcher that stops reading has failed
STOP_TIMEOUT_S = 5.0  # the launcher ends at once when the monitor closes its socket


class LauncherError(SplitvmmError):
    """The launcher is gone or broke its protocol; no device can be started any more."""


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


# -- messages ---------------------------------------------------------------------------------
def _send(sock: socket.socket, msg: dict[str, object] | bytes, fds: Sequence[int] = ()) -> None:
    data = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    socket.send_fds(sock, [data], list(fds))


def _receive(sock: socket.socket, size: int) -> tuple[bytes, list[int], bool]:
    """One message, the fds it carries (close-on-exec), and whether it was cut: over `size`
    bytes or MAX_FDS fds (the kernel closes the fds that did not fit)."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _fd_above_stdio(sock: socket.socket) -> socket.socket:
    """The socket on an fd above 2: with stdin closed, a socketpair may get fd 0, which the
    console (and the launcher's /dev/null) will claim."""
    if sock.fileno() > 2:
        return sock
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
    sock.close()
    return socket.socket(fileno=fd)


@dataclass(frozen=True, slots=True)
class _Reply:
    """A message from the launcher, checked (see _REPLIES)."""

    op: str
    id: int = 0
    pid: int = 0
    status: int = 0
    message: str = ""
    fds: tuple[int, ...] = ()


# What each message from the launcher carries besides its op: keys with their types, fds.
_REPLIES: dict[str, tuple[dict[str, type], int]] = {
    "ready": ({}, 0),
    "spawned": ({"id": int, "pid": int}, 2),  # the pidfd, the channel's listening socket
    "refused": ({"id": int, "message": str}, 0),
    "resumed": ({"id": int}, 0),
    "exited": ({"pid": int, "status": int}, 0),
}


def _decode_reply(data: bytes, fds: list[int]) -> _Reply:
    try:
        msg = json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        raise ValueError(f"a message is not JSON: {data[:100]!r}") from None
    op = msg.get("op") if isinstance(msg, dict) else None
    shape = _REPLIES.get(op) if isinstance(op, str) else None  # a list op is unhashable
    if shape is None:
        raise ValueError(f"unknown message {clip(repr(msg))}")
    keys, nfds = shape
    if set(msg) != {"op", *keys} or len(fds) != nfds:
        raise ValueError(f"malformed {msg['op']} message with {len(fds)} fds")
    for key, kind in keys.items():
        if type(msg[key]) is not kind:
            raise ValueError(f"{msg['op']} message: {key} is not {kind.__name__}")
    return _Reply(fds=tuple(fds), **msg)


# -- the monitor's side -----------------------------------------------------------------------
class Launcher:
    """The monitor's handle on its launcher; safe from any thread."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)  # now: a confined monitor may not open one
        self._cond = threading.Condition()
        self._spawn_lock = threading.Lock()  # one spawn at a time: one reply awaited
        self._ids = itertools.count(1)
        self._pending = 0  # the id of the spawn awaiting its reply
        self._reading = False  # one thread receives; the others wait for what it files
        self._ready = False
        self._reply: _Reply | None = None  # to the spawn in progress
        self._exits: dict[int, int] = {}  # pid -> status, until its waiter takes it
        self._running: set[int] = set()  # pids spawned whose end was not reported yet
        self._broken: str | None = None

    @classmethod
    def start(cls, channel_dir: Path) -> Launcher:
        """Fork the launcher; the devices' channels will be in `channel_dir`. Call it first,
        single-threaded (a fork in a threaded process is unsafe, gh-100228)."""
        if thread_count() != 1:
            raise LauncherError("the launcher must be started before any thread exists")
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, theirs = (_fd_above_stdio(s) for s in pair)
        monitor = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _launcher_main(theirs.detach(), monitor, str(channel_dir))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(SEND_TIMEOUT_S)
        launcher = cls(ours, pid)
        try:
            launcher._await(lambda: launcher._ready or None, READY_TIMEOUT_S)
        except LauncherError as e:
            launcher.close()
            raise LauncherError(f"the launcher did not start: {e}") from None
        return launcher

    def fileno(self) -> int:
        """The socket's fd: the one the confined monitor may send to and receive from."""
        return self._sock.fileno()

    def spawn(self, spec: DeviceSpec) -> tuple[LaunchedProcess, int]:
        """Start a device: its process, and its channel's listening socket (an fd we own).
        DeviceFailure naming the device if the launcher refused it. A deferred spec starts
        a warm spare, which waits for resume()."""
        data = spec.to_json().encode()
        check_spec_size(spec.name, data)
        reply = self._request({"op": "spawn"}, data, list(spec.fds.values()))
        pidfd, listener = reply.fds
        return LaunchedProcess(self, reply.pid, pidfd), listener

    def resume(self, process: DeviceProcess, spec: DeviceSpec) -> None:
        """Give the warm spare `process` the rest of its spec (the DEFERRED part of `spec`):
        it takes over from there. DeviceFailure if the launcher refused (the spare ended)."""
        data = json.dumps(spec.rest()).encode()
        check_spec_size(spec.name, data)
        self._request({"op": "resume", "pid": process.pid}, data, [])

    def _request(self, header: dict[str, object], data: bytes, fds: list[int]) -> _Reply:
        """Send a request (`header`, then `data` in chunks) and take its reply; DeviceFailure
        with the launcher's words if it refused."""
        with self._spawn_lock:
            self._pending = next(self._ids)
            header = {**header, "id": self._pending, "size": len(data)}
            try:
                _send(self._sock, header, fds)
                for i in range(0, len(data), CHUNK):
                    _send(self._sock, data[i : i + CHUNK])
            except OSError as e:
                raise LauncherError(f"the launcher takes no request: {e}") from None
            reply = self._await(self._take_reply, REPLY_TIMEOUT_S)
        if reply.op == "refused":
            raise DeviceFailure(clip(reply.message))
        return reply

    def wait_exit(self, pid: int, timeout_s: float) -> int:
        """The exit status of a device it started, which has ended (or is about to)."""
        return self._await(lambda: self._exits.pop(pid, None), timeout_s)

    def _take_reply(self) -> _Reply | None:
        reply, self._reply = self._reply, None
        return reply

    def _await(self, take: Callable[[], T | None], timeout_s: float) -> T:
        """What `take` finds among the messages filed so far, receiving more (one thread at
        a time) until it does; LauncherError if the launcher is gone, broken or silent --
        for good: a reply that comes late would answer the wrong request."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (found := take()) is None:
                left = deadline - time.monotonic()
                if left <= 0 and not self._broken:
                    self._broken = f"the launcher did not answer within {timeout_s:g} s"
                if self._broken:
                    raise LauncherError(self._broken)
                if self._reading:
                    self._cond.wait(left)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    received = self._receive(left)
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if received is not None:
                    self._file(*received)
            return found

    def _receive(self, timeout_s: float) -> tuple[bytes, list[int]] | None:
        """One message within `timeout_s`, or None (and why it broke in `_broken`)."""
        try:
            if not readable(self._sock.fileno(), timeout_s):
                return None
            data, fds, cut = _receive(self._sock, MAX_MESSAGE)
        except OSError as e:
            self._broken = f"the launcher's socket failed: {e}"
            return None
        if cut or not data:
            _close_all(fds)
            self._broken = "the launcher sent too much" if cut else "the launcher has exited"
            return None
        return data, fds

    def _file(self, data: bytes, fds: list[int]) -> None:
        """Sort one message from the launcher (the lock held)."""
        try:
            reply = _decode_reply(data, fds)
        except ValueError as e:
            _close_all(fds)
            self._broken = f"the launcher broke its protocol: {e}"
            return
        if reply.op == "ready":
            self._ready = True
        elif reply.op == "exited":
            if reply.pid not in self._running:
                self._broken = f"the launcher reported the end of pid {reply.pid}, not ours"
            self._running.discard(reply.pid)
            self._exits[reply.pid] = reply.status
        elif reply.id != self._pending or not self._spawn_lock.locked():
            _close_all(fds)
            if reply.op == "spawned":  # a refusal may answer a garbled request; this may not
                self._broken = f"the launcher started pid {reply.pid} for nobody"
        else:
            if reply.op == "spawned":
                self._running.add(reply.pid)
            self._reply = reply

    def close(self) -> None:
        """End the launcher, which kills the devices it started and exits; reap it."""
        if self._pidfd < 0:
            return
        self._sock.close()
        if not readable(self._pidfd, STOP_TIMEOUT_S):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._pidfd)
        self._pidfd = -1


class LaunchedProcess(DeviceProcess):
    """A device process the launcher started: it reaps it and tells us its status."""

    def __init__(self, launcher: Launcher, pid: int, pidfd: int) -> None:
        super().__init__(pid, pidfd)
        self._launcher = launcher

    def _reap(self) -> int:
        return self._launcher.wait_exit(self.pid, REPLY_TIMEOUT_S)


# -- the launcher's side ----------------------------------------------------------------------
class Refused(Exception):
    """A request the launcher does not carry out; str() says why, naming the device."""


def _launcher_main(sock_fd: int, monitor: int, channel_dir: str) -> int:
    """The forked launcher, from its first instruction to its exit status."""
    gc.freeze()  # what we inherited is never collected: no finalizer closes an fd we reuse
    os.setsid()  # the terminal's signals are the monitor's
    confine.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != monitor:  # the monitor died before prctl took effect
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _keep_only_fds(sock_fd)
    confine.set_no_new_privs()
    sock = socket.socket(fileno=sock_fd)
    _send(sock, {"op": "ready"})
    _Server(sock, channel_dir).serve()
    return 0


def _keep_only_fds(sock_fd: int) -> None:
    """/dev/null as stdin and stdout, stderr kept for the devices, the socket; nothing else."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        if fd != null:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, os.sysconf("SC_OPEN_MAX"))


class _Server:
    def __init__(self, sock: socket.socket, channel_dir: str) -> None:
        self.sock = sock
        self.channel_dir = channel_dir
        self.children: dict[int, ChildProcess] = {}  # pidfd -> the device
        self.spares: dict[int, tuple[ChildProcess, DeviceSpec]] = {}  # pid -> spare, its spec
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    def serve(self) -> None:
        """Requests and ends of devices, until the monitor closes its end."""
        try:
            while True:
                for fd, _ in self.poller.poll():
                    if fd != self.sock.fileno():
                        self._report_end(fd)
                    elif not self._serve_request():
                        return
        except (BrokenPipeError, ConnectionResetError):
            return  # the monitor is gone: nobody to tell (its devices end below)
        finally:
            for process in self.children.values():
                process.kill()
                process.wait(STOP_TIMEOUT_S)

    def _serve_request(self) -> bool:
        """One request, and its one reply; False once the monitor has closed its end."""
        data, fds, cut = _receive(self.sock, MAX_MESSAGE)
        if not data and not fds:
            return False
        request = 0
        try:
            request, size, spare = _decode_header(data)
            payload = self._read_chunks(size)  # read whole even to be refused
            if cut:
                raise Refused(f"launcher: a request over {MAX_MESSAGE} bytes or {MAX_FDS} fds")
            if spare is not None:
                self._resume(spare, payload, len(fds))
                _send(self.sock, {"op": "resumed", "id": request})
                return True
            spec = _decode_spec(payload)
            _check_spec(spec, self.channel_dir, len(fds))
            if len(self.children) >= MAX_DEVICES:
                raise Refused(f"device {spec.name}: {MAX_DEVICES} devices run already")
            process, listener = spawn_child(
                replace(spec, fds=dict(zip(spec.fds, fds, strict=True)))
            )
        except (Refused, DeviceFailure, OSError) as e:
            _send(self.sock, {"op": "refused", "id": request, "message": str(e)})
            return True
        finally:
            _close_all(fds)  # the device has its own copies now
        try:
            reply = {"op": "spawned", "id": request, "pid": process.pid}
            _send(self.sock, reply, [process.pidfd, listener])
        finally:
            os.close(listener)  # the monitor's copy is the one ZeroMQ adopts
        self.children[process.pidfd] = process
        self.poller.register(process.pidfd, select.POLLIN)
        if spec.deferred:
            self.spares[process.pid] = process, spec
        return True

    def _resume(self, pid: int, payload: bytes, nfds: int) -> None:
        """Give the spare `pid` the rest of its spec (the module docstring), once."""
        spare, spec = self.spares.pop(pid, (None, None))
        if spare is None or spec is None:
            raise Refused(f"launcher: pid {pid} is no spare waiting for its spec")
        try:
            rest = json.loads(payload)
            whole = _checked_spec(spec.completed(rest))
        except (ValueError, TypeError, AttributeError):
            raise Refused(
                f"device {spec.name}: a spare's rest is not an object of {', '.join(DEFERRED)}"
            ) from None
        if nfds:
            raise Refused(f"device {spec.name}: a spare has its fds already")
        resume_child(spare, spec, whole)

    def _report_end(self, pidfd: int) -> None:
        self.poller.unregister(pidfd)
        process = self.children.pop(pidfd)
        self.spares.pop(process.pid, None)
        status = process.wait(0)
        process.close()
        _send(self.sock, {"op": "exited", "pid": process.pid, "status": status})

    def _read_chunks(self, size: int) -> bytes:
        """The `size` bytes of spec that follow a request's header."""
        data = b""
        while len(data) < size:
            if not readable(self.sock.fileno(), CHUNK_TIMEOUT_S):
                raise Refused(f"launcher: the spec stopped at {len(data)} of {size} bytes")
            chunk, fds, cut = _receive(self.sock, CHUNK)
            _close_all(fds)
            if cut or fds or not chunk or len(data) + len(chunk) > size:
                raise Refused(f"launcher: the spec's chunks do not make {size} bytes")
            data += chunk
        return data


def _decode_header(data: bytes) -> tuple[int, int, int | None]:
    """A request's (id, size of what follows, the spare's pid for a resume request)."""
    try:
        msg = json.loads(data)
    except ValueError:
        raise Refused("launcher: a request is not JSON") from None
    keys = {"spawn": {"op", "id", "size"}, "resume": {"op", "id", "size", "pid"}}
    if not isinstance(msg, dict) or keys.get(str(msg.get("op"))) != set(msg):
        raise Refused("launcher: a request is not a spawn or resume request")
    request, size, pid = msg["id"], msg["size"], msg.get("pid")
    if type(request) is not int or type(size) is not int or not 0 < size <= MAX_SPEC:
        raise Refused(f"launcher: a request's spec must be 1 to {MAX_SPEC} bytes")
    if msg["op"] == "resume" and type(pid) is not int:
        raise Refused("launcher: a resume request's pid is not an int")
    return request, size, pid


def _decode_spec(data: bytes) -> DeviceSpec:
    try:
        spec = DeviceSpec.from_json(data.decode())
    except (ValueError, TypeError):  # not JSON, or not the spec's keys
        raise Refused("launcher: the request holds no device spec") from None
    spec = _checked_spec(spec)
    if spec.deferred and any(getattr(spec, key) is not None for key in DEFERRED):
        raise Refused(f"device {spec.name[:63]!r}: a spare's spec has no {', '.join(DEFERRED)}")
    return spec


def _checked_spec(spec: DeviceSpec) -> DeviceSpec:
    """`spec`, if each of its fields has its type and its fault is one."""
    types: dict[str, type] = {"name": str, "model": str, "channel": str, "fds": dict}
    types |= {"options": dict, "seccomp": str, "hook": str, "deferred": bool}
    for key, kind in types.items():
        if type(getattr(spec, key)) is not kind:
            raise Refused(f"launcher: the spec's {key} is not a {kind.__name__}")
    for key in ("state", "resume", "fault", "transport"):
        if getattr(spec, key) is not None and type(getattr(spec, key)) is not dict:
            raise Refused(f"launcher: the spec's {key} is not an object")
    if spec.fault is not None:
        try:
            faults.decode(spec.fault, f"device {spec.name[:63]!r}: fault", ProtocolError)
        except ProtocolError as e:
            raise Refused(str(e)) from None
    return spec


def _check_spec(spec: DeviceSpec, channel_dir: str, nfds: int) -> None:
    """Only a known model, enforcing, without a hook, on its own channel, with its fds."""
    name = spec.name
    if not name or "/" in name or "\0" in name or len(name) > 63:
        raise Refused(f"launcher: device name {name[:63]!r} is not a plain file name")
    model = MODELS.get(spec.model)
    if model is None:
        raise Refused(f"device {name}: unknown model {spec.model[:63]!r}")
    if spec.seccomp != "kill" or spec.hook:
        raise Refused(
            f"device {name}: the launcher starts devices with seccomp 'kill' and no hook "
            "(audits and tests start theirs with start_device)"
        )
    if spec.channel != f"ipc://{channel_dir}/{name}.sock":
        raise Refused(f"device {name}: its channel must be {name}.sock in {channel_dir}")
    roles = {role.name for role in model.fds}
    if set(spec.fds) != roles or nfds != len(roles):
        raise Refused(
            f"device {name}: model {model.name} takes fds {sorted(roles)}, the request "
            f"names {sorted(spec.fds)[:MAX_FDS]} and carries {nfds}"
        )
