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
    monitor -> launcher  configure {id, size,        then `size` bytes: the runtime dir,
                         models, device_user}        once, before any spawn; the VM's
                                                     models, and the [uid, gid] its
                                                     devices run as (or null: ours)
    launcher -> monitor  configured {id} | refused {id, message}
    monitor -> launcher  spawn {id, size} + fds      then `size` bytes of spec JSON,
                                                     in chunks (a message must fit
                                                     the socket's send buffer)
    launcher -> monitor  spawned {id, pid} + pidfd and the channel's listening socket
                         refused {id, message}       one of the two for each spawn
    monitor -> launcher  resume {id, pid, size}      then `size` bytes of JSON: the rest
                                                     of a warm spare's spec (below)
    launcher -> monitor  resumed {id} | refused {id, message}
    monitor -> launcher  rest {id, size: 0}          no spawn is expected for now: the
                                                     zygote ends, and a new one starts
                                                     with the next spawn
    launcher -> monitor  rested {id}
                         exited {pid, status,        for each device it started (it
                                 lingering}          is their parent and reaps them);
                                                     lingering: an orphan still ran

Why it starts before the monitor knows its VM. `up` forks it first thing, while the
monitor has imported little and has one thread (sandbox/launcher_start.py), and it execs
the zygote at once (sandbox/zygote.py): the zygote imports what every device runs on, on the
second core while the monitor imports its own modules and reads the config. The runtime
dir comes after, in the first request (configure), which the monitor sends before it is
confined, without waiting for the reply (the next request takes it); it is fixed from
then on. The launcher imports what it serves requests with once its zygote is ready, or
when that request comes if it comes first.

What a compromised monitor can ask of it, and no more:
- start a device process, forked by its zygote from a pristine pre-imported
  interpreter that runs `splitvmm.devprocs` for it (never a command from the
  request), for a model of protocol.models.MODELS, holding exactly the fds the
  request carries, one per role of that model;
- with seccomp "kill" and no test hook: `splitvmm policy audit` and the test
  harnesses, which need a tracing filter or a hook, call start_device themselves;
- listen on that device's channel, `<runtime dir>/<name>.sock`: the runtime
  dir is fixed by the first configure request (a second one is refused) and the
  name is a plain file name, so it makes no other file;
- tell the exit status of the devices it started. Signals go through the
  pidfd the monitor holds: the launcher kills no device on request;
- end its zygote (rest): the next spawn then waits for a new one's imports;
- give a warm spare it started (a deferred spec: protocol/spec.py, monitor/slot.py) the
  rest of its spec, once: its socket, `<name>.sock.spare`, gets its channel's path as a
  second name (sandbox/spawn.py resume_child), and the rest goes down its stdin, checked
  as a spawn's spec is.
A request is at most MAX_SPEC bytes of spec and MAX_FDS fds, none of them an O_PATH one; at
most MAX_DEVICES (protocol/spec.py) devices live at once, spares included, and sockets are made for at most
MAX_DEVICES device names (each a config's: protocol/spec.py NAME_RE).

Its own confinement: no launcher may be landlocked or filtered (every device inherits both
before entering its own sandbox, which unshares and mounts), so the narrow request above is
the barrier; but before its zygote starts it gives up every capability that neither it, nor
the zygote, nor a device before its sandbox needs, and they hold no more. A root launcher
keeps CAP_SETFCAP, effective, permitted and in its bounding set: a device writes uid 0
into its user namespace's uid_map (Linux 5.12+), which fails without it even holding every
other capability. It keeps CAP_SETUID, CAP_SETGID and CAP_KILL for devices that run as
another user (config.py vm.device_uid: each becomes it before its namespaces, and is
ended by us or the monitor); it needs none for the rest (the monitor opens every device's
files and TAPs; the runtime dir, its sockets, the zygote and the devices are root's by uid,
but for such a device, whose channel socket it may connect to; rlimits only go down). uid 0
still owns root's files (and CAP_SETFCAP may give them file
capabilities), so this takes the kernel's powers away (mounts, modules, ptrace, raw I/O,
other users' files), not those files. Without
CAP_DAC_READ_SEARCH root reads by the modes as anyone: a checkout or interpreter in another
user's private home fails the start, saying so in one line. On a host that lets only
CAP_SYS_ADMIN make user namespaces (Debian's kernel.unprivileged_userns_clone=0, Ubuntu's
kernel.apparmor_restrict_unprivileged_userns=1: launcher_start.py USERNS_RESTRICTED) it
keeps CAP_SYS_ADMIN too, or no device could make its sandbox. Any other
launcher drops every capability it was given (a user's CAP_NET_ADMIN: the monitor opens its
TAPs itself, and a device maps a uid other than 0 without one). It has no_new_privs, its own
session (the terminal's Ctrl-C is the monitor's to handle), PR_SET_PDEATHSIG on the monitor,
and ends when the monitor's end of the socket closes, killing the devices it
started (each would die with it anyway: PR_SET_PDEATHSIG). It holds the socket,
/dev/null as stdin and stdout, and the operator's stderr, which devices inherit; then
its zygote's socket (while it has a zygote), its SIGCHLD wake-up pipe, a pidfd per device
and a spare's stdin pipe until the spare takes over (all close-on-exec: the zygote gets
none). It is a child subreaper (the zygote's double fork makes each device its child), so
it also reaps whatever else of its descendants is orphaned -- a device's PID-namespace
init, once its warden has died -- on SIGCHLD.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from splitvmm.errors import DeviceFailure, clip
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.record import Struct
from splitvmm.sandbox import launcher_start
from splitvmm.sandbox.launcher_start import LauncherError, close_all, receive, send
from splitvmm.sandbox.spawn import DeviceProcess, check_spec_size, readable

if TYPE_CHECKING:
    from pathlib import Path

T = TypeVar("T")

MAX_MESSAGE = 4096  # a request header or a reply; the spec comes in chunks after its header
CHUNK = 64 << 10  # a SOCK_SEQPACKET message must fit the socket's send buffer (~208 KiB)
CHUNK_TIMEOUT_S = 5.0  # the rest of a request, once its header came
READY_TIMEOUT_S = 10.0  # a fork, its imports and the zygote's exec
REPLY_TIMEOUT_S = 60.0  # a spawn may wait for a new zygote's imports (a loaded host)
SEND_TIMEOUT_S = 10.0  # a launcher that stops reading has failed
STOP_TIMEOUT_S = 5.0  # the launcher ends at once when the monitor closes its socket
ORPHAN_WAIT_S = 5.0  # a device outliving its warden (a system call to finish): then reported


class _Reply(Struct, frozen=True):
    """A message from the launcher, checked (see _REPLIES)."""

    op: str
    id: int = 0
    pid: int = 0
    status: int = 0
    lingering: bool = False
    message: str = ""
    fds: tuple[int, ...] = ()


# What each message from the launcher carries besides its op: keys with their types, fds.
_REPLIES: dict[str, tuple[dict[str, type], int]] = {
    "ready": ({}, 0),
    "spawned": ({"id": int, "pid": int}, 2),  # the pidfd, the channel's listening socket
    "refused": ({"id": int, "message": str}, 0),
    "resumed": ({"id": int}, 0),
    "configured": ({"id": int}, 0),
    "rested": ({"id": int}, 0),
    # lingering: an orphan (this device proper, or one an earlier report gave up on) still
    # ran ORPHAN_WAIT_S after the warden ended
    "exited": ({"pid": int, "status": int, "lingering": bool}, 0),
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
        """The handle on a launcher that launcher_start.fork() started: its socket and pid."""
        sock.settimeout(SEND_TIMEOUT_S)
        self._sock = sock
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)  # now: a confined monitor may not open one
        self._cond = threading.Condition()
        # One request sent at a time, its reply awaited (or filed, for a spawn sent ahead)
        self._spawn_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending = 0  # the id of the spawn awaiting its reply
        self._reading = False  # one thread receives; the others wait for what it files
        self._ready = False
        self._reply: _Reply | None = None  # to the spawn in progress
        # Spawns sent ahead (send_spawn) whose replies nobody awaited yet, and those replies
        # once filed, by request id, until take_spawn() takes each
        self._ahead: set[int] = set()
        self._answers: dict[int, _Reply] = {}
        # A configure sent whose reply nobody took yet: the next request takes it first.
        self._unanswered = False
        # pid -> (status, whether an orphan still ran at the report), until its waiter takes it
        self._exits: dict[int, tuple[int, bool]] = {}
        self._running: set[int] = set()  # pids spawned whose end was not reported yet
        self._broken: str | None = None
        # Why no request can be sent any more (a request cut off: _send), while replies and
        # exit reports are still read: the devices it started still end, and are reaped.
        self._unsendable: str | None = None
        # abandon(): why a request's wait ends unanswered (the VM is stopping); its eventfd
        # wakes the thread that waits for the reply in poll.
        self._abandoned: str | None = None
        self._abandon_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._shut = False  # our sending side, once abandoned and receiving (_await)

    @classmethod
    def start(cls, channel_dir: Path | None = None) -> Launcher:
        """Fork the launcher; the devices' channels will be in `channel_dir` (or the one
        given to configure() later). Call it first, single-threaded (a fork in a threaded
        process is unsafe, gh-100228)."""
        launcher = cls(*launcher_start.fork())
        # Not waiting for its ready here: `up` goes on importing while it sets up (the first
        # request waits for it).
        if channel_dir is not None:
            launcher.configure(channel_dir)
        return launcher

    def configure(
        self,
        channel_dir: Path,
        models: Sequence[str] = (),
        device_user: tuple[int, int] | None = None,
    ) -> None:
        """Fix the runtime dir where the devices' channels are made (once), the host (uid,
        gid) every device of the VM runs as (`device_user`: config.py vm.device_uid; None:
        ours), and say which device `models` the VM has: its zygotes import those before their first fork
        (sandbox/zygote.py), and no other. This sends the
        request and returns: its reply is taken by the next request, which fails with the
        launcher's words (DeviceFailure) if it was refused. The launcher imports what it
        serves requests with (~15-30 ms: sandbox/launcher_start.py) once its zygote is ready
        or this first request comes, whichever is first, and the monitor goes on building the
        VM meanwhile (a restore: its RAM too)."""
        with self._spawn_lock:
            self._take_unanswered()
            header: dict[str, object] = {
                "op": "configure",
                "models": sorted(set(models)),
                "device_user": None if device_user is None else list(device_user),
            }
            self._send(header, str(channel_dir).encode(), [])
            self._unanswered = True

    def check_configured(self) -> None:
        """Take the reply to configure if no request took it yet: DeviceFailure with the
        launcher's words if it was refused (a VM without devices sends no other request)."""
        with self._spawn_lock:
            self._take_unanswered()

    def fileno(self) -> int:
        """The socket's fd: the one the confined monitor may send to and receive from."""
        return self._sock.fileno()

    def exited(self) -> bool:
        """Whether the launcher process has ended (its devices end with it: each warden's
        parent-death signal)."""
        return self._pidfd >= 0 and readable(self._pidfd, 0)

    def spawn(self, spec: DeviceSpec) -> tuple[LaunchedProcess, int]:
        """Start a device: its process, and its channel's listening socket (an fd we own).
        DeviceFailure naming the device if the launcher refused it. A deferred spec starts
        a warm spare, which waits for resume()."""
        return self._launched(self._request(*_spawn_request(spec)))

    def send_spawn(self, spec: DeviceSpec) -> int:
        """Ask for a device as spawn() does, without waiting for the reply: the request's id,
        for take_spawn(). A machine asks for several devices this way and goes on building
        the VM while the launcher starts them (monitor/machine.py); the launcher answers its
        requests in order, and each reply is filed by its id until taken."""
        request = _spawn_request(spec)
        with self._spawn_lock:
            self._take_unanswered()
            self._send(*request)
            self._ahead.add(self._pending)
            return self._pending

    def take_spawn(
        self, request: int, *, given_up: bool = False, timeout_s: float = REPLY_TIMEOUT_S
    ) -> tuple[LaunchedProcess, int]:
        """What spawn() returns, for the request send_spawn() sent: DeviceFailure with the
        launcher's words if it refused, LauncherError if it broke or the VM is stopping.
        With `given_up` (a teardown's), taken even once abandon() gave it up: the launcher
        answers at once then (our sending side shut: _await), and whoever takes the device
        ends it before its channel's listening socket closes -- closed first, the device on
        its way up said "the monitor closed the channel"."""
        reply = self._await(
            lambda: self._answers.pop(request, None), timeout_s, request=not given_up
        )
        return self._launched(_accepted(reply))

    def _launched(self, reply: _Reply) -> tuple[LaunchedProcess, int]:
        """A spawned reply's device process and its channel's listening socket."""
        pidfd, listener = reply.fds
        return LaunchedProcess(self, reply.pid, pidfd), listener

    def resume(self, process: DeviceProcess, spec: DeviceSpec) -> None:
        """Give the warm spare `process` the rest of its spec (the DEFERRED part of `spec`):
        it takes over from there. DeviceFailure if the launcher refused (the spare ended)."""
        data = json.dumps(spec.rest()).encode()
        check_spec_size(spec.name, data)
        self._request({"op": "resume", "pid": process.pid}, data, [])

    def rest(self) -> None:
        """No spawn is expected for now (a VM's devices and their spares have started): the
        launcher ends its zygote, whose memory goes back (~5 MiB of its own: bench/memory.py),
        and starts a new one for the next spawn, which then waits for its imports."""
        self._request({"op": "rest"}, b"", [])

    def abandon(self, reason: str) -> None:
        """The VM is stopping: a request waiting for its reply ends now with LauncherError
        (`reason`), and none is sent any more. A spawn may wait long for it (a new zygote's
        imports on a loaded host, or a zygote that hangs: up to REPLY_TIMEOUT_S), and a stop
        must not. Exit reports are still read: the devices end and are reaped as before, and
        the launcher ends when close() closes its socket, whatever its zygote is doing
        (launcher_server.py). Safe from any thread and from a signal handler."""
        with self._cond:  # close() closes the eventfd under it: a signal may come after
            if self._abandoned is not None:
                return
            self._abandoned = reason
            self._cond.notify_all()
            os.eventfd_write(self._abandon_fd, 1)

    def _request(self, header: dict[str, object], data: bytes, fds: list[int]) -> _Reply:
        """Send a request (`header`, then `data` in chunks) and take its reply; DeviceFailure
        with the launcher's words if it refused."""
        with self._spawn_lock:
            self._take_unanswered()
            self._send(header, data, fds)
            return _accepted(self._await(self._take_reply, REPLY_TIMEOUT_S, request=True))

    def _send(self, header: dict[str, object], data: bytes, fds: list[int]) -> None:
        """Send a request, once the launcher is ready (the spawn lock held)."""
        if not self._ready:
            try:
                self._await(lambda: self._ready or None, READY_TIMEOUT_S, request=True)
            except LauncherError as e:
                if self._abandoned is not None:
                    raise
                raise LauncherError(f"the launcher did not start: {e}") from None
        if why := self._broken or self._unsendable or self._abandoned:
            raise LauncherError(why)
        self._pending = next(self._ids)
        header = {**header, "id": self._pending, "size": len(data)}
        try:
            send(self._sock, header, fds)
        except OSError as e:
            if e.errno == errno.ETOOMANYREFS:
                # Nothing went (a SOCK_SEQPACKET message goes whole or not at all): our
                # user's fds in flight over UNIX sockets, host-wide, are over our
                # RLIMIT_NOFILE, which any process of that user (another VM's monitor) can
                # make so for a while, and a confined monitor holds no CAP_SYS_RESOURCE to
                # pass anyway. This request fails as a refused one does; the next may pass.
                raise DeviceFailure(
                    f"the launcher was not sent the request: {e.strerror}"
                ) from None
            self._cut_off(e)
        try:
            for i in range(0, len(data), CHUNK):
                send(self._sock, data[i : i + CHUNK])
        except OSError as e:
            self._cut_off(e)

    def _cut_off(self, e: OSError) -> NoReturn:
        """For good: a request cut off (a send timed out after its header or some of its
        chunks) leaves the launcher reading the next request's bytes as this one's."""
        self._unsendable = f"the launcher takes no request: {e}"
        raise LauncherError(self._unsendable) from None

    def _take_unanswered(self) -> None:
        """Take the reply to a configure sent earlier, if any (the spawn lock held)."""
        if self._unanswered:
            reply = self._await(self._take_reply, REPLY_TIMEOUT_S, request=True)
            self._unanswered = False
            _accepted(reply)

    def wait_exit(self, pid: int, timeout_s: float) -> tuple[int, bool]:
        """The exit status of a device it started, which has ended (or is about to), and
        whether a device proper still ran when it was reported (ORPHAN_WAIT_S)."""
        return self._await(lambda: self._exits.pop(pid, None), timeout_s)

    def _take_reply(self) -> _Reply | None:
        reply, self._reply = self._reply, None
        return reply

    def _await(self, take: Callable[[], T | None], timeout_s: float, request: bool = False) -> T:
        """What `take` finds among the messages filed so far, receiving more (one thread at
        a time) until it does; LauncherError if the launcher is gone, broken or silent --
        for good: a reply that comes late would answer the wrong request -- or, for a
        `request`'s reply, once abandon() gave it up."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (found := take()) is None:
                left = deadline - time.monotonic()
                if left <= 0 and not self._broken:
                    self._broken = f"the launcher did not answer within {timeout_s:g} s"
                if self._broken:
                    raise LauncherError(self._broken)
                if request and self._abandoned is not None:
                    raise LauncherError(self._abandoned)
                if self._reading:
                    self._cond.wait(left)
                    continue
                if self._abandoned is not None and not self._shut:
                    # The launcher may be waiting for its zygote for a request given up (a
                    # spawn), and reports no device's end meanwhile: our sending side shut
                    # ends that wait (launcher_server.py), and it goes on reporting. Here, on
                    # a thread that receives, not in abandon(): a vCPU's filter has neither.
                    self._shut = True
                    with contextlib.suppress(OSError):  # closed: close()
                        self._sock.shutdown(socket.SHUT_WR)
                self._reading = True
                self._cond.release()
                try:
                    # A request's wait also ends at abandon(); an exit report's does not, but
                    # goes on once our sending side is shut (above).
                    wake = self._abandon_fd if request or not self._shut else None
                    received = self._receive(left, wake)
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if received is not None:
                    self._file(*received)
            return found

    def _receive(self, timeout_s: float, wake: int | None) -> tuple[bytes, list[int]] | None:
        """One message within `timeout_s`, or None (and why it broke in `_broken`); None too
        as soon as `wake` polls readable."""
        try:
            if not readable(self._sock.fileno(), timeout_s, wake):
                return None
            data, fds, cut = receive(self._sock, MAX_MESSAGE)
        except OSError as e:
            self._broken = f"the launcher's socket failed: {e}"
            return None
        if cut or not data:
            close_all(fds)
            self._broken = "the launcher sent too much" if cut else "the launcher has exited"
            return None
        return data, fds

    def _file(self, data: bytes, fds: list[int]) -> None:
        """Sort one message from the launcher (the lock held)."""
        try:
            reply = _decode_reply(data, fds)
        except ValueError as e:
            close_all(fds)
            self._broken = f"the launcher broke its protocol: {e}"
            return
        if reply.op == "ready":
            self._ready = True
        elif reply.op != "exited" and reply.id in self._ahead:
            # A spawn sent ahead: kept for its take_spawn(), given up at a stop or not (a
            # teardown takes it; one nobody takes is closed once the launcher has ended)
            self._ahead.discard(reply.id)
            if reply.op == "spawned":
                self._running.add(reply.pid)
            self._answers[reply.id] = reply
        elif self._abandoned is not None and reply.id == self._pending and reply.op != "exited":
            close_all(fds)  # the reply to a request given up at the stop (abandon)
            if reply.op == "spawned":  # a device nobody takes: the launcher ends it at close
                self._running.add(reply.pid)
        elif reply.op == "exited":
            if reply.pid not in self._running:
                self._broken = f"the launcher reported the end of pid {reply.pid}, not ours"
            self._running.discard(reply.pid)
            self._exits[reply.pid] = reply.status, reply.lingering
        elif reply.id != self._pending or not (self._spawn_lock.locked() or self._unanswered):
            close_all(fds)
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
        with self._cond:  # a stop signal in the teardown abandons nothing now
            self._abandoned = self._abandoned or "the launcher is closed"
            os.close(self._abandon_fd)
            untaken, self._answers = list(self._answers.values()), {}
        if not readable(self._pidfd, STOP_TIMEOUT_S):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        for reply in untaken:  # spawns sent ahead that nobody took: now that their devices
            close_all(list(reply.fds))  # ended with the launcher, their sockets may close
        os.close(self._pidfd)
        self._pidfd = -1


def _spawn_request(spec: DeviceSpec) -> tuple[dict[str, object], bytes, list[int]]:
    """The spawn request for `spec`, spawn()'s and send_spawn()'s: (header, data, fds);
    DeviceFailure, nothing sent, if a device could not read a spec that large."""
    data = spec.to_json().encode()
    check_spec_size(spec.name, data)
    return {"op": "spawn"}, data, list(spec.fds.values())


def _accepted(reply: _Reply) -> _Reply:
    """The reply to a request, or DeviceFailure with the launcher's words if it refused."""
    if reply.op == "refused":
        raise DeviceFailure(clip(reply.message))
    return reply


class LaunchedProcess(DeviceProcess):
    """A device process the launcher started: it reaps it and tells us its status."""

    def __init__(self, launcher: Launcher, pid: int, pidfd: int) -> None:
        super().__init__(pid, pidfd)
        self._launcher = launcher
        self._lingered = False

    def _reap(self) -> int:
        status, self._lingered = self._launcher.wait_exit(self.pid, REPLY_TIMEOUT_S)
        return status

    def lingered(self) -> bool:
        return self._lingered
