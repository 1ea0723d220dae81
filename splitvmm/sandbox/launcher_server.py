"""The launcher process's side of sandbox/launcher.py (its docstring says what it does and
why): imported only in the forked launcher, after the fork, so that `up` forks it (and it
starts the zygote) before the monitor has imported what only the launcher needs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING

from splitvmm.errors import DeviceFailure, ProtocolError, clip
from splitvmm.native import confine
from splitvmm.protocol import faults, schema
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import (
    DEFERRED,
    HOST_IDS,
    MAX_DEVICES,
    MAX_SPEC,
    NAME_RE,
    RUNTIME_DIR_NAMES,
    DeviceSpec,
    another_user,
)
from splitvmm.record import replace
from splitvmm.sandbox.launcher import (
    CHUNK,
    CHUNK_TIMEOUT_S,
    MAX_MESSAGE,
    ORPHAN_WAIT_S,
    STOP_TIMEOUT_S,
)
from splitvmm.sandbox.launcher_start import MAX_FDS, close_all, receive, send
from splitvmm.sandbox.relay import READ_SIZE, StderrRelay
from splitvmm.sandbox.spawn import (
    REAP_TIMEOUT_S,
    ChildProcess,
    in_dir,
    listen_path,
    readable,
    resume_child,
    spawn_child,
)
from splitvmm.sandbox.zygote import Zygote, device_env

if TYPE_CHECKING:
    from splitvmm.stderrlog import StderrLines


class Refused(Exception):
    """A request the launcher does not carry out; str() says why, naming the device."""


def serve(sock: socket.socket, zygote: Zygote, stderr: int | None = None) -> None:
    """The launcher's loop (sandbox/launcher_start.py _launcher_main set the process up).
    `stderr`: a non-blocking description of our own of fd 2's terminal or pipe, if one was
    made (stderrlog.py StderrLines: own)."""
    _Server(sock, zygote, stderr).serve()


class _Server:
    def __init__(self, sock: socket.socket, zygote: Zygote, stderr: int | None = None) -> None:
        self.sock = sock
        self._own_stderr = stderr
        # None while it rests (a rest request: the monitor expects no spawn for now); the
        # next spawn starts a new one (_live_zygote).
        self.zygote: Zygote | None = zygote
        if zygote is not None:  # (a test's server may have none)
            zygote.hangup_fd = sock.fileno()
        self.channel_dir: str | None = None  # set by the first configure request
        # That dir, open: every socket is made, linked and removed in it through this fd, not
        # by its path, which a compromised monitor may have emptied and removed (its Landlock
        # domain lets it), and another `up` of the same name made anew, with its own sockets
        self.channel_dir_fd: int | None = None
        # The host (uid, gid) the VM's devices run as, from that request (None: ours)
        self.device_user: tuple[int, int] | None = None
        self._configured = False  # a configure request came (the first is the only one)
        self.children: dict[int, ChildProcess] = {}  # pidfd -> the device
        self.spares: dict[int, tuple[ChildProcess, DeviceSpec]] = {}  # pid -> spare, its spec
        # Every device name a socket was made for in the runtime dir (they stay there: a
        # restart's process binds the same ones): at most MAX_DEVICES, so that a monitor
        # cannot fill the runtime dir's file system with sockets under new names.
        self._names: set[str] = set()
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        # SIGCHLD wakes the loop: orphans of our devices are ours to reap (the docstring).
        # Orphans a device's end report waited for, or gave up on (_outlive_orphans).
        self._attributed: set[int] = set()
        self._sigchld_r, sigchld_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(sigchld_w, warn_on_full_buffer=False)
        self.poller.register(self._sigchld_r, select.POLLIN)
        self.relays: dict[int, StderrRelay] = {}  # the read end of a device's stderr pipe
        self._stderr_lines: StderrLines | None = None  # made for the first line (_stderr)
        self.models: list[str] = []  # the VM's device models (configure), for each zygote

    def serve(self) -> None:
        """Requests and ends of devices, until the monitor closes its end."""
        try:
            while True:
                for fd, _ in self.poller.poll():
                    if fd == self._sigchld_r:
                        self._reap_orphans()
                    elif fd in self.relays:
                        self._relay(fd)
                    elif fd != self.sock.fileno():
                        self._report_end(fd)
                    elif not self._serve_request():
                        return
        except (BrokenPipeError, ConnectionResetError):
            return  # the monitor is gone: nobody to tell (its devices end below)
        finally:
            self._end_all()

    def _end_all(self) -> None:
        """Kill every device and the zygote; wait for the devices together, within one
        STOP_TIMEOUT_S (the monitor gives us as long before it kills us)."""
        for process in self.children.values():
            process.kill()
        self._end_zygote()
        self._relay_what_is_there()  # before a device stuck in I/O takes the whole wait
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.children.values():
            with contextlib.suppress(TimeoutError):
                process.wait(max(0.0, deadline - time.monotonic()))
        self._relay_what_is_there()
        if self._stderr_lines is not None:
            self._stderr_lines.close()  # says what it dropped, if it can

    def _relay_what_is_there(self) -> None:
        """The devices' last words (a traceback): what their pipes hold now."""
        for fd in list(self.relays):
            while fd in self.relays and readable(fd, 0):
                self._relay(fd)

    def _relay(self, fd: int) -> None:
        """What a device wrote to its stderr, named and escaped (sandbox/relay.py), to ours;
        at EOF (the device and its warden are gone) the pipe is closed."""
        relay = self.relays[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        lines = relay.feed(data) if data else relay.end()
        if lines:
            self._stderr().write(lines)
        if not data:
            self.poller.unregister(fd)
            del self.relays[fd]
            os.close(fd)

    def _say(self, what: str) -> None:
        """One line of ours on the operator's stderr."""
        self._stderr().write([f"splitvmm: launcher: {what}"])

    def _stderr(self) -> StderrLines:
        """The operator's stderr (fd 2: sys.stderr is the monitor's object, which may write to
        an fd _keep_only_fds closed), which we never wait for (splitvmm/stderrlog.py: we
        would serve no request meanwhile). Made for the first line: its imports (logging,
        ~5 ms) would come before the first device's spawn."""
        if self._stderr_lines is None:
            from splitvmm.stderrlog import StderrLines

            self._stderr_lines = StderrLines(2, "launcher", own=self._own_stderr)
        return self._stderr_lines

    def _spawn(self, spec: DeviceSpec) -> tuple[ChildProcess, int]:
        """spawn_child by the zygote; once more by a new zygote if that one had died (its
        death may not have been seen before the request went out) -- not if it was silent
        too long: a second wait would take the monitor's whole patience."""
        # Its fd 2 (relay.py): blocking, as a terminal is (a traceback written while we are
        # busy elsewhere waits for room, never fails with EAGAIN); our end is not.
        relay_r, relay_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(relay_r, False)
        try:
            zygote = self._live_zygote(spec.name)
            try:
                spawned = spawn_child(spec, stderr=relay_w, zygote=zygote, dir_fd=self._dir_fd())
            except DeviceFailure:
                if not zygote.ended() or zygote.timed_out or self._monitor_left():
                    raise  # the device's own failure, a zygote that never answered, or nobody waits
                zygote = self._live_zygote(spec.name)
                spawned = spawn_child(spec, stderr=relay_w, zygote=zygote, dir_fd=self._dir_fd())
        except BaseException:
            os.close(relay_r)
            raise
        finally:
            os.close(relay_w)  # the device's copy is the one left: EOF once it is gone
        self.relays[relay_r] = StderrRelay(spec.name)
        self.poller.register(relay_r, select.POLLIN)
        return spawned

    def _load_models(self, models: list[str]) -> None:
        """The VM's models, which each zygote imports before its first fork: every device of
        the VM then shares the same pages. Imported at each model's first fork instead, a
        later model's import wrote the zygote's heap between the forks, and the devices
        forked before and after it shared less (bench/memory.py, 5 devices: +1.3 MiB)."""
        self.models = models
        if self.zygote is not None:
            self.zygote.load(models)

    def _live_zygote(self, name: str) -> Zygote:
        """The zygote, or a new one if it rests or has ended (killed, crashed, or killed by
        us after it failed a fork): otherwise every restart that follows would fail too.
        DeviceFailure naming device `name` if none can be started."""
        if self.zygote is not None and self.zygote.ended():
            status = self.zygote.process.returncode
            self._say(f"the zygote ended ({status}); starting a new one")
            self._end_zygote()
        if self.zygote is None:
            try:
                self.zygote = Zygote.start(device_env())
            except OSError as e:  # EAGAIN: a limit on processes (a cgroup's pids.max)
                raise DeviceFailure(
                    f"device {name}: no zygote could be started to fork it: {e}"
                ) from None
            self.zygote.hangup_fd = self.sock.fileno()
            self.zygote.load(self.models)
        return self.zygote

    def _monitor_hangup(self) -> int:
        """How the monitor's end stands, from poll(2): 0 while it may send requests;
        POLLRDHUP once it shut its sending side (Launcher abandon), and POLLHUP or POLLERR
        with it once it closed the socket."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        events = 0
        for _, each in poller.poll(0):
            events |= each
        return events

    def _monitor_left(self) -> bool:
        """Whether the monitor closed its end or shut its sending side (nobody waits for us)."""
        return self._monitor_hangup() != 0

    def _monitor_only_reads(self) -> bool:
        """Whether the monitor shut its sending side only (Launcher abandon), and reads still."""
        events = self._monitor_hangup()
        return bool(events & select.POLLRDHUP) and not events & (select.POLLHUP | select.POLLERR)

    def _end_zygote(self) -> None:
        """End the zygote (it holds nothing to save), if there is one."""
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None

    def _reap_orphans(self) -> set[int]:
        """Reap every ended child that is neither a device (reaped by _report_end, whose
        status goes to the monitor) nor the zygote: a device's PID-namespace init, whose
        warden died first, is reparented to us (we are a subreaper). The orphans that still
        run."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._sigchld_r, 256):
                pass
        ours = {process.pid for process in self.children.values()}
        if self.zygote is not None:
            ours.add(self.zygote.process.pid)
        running = set()
        for pid in _children() - ours:
            try:
                ended, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if not ended:
                running.add(pid)
        return running

    def _serve_request(self) -> bool:
        """One request, and its one reply; False once the monitor has closed its end."""
        data, fds, cut = receive(self.sock, MAX_MESSAGE)
        if not data and not fds:
            if not self._monitor_only_reads():
                return False
            # The monitor shut only its sending side (a stop gave up its request: Launcher
            # abandon): no request comes any more, but it still reads the ends of the devices
            # its teardown kills. Served until it closes the socket (POLLHUP).
            self.poller.modify(self.sock, 0)
            return True
        request = 0
        try:
            try:
                op, request, size, spare, models, device_user = _decode_header(data)
            except Refused:
                if _claims_configure(data):
                    self._configured = True  # the first configure decides, refused or not
                raise
            again = op == "configure" and self._configured
            if op == "configure":
                self._configured = True  # the first configure decides, refused or not
            payload = self._read_chunks(size)  # read whole even to be refused
            if cut:
                raise Refused(f"launcher: a request over {MAX_MESSAGE} bytes or {MAX_FDS} fds")
            if op == "configure":
                if again:
                    raise Refused("launcher: the runtime dir was set already")
                self._configure(payload, len(fds), _device_user(device_user))
                self._load_models(models)
                send(self.sock, {"op": "configured", "id": request})
                return True
            if op == "rest":
                # The monitor expects no spawn for now: the zygote's memory (~5 MiB of its
                # own, bench/memory.py) goes back; a later spawn starts a new one (~100 ms of
                # imports, on the way to that device only).
                if fds:
                    raise Refused("launcher: a rest request carries no fds")
                self._end_zygote()
                send(self.sock, {"op": "rested", "id": request})
                return True
            if spare is not None:
                self._resume(spare, payload, len(fds))
                send(self.sock, {"op": "resumed", "id": request})
                return True
            if self.channel_dir is None:
                raise Refused("launcher: no runtime dir yet (configure comes first)")
            spec = _decode_spec(payload)
            _check_spec(spec, self.channel_dir, len(fds), self.device_user)
            _check_fds(spec.name, fds)
            if self._monitor_left():
                # A request queued before the monitor shut its sending side (a stop gave up
                # the spawns a restore sent ahead: Launcher abandon): nobody wants its device.
                # Handed to the zygote, its wait ended at the hang-up, which killed it, and the
                # next spawn said "the zygote ended (-9); starting a new one" after the stop.
                raise Refused(f"device {spec.name}: the monitor gave its request up")
            if len(self.children) >= MAX_DEVICES:
                raise Refused(f"device {spec.name}: {MAX_DEVICES} devices run already")
            if spec.name not in self._names and len(self._names) >= MAX_DEVICES:
                raise Refused(
                    f"device {spec.name}: sockets for {MAX_DEVICES} device names were made "
                    "already, the most a VM has"
                )
            self._names.add(spec.name)
            process, listener = self._spawn(
                replace(spec, fds=dict(zip(spec.fds, fds, strict=True)))
            )
        except (Refused, DeviceFailure, OSError) as e:
            # clipped: a refusal may quote what the request held (its fd roles), and a reply
            # is at most MAX_MESSAGE bytes (one past the socket's buffer fails: EMSGSIZE)
            send(self.sock, {"op": "refused", "id": request, "message": clip(str(e))})
            return True
        finally:
            close_all(fds)  # the device has its own copies now
        try:
            reply = {"op": "spawned", "id": request, "pid": process.pid}
            send(self.sock, reply, [process.pidfd, listener])
        except (BrokenPipeError, ConnectionResetError):
            raise  # the monitor is gone: serve() ends, and the device with us
        except OSError as e:
            # Its fds did not go (ETOOMANYREFS: our user's fds in flight, host-wide, over our
            # RLIMIT_NOFILE -- any process of that user can cause it, another VM's monitor
            # too): a device nobody holds, ended and refused as a spawn that failed.
            self._abandon(process, spec)
            message = f"device {spec.name}: its channel and pidfd could not be sent: {e}"
            send(self.sock, {"op": "refused", "id": request, "message": clip(message)})
            return True
        finally:
            os.close(listener)  # the monitor's copy is the one it accepts on
        self.children[process.pidfd] = process
        self.poller.register(process.pidfd, select.POLLIN)
        if spec.deferred:
            self.spares[process.pid] = process, spec
        return True

    def _abandon(self, process: ChildProcess, spec: DeviceSpec) -> None:
        """End a device the monitor was never told of (no exit report follows), and its
        socket, as spawn_child leaves nothing when a start fails."""
        process.kill()
        with contextlib.suppress(TimeoutError):  # left then to _reap_orphans
            process.wait(REAP_TIMEOUT_S)
        process.close()
        with contextlib.suppress(FileNotFoundError):  # the monitor may remove it (its dir)
            os.unlink(in_dir(listen_path(spec), self._dir_fd()))

    def _dir_fd(self) -> int:
        """The runtime dir's fd (a spawn comes only once it was configured)."""
        assert self.channel_dir_fd is not None, "a spawn before the runtime dir was set"
        return self.channel_dir_fd

    def _configure(self, payload: bytes, nfds: int, device_user: tuple[int, int] | None) -> None:
        """The runtime dir (the first configure's): an absolute path to a directory (not a
        symlink) of ours that nobody else may enter, as the monitor makes it
        (monitor/rundir.py), kept open (channel_dir_fd). Where the devices run as another
        user (`device_user`), they may search it (0711), in a parent of ours nobody else
        may."""
        try:
            path = payload.decode()
        except UnicodeDecodeError:
            raise Refused("launcher: the runtime dir is not UTF-8") from None
        if nfds or not os.path.isabs(path) or "\0" in path:
            raise Refused(f"launcher: {clip(path)!r} is no absolute path")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise Refused(f"launcher: {clip(path)!r} is no runtime dir: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            elsewhere = another_user(device_user)
            if st.st_uid != os.geteuid() or st.st_mode & (0o066 if elsewhere else 0o077):
                raise Refused(f"launcher: {clip(path)!r} is not ours alone (owner, mode 0700)")
            if elsewhere and not _ours_alone(os.path.dirname(path)):
                raise Refused(
                    f"launcher: {clip(path)!r} may be searched by the devices' user, but its "
                    "parent is not ours alone (owner, mode 0700)"
                )
        except BaseException:
            os.close(fd)
            raise
        self.device_user = device_user
        self.channel_dir, self.channel_dir_fd = path, fd
        if not elsewhere:  # kept for devices of another user (launcher_start.py): none here
            confine.drop_only(confine.FOR_ANOTHER_USER)
            if self.zygote is not None:  # started before this: it holds them too
                self.zygote.own_user()

    def _resume(self, pid: int, payload: bytes, nfds: int) -> None:
        """Give the spare `pid` the rest of its spec (the module docstring), once."""
        spare, spec = self.spares.pop(pid, (None, None))
        if spare is None or spec is None:
            raise Refused(f"launcher: pid {pid} is no spare waiting for its spec")
        try:
            rest = schema.loads(payload, what="a spare's rest", error=ProtocolError)
            whole = _checked_spec(spec.completed(rest))
        except (ProtocolError, ValueError, TypeError, AttributeError):
            raise Refused(
                f"device {spec.name}: a spare's rest is not an object of {', '.join(DEFERRED)}"
            ) from None
        if nfds:
            raise Refused(f"device {spec.name}: a spare has its fds already")
        resume_child(spare, spec, whole, dir_fd=self._dir_fd())

    def _report_end(self, pidfd: int) -> None:
        self.poller.unregister(pidfd)
        process = self.children.pop(pidfd)
        self.spares.pop(process.pid, None)
        status = process.wait(0)
        process.close()
        lingering = self._outlive_orphans()
        send(self.sock, {"op": "exited", "pid": process.pid, "status": status,
                         "lingering": lingering})  # fmt: skip

    def _outlive_orphans(self) -> bool:
        """Wait, at most ORPHAN_WAIT_S, for the orphan the warden just reaped leaves; whether
        any orphan still runs then (the report says so, and the monitor restarts no device
        with a disk image). Orphans are not matched to their wardens, so any that still runs
        counts: the one this device left may be among those an earlier report gave up on. A
        device's warden is our child and the device proper its child: when the warden dies,
        the device is reparented to us before the warden's pidfd wakes us, and dies by its
        parent-death SIGKILL -- once out of the system call it is in: a write to its disk
        image, which in uninterruptible sleep may last. "exited" is the monitor's leave to
        start a replacement on the same image, so it waits until the old writer is gone.
        Orphans an earlier report waited for (or gave up on) are not this device's: a stuck
        one delays no other device's report."""
        running = self._reap_orphans()
        fresh = running - self._attributed
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while fresh:
            left = deadline - time.monotonic()
            if left <= 0:
                self._say(
                    f"pids {sorted(fresh)} still run {ORPHAN_WAIT_S:g} s after their "
                    "device's warden ended; reporting its end anyway"
                )
                break
            waiting = select.poll()
            pidfds = []
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):  # reaped meanwhile: no wait
                    pidfds.append(os.pidfd_open(pid))
                    waiting.register(pidfds[-1], select.POLLIN)
            waiting.poll(max(1, round(left * 1000)))
            close_all(pidfds)
            running = self._reap_orphans()
            fresh &= running
        self._attributed = (self._attributed & running) | fresh  # fresh: running still
        return bool(self._attributed)

    def _read_chunks(self, size: int) -> bytes:
        """The `size` bytes of spec that follow a request's header, within CHUNK_TIMEOUT_S
        in all (not per chunk: one byte a chunk would hold the launcher, which reaps and
        reports nothing meanwhile, for hours)."""
        data = bytearray()
        deadline = time.monotonic() + CHUNK_TIMEOUT_S
        while len(data) < size:
            if not readable(self.sock.fileno(), max(0.0, deadline - time.monotonic())):
                raise Refused(f"launcher: the spec stopped at {len(data)} of {size} bytes")
            chunk, fds, cut = receive(self.sock, CHUNK)
            close_all(fds)
            if cut or fds or not chunk or len(data) + len(chunk) > size:
                raise Refused(f"launcher: the spec's chunks do not make {size} bytes")
            data += chunk
        return bytes(data)


def _decode_header(data: bytes) -> tuple[str, int, int, int | None, list[str], object]:
    """A request's (op, id, size of what follows, the spare's pid for a resume request, the
    VM's models and its devices' user for a configure request: the user checked with the
    request's id known, by _device_user)."""
    try:
        msg = schema.loads(data, what="a request", error=ProtocolError)
    except ProtocolError:
        raise Refused("launcher: a request is not JSON") from None
    keys = {
        "spawn": {"op", "id", "size"},
        "resume": {"op", "id", "size", "pid"},
        "configure": {"op", "id", "size", "models", "device_user"},
        "rest": {"op", "id", "size"},
    }
    if not isinstance(msg, dict) or keys.get(str(msg.get("op"))) != set(msg):
        raise Refused("launcher: a request is not a configure, spawn, resume or rest request")
    request, size, pid = msg["id"], msg["size"], msg.get("pid")
    if type(request) is not int or type(size) is not int:
        raise Refused("launcher: a request's id and size are not ints")
    if msg["op"] == "rest" and size != 0:
        raise Refused("launcher: a rest request carries nothing")
    if msg["op"] != "rest" and not 0 < size <= MAX_SPEC:
        raise Refused(f"launcher: a request's spec must be 1 to {MAX_SPEC} bytes")
    if msg["op"] == "resume" and type(pid) is not int:
        raise Refused("launcher: a resume request's pid is not an int")
    models = msg.get("models", [])
    if not isinstance(models, list) or not all(type(m) is str and m in MODELS for m in models):
        raise Refused(f"launcher: a configure request's models must be among {sorted(MODELS)}")
    return msg["op"], request, size, pid, sorted(set(models)), msg.get("device_user")


def _claims_configure(data: bytes) -> bool:
    """Whether a request _decode_header refused says it is a configure request."""
    try:
        msg = schema.loads(data, what="a request", error=ProtocolError)
    except ProtocolError:
        return False
    return isinstance(msg, dict) and msg.get("op") == "configure"


def _device_user(value: object) -> tuple[int, int] | None:
    """A configure request's device_user: the host [uid, gid] the VM's devices run as
    (config.py vm.device_uid), or None (ours)."""
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(type(v) is int and v in HOST_IDS for v in value)
    ):
        raise Refused("launcher: a configure request's device_user is not [uid, gid], neither 0")
    user = (value[0], value[1])
    if another_user(user) and os.geteuid() != 0:
        raise Refused("launcher: only a launcher run as root starts devices as another user")
    return user


def _children() -> set[int]:
    """Our children's pids (we are single-threaded: our task's children are all of them); none
    where the kernel has no CONFIG_PROC_CHILDREN: orphans then wait as zombies for our end
    (a device's restarts bound them), which is better than a launcher that fails."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(field) for field in f.read().split()}
    except OSError:
        return set()


def _decode_spec(data: bytes) -> DeviceSpec:
    try:
        spec = DeviceSpec.from_json(data.decode())
    except (ProtocolError, ValueError, TypeError):  # not JSON (or too deep), not the keys
        raise Refused("launcher: the request holds no device spec") from None
    spec = _checked_spec(spec)
    if spec.deferred and any(getattr(spec, key) is not None for key in DEFERRED):
        raise Refused(f"device {spec.name[:63]!r}: a spare's spec has no {', '.join(DEFERRED)}")
    return spec


def _checked_spec(spec: DeviceSpec) -> DeviceSpec:
    """`spec`, if each of its fields has its type and its fault is one."""
    if (problem := spec.field_problem()) is not None:
        raise Refused(f"launcher: the spec's {problem}")
    if spec.fault is not None:
        try:
            faults.decode(spec.fault, f"device {spec.name[:63]!r}: fault", ProtocolError)
        except ProtocolError as e:
            raise Refused(str(e)) from None
    return spec


def _check_fds(name: str, fds: list[int]) -> None:
    """Every fd that reaches a device is open for reading or writing. The monitor may open
    any path with O_PATH or with access mode 3 (O_WRONLY|O_RDWR: ioctls only), neither of
    which Landlock checks, and a device may reopen an fd it was given through /proc/self/fd
    before its sandbox (devprocs/output.py, for an output of its own), where the monitor's
    Landlock is not. No device role uses either."""
    for fd in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_PATH or flags & os.O_ACCMODE == os.O_ACCMODE:
            raise Refused(
                f"device {name}: an fd it was sent is an O_PATH or ioctl-only one, not a file "
                "open for reading or writing"
            )


def _ours_alone(path: str) -> bool:
    """Whether `path` is a directory of ours (not a symlink) that nobody else may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _check_spec(
    spec: DeviceSpec, channel_dir: str, nfds: int, device_user: tuple[int, int] | None = None
) -> None:
    """Only a known model, enforcing, without a hook, on its own channel, with its fds, as
    the configured user (`device_user`)."""
    name = spec.name
    if not NAME_RE.fullmatch(name):  # the config's rule: what its sockets are named after
        raise Refused(f"launcher: device name {name[:63]!r} is not a plain file name")
    if name in RUNTIME_DIR_NAMES:  # the config's too: its socket would be the monitor's
        raise Refused(f"launcher: device name {name!r} is reserved ({name}.sock is the VM's)")
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
    if spec.user != device_user:
        raise Refused(
            f"device {name}: it would run as {spec.user}, the VM's devices as {device_user} "
            "(uid, gid)"
        )
    roles = {role.name for role in model.fds}
    if set(spec.fds) != roles or nfds != len(roles):
        raise Refused(
            f"device {name}: model {model.name} takes fds {sorted(roles)}, the request "
            f"names {sorted(spec.fds)[:MAX_FDS]} and carries {nfds}"
        )
