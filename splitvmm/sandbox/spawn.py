"""start_device: the one way a device process is started, and the process handle around it.

A device starts one of two ways, with the same result: its spec on stdin, exactly the
spec's fds, its own session, stdout /dev/null, then devprocs/runtime.py run().
- fork_device: the launcher (for the monitor: sandbox/launcher.py) has its zygote fork
  it from a pre-imported interpreter (sandbox/zygote.py): no interpreter start, no
  imports, pages shared with its siblings.
- start_device: exec'd from scratch, for `splitvmm policy audit` and the test
  harnesses, which need a tracing filter, a test hook or a rogue command.
Neither forks a bare copy of the caller.

A DeviceProcess is what its owner holds of a started device: its pid and a pidfd
(signals through a pidfd cannot hit a recycled pid, and a pidfd polls readable when
the process ends, whoever its parent is). Its exit status comes from its parent: the
caller itself (ChildProcess) or the launcher (LaunchedProcess, sandbox/launcher.py).

A warm spare (monitor/slot.py) is started the same way, from a spec with `deferred` set:
start_device keeps its stdin open, and spawn_child makes its channel's listening socket
at spare_path() (the device's own channel path belongs to the process it may replace).
resume_child gives it the rest of its spec when it takes over: the socket gets the channel
path as a second name (a hard link: a spare still starting binds its socket into its
sandbox by the first), then the spec's DEFERRED part goes down the pipe, and the spare
goes on from there as a fresh process would (devprocs/runtime.py run()). The slot
unlinks the first name once the spare is READY.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import threading
from typing import IO

from splitvmm.errors import DeviceFailure
from splitvmm.protocol.spec import DEVICE_COMMAND, MAX_SPEC, DeviceSpec, another_user, spare_path
from splitvmm.record import replace
from splitvmm.sandbox.zygote import FIRST_FD, Zygote, device_env

REAP_TIMEOUT_S = 5.0  # a device killed before it read its spec


def start_device(
    command: tuple[str, ...], spec: DeviceSpec, stderr: int | None = None
) -> subprocess.Popen[bytes]:
    """exec a device process with its spec on stdin (not in argv, which Linux caps at 128 KiB
    an argument), one line of JSON, and exactly the spec's fds. A deferred spec's stdin stays
    open: the rest follows when the spare takes over (resume_child).

    Its fds 0 and 1 are /dev/null (0 once it has read the spec), so
    a device never reads the operator's terminal nor writes to it except through the fd
    given to it as its output (when that is stdio, a dup of our stdout above fd 2, so that
    /dev/null can take fd 1). Its fd 2 is `stderr`, or ours: the launcher gives each device
    a pipe it relays to the operator's, named and escaped (sandbox/relay.py); a test or
    `policy audit` gives its own.
    """
    spec, dups = _fds_above_stdio(spec)
    data = spec.to_json().encode() + b"\n"  # json.dumps escapes every newline of a string
    try:
        check_spec_size(spec.name, data)
        proc = subprocess.Popen(
            list(command),
            pass_fds=tuple(spec.fds.values()),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
            env=device_env(),
            # Its own session: a Ctrl-C or a signal to our process group must not kill the
            # device before the monitor has synced it; the monitor decides when it ends
            # (and PR_SET_PDEATHSIG ends it if its parent dies).
            start_new_session=True,
        )
    finally:
        for fd in dups:
            os.close(fd)
    try:
        _write_stdin(proc.stdin, data, close=not spec.deferred)
    except BrokenPipeError:
        proc.kill()
        proc.wait()
        raise DeviceFailure(f"device {spec.name}: exited before reading its spec") from None
    return proc


def fork_device(zygote: Zygote, spec: DeviceSpec, stderr: int = 2) -> ChildProcess:
    """What start_device does, by the zygote's fork: the spec's fds become fds 3, 4, ... of
    the device, and the spec it reads says so; `stderr` its fd 2. The device is our child
    (sandbox/zygote.py)."""
    fds = {role: number for number, role in enumerate(spec.fds, FIRST_FD)}
    data = replace(spec, fds=fds).to_json().encode() + b"\n"
    check_spec_size(spec.name, data)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdin = os.fdopen(stdin_w, "wb")
    try:
        pid = zygote.fork(spec.model, stdin_r, stderr, list(spec.fds.values()))
    except OSError as e:
        stdin.close()
        raise DeviceFailure(f"device {spec.name}: the zygote failed: {e}") from None
    finally:
        os.close(stdin_r)
    process = ChildProcess(pid, stdin)
    try:
        process.write_stdin(data, close=not spec.deferred)
    except BrokenPipeError:
        process.kill()
        try:
            process.wait(REAP_TIMEOUT_S)
        finally:
            process.close()
        raise DeviceFailure(f"device {spec.name}: exited before reading its spec") from None
    return process


def _write_stdin(stdin: IO[bytes] | None, data: bytes, close: bool) -> None:
    """Write to a device's stdin; BrokenPipeError if it has ended. Closed if `close`
    (EOF ends its spec), even when the write failed."""
    assert stdin is not None
    try:
        stdin.write(data)
        stdin.flush()
    finally:
        if close:
            with contextlib.suppress(BrokenPipeError):  # what flush said already
                stdin.close()


def check_spec_size(name: str, data: bytes) -> None:
    """DeviceFailure if a device could not read this spec (protocol/spec.py MAX_SPEC)."""
    if len(data) > MAX_SPEC:
        raise DeviceFailure(
            f"device {name}: its spec and saved state take {len(data)} bytes, "
            f"over the {MAX_SPEC} a device reads"
        )


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


def listen_channel(path: str, others: bool = False, dir_fd: int | None = None) -> socket.socket:
    """A device channel's listening UNIX socket, 0600 (inside the 0700 runtime dir), made
    before the device starts: the device connects once, and a refused connection is fatal
    to it. The monitor's end of the channel accepts on it (monitor/zmtp.py ZmtpLink).
    `others`: 0602, for a device that runs as another user (a connect takes write
    permission); the runtime dir is then 0711, in a root that stays 0700 (monitor/rundir.py),
    so only the devices, which enter the dir as root before they switch, reach it.
    `dir_fd`: the runtime dir, open; the socket is made in it by `path`'s file name (in_dir)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o175 if others else 0o177)
    try:
        sock.bind(in_dir(path, dir_fd))
        sock.listen(1)  # one peer: the device
    except OSError as e:  # a runtime dir with no room (ENOSPC, EDQUOT): the refusal names it
        sock.close()
        raise DeviceFailure(f"cannot make the device channel {path}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    return sock


def how_ended(status: int) -> str:
    """A DeviceProcess's exit status (returncode) in words: a negative one is a signal's."""
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


class DeviceProcess(abc.ABC):
    """A started device process: signalled and watched through its pidfd, which it owns."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None  # as os.waitstatus_to_exitcode: -N for signal N
        self._reaping = threading.Lock()  # the supervisor and a tear-down may both wait

    def ended(self, within_s: float = 0) -> bool:
        """Whether it has exited (its pidfd polls readable), waiting at most `within_s`,
        without reaping it."""
        return self.pidfd >= 0 and readable(self.pidfd, within_s)

    def poll(self) -> int | None:
        """Its exit status if it has exited, else None."""
        return self.wait(0) if self.returncode is not None or self.ended() else None

    def wait(self, timeout_s: float) -> int:
        """Its exit status; TimeoutError if it runs on for `timeout_s`; DeviceFailure if it
        was closed before its status was known (a wait that failed first: the launcher gone),
        as the supervisor, on its own copy of the pidfd, may still ask how it ended."""
        if self.returncode is None and self.pidfd < 0:
            raise DeviceFailure(f"process {self.pid} was closed before its status was known")
        if self.returncode is None and not readable(self.pidfd, timeout_s):
            raise TimeoutError(f"process {self.pid} still runs after {timeout_s:g} s")
        with self._reaping:
            if self.returncode is None:
                self.returncode = self._reap()
        return self.returncode

    def lingered(self) -> bool:
        """Whether, once reaped, a device proper was still running (a system call that does
        not end: I/O on a stalled disk): a process started in its place must not share a
        disk image with it. Only the launcher waits for the device proper and says so
        (LaunchedProcess); a process exec'd here (tests, `policy audit`) says False."""
        return False

    def kill(self) -> None:
        """SIGKILL through the pidfd; reaping is left to whoever waits (a vCPU thread may kill
        a device, and may not wait for it: policies/<arch>/vcpu.policy)."""
        if self.returncode is None and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended already: only its status is left to collect

    def send_signal(self, signum: int) -> None:
        """`signum` through the pidfd (ctl crash-device: the monitor's policy allows only
        the signals it lists)."""
        if self.returncode is None and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass  # it ended already

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    @abc.abstractmethod
    def _reap(self) -> int:
        """The status of the process, which has exited (its pidfd is readable)."""


class ChildProcess(DeviceProcess):
    """A device process that is our own child: exec'd (start_device: `popen`) or forked by
    our zygote and reparented to us (fork_device). `stdin`: the pipe to its stdin, while a
    spare waits for the rest of its spec."""

    def __init__(
        self, pid: int, stdin: IO[bytes] | None, popen: subprocess.Popen[bytes] | None = None
    ) -> None:
        super().__init__(pid, os.pidfd_open(pid))
        self.stdin = stdin
        self.popen = popen

    @classmethod
    def started(cls, popen: subprocess.Popen[bytes]) -> ChildProcess:
        return cls(popen.pid, popen.stdin, popen)

    def write_stdin(self, data: bytes, close: bool) -> None:
        """BrokenPipeError if it has ended; closed if `close`, even when the write failed."""
        _write_stdin(self.stdin, data, close)
        if close:
            self.stdin = None

    def _reap(self) -> int:
        if self.popen is not None:
            return self.popen.wait()
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.stdin is not None:  # a spare that never took over
            self.stdin.close()
            self.stdin = None
        super().close()


def readable(fd: int, timeout_s: float, wake: int | None = None) -> bool:
    """Whether `fd` polls readable within `timeout_s` (poll(2): what the confined monitor and
    its vCPU threads may call); False at once if `wake` polls readable first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if wake is not None:
        poller.register(wake, select.POLLIN)
    events = poller.poll(max(0, round(timeout_s * 1000)))
    return any(ready == fd for ready, _ in events)


def in_dir(path: str, dir_fd: int | None) -> str:
    """`path`, or with `dir_fd` its file name in that open directory, through /proc/self/fd:
    the directory the fd holds even once its path names another (bind(2) takes no dir fd).
    A directory removed since takes no new name (ENOENT)."""
    return path if dir_fd is None else f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"


def listen_path(spec: DeviceSpec) -> str:
    """Where spawn_child listens for the spec's device: its channel, or a warm spare's own
    name beside it."""
    return spare_path(spec.channel) if spec.deferred else spec.channel.removeprefix("ipc://")


def spawn_child(
    spec: DeviceSpec,
    command: tuple[str, ...] = DEVICE_COMMAND,
    stderr: int | None = None,
    *,
    zygote: Zygote | None = None,
    dir_fd: int | None = None,
) -> tuple[ChildProcess, int]:
    """Listen on the spec's channel, then start the device as our child: the process, and
    the channel's listening socket (an fd the caller owns). What the launcher does for the
    monitor (forked by its `zygote`, in its runtime dir's `dir_fd`), and what tests do for
    themselves (exec'd, perhaps a rogue `command`). A warm spare's socket is made at
    spare_path() (the module docstring)."""
    path = listen_path(spec)
    listener = listen_channel(path, others=another_user(spec.user), dir_fd=dir_fd)
    try:
        if zygote is not None:
            process = fork_device(zygote, spec, 2 if stderr is None else stderr)
        else:
            process = ChildProcess.started(start_device(command, spec, stderr))
    except BaseException:
        listener.close()
        with contextlib.suppress(FileNotFoundError):  # the monitor may remove it (its dir)
            os.unlink(in_dir(path, dir_fd))
        raise
    return process, listener.detach()


def resume_child(
    process: ChildProcess, spec: DeviceSpec, rest: DeviceSpec, dir_fd: int | None = None
) -> None:
    """Hand the warm spare `process`, started from the deferred `spec`, the rest of its spec:
    its socket gets the channel path as a second name (the module docstring), then `rest`'s
    DEFERRED part goes down its stdin. DeviceFailure if the spare has ended meanwhile (the
    caller starts a process cold instead); nothing is left at the channel path then."""
    channel = spec.channel.removeprefix("ipc://")
    path = in_dir(channel, dir_fd)
    data = json.dumps(rest.rest()).encode()
    check_spec_size(spec.name, data)
    try:
        os.link(in_dir(spare_path(spec.channel), dir_fd), path)
    except OSError as e:  # said with the channel's own path, not the one through /proc
        raise DeviceFailure(
            f"device {spec.name}: its spare's socket cannot take the name {channel}: "
            f"{e.strerror or e}"
        ) from None
    try:
        process.write_stdin(data, close=True)
    except BrokenPipeError:
        with contextlib.suppress(FileNotFoundError):  # the monitor may remove it (its dir)
            os.unlink(path)
        raise DeviceFailure(
            f"device {spec.name}: its spare (pid {process.pid}) ended before it took over"
        ) from None
