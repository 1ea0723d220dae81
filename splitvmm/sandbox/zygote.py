"""The zygote: a pre-imported interpreter that forks device processes for the launcher.

Why. A device exec'd from scratch spends ~110 of its ~120 ms to READY starting an
interpreter and importing its modules (devprocs/runtime.py run()), and each holds
its own ~20 MiB copy of them. The zygote starts with the VM, as early as `up` can
start it (the launcher execs it while the monitor still imports), imports what every
device runs on, freezes what it imported (gc.freeze: a collection in a child never
writes to those pages, so they stay shared) and then forks one child per device. The
models' own modules it imports as the launcher names the VM's (before its first fork, so
that every device of the VM shares the same pages) and freezes them too: a VM pays for the
models it has, not every one (a serial VM's start-up ~1-3 ms less on the zygote's way to
its first device, and ~0.9 MiB less resident: bench/startup.py, bench/memory.py).

Its life. Once a VM's devices and their warm spares have started and no restart came for a
while (monitor/machine.py ZYGOTE_IDLE_S), the monitor lets the launcher end it (the rest
request, sandbox/launcher.py): an idle zygote held ~5 MiB of its own for the VM's whole life
(bench/memory.py). The next spawn -- a new spare after a restart took the old one, or a cold
restart -- starts a new zygote and waits for its imports (~100 ms, as the first spawn of a
VM does), and the launcher serves nothing else meanwhile; the monitor lets it rest again
after the next idle period, so a burst of crashes is served by one zygote.

Why a process of its own and not the launcher. The launcher reads every device's
spec, saved state included; a child forked from it would inherit those bytes (the
heap keeps what was freed). The zygote reads nothing but fork requests of a few
bytes and never sees a spec: the child's spec goes down a pipe from the launcher
straight into the child, as for an exec'd device (sandbox/spawn.py). So a device
starts with what an exec'd one has -- the interpreter, the modules, its fds, its
spec on stdin -- plus the zygote's few request bytes.

The launcher stays every device's parent. The zygote double-forks: the child
forks the device and exits at once, so the device, an orphan, is reparented to
the nearest subreaper among its ancestors, the launcher (PR_SET_CHILD_SUBREAPER,
set before it starts the zygote). The zygote reaps the short-lived child before
it answers, so by then the device is the launcher's to wait on; the device sets
its parent-death signal only after its spec came, i.e. after the answer, and
checks that its parent is the launcher (devprocs/runtime.py run()).

Over a SOCK_SEQPACKET socketpair with the launcher:

    zygote -> launcher   ready                          once, after its imports
    launcher -> zygote   load MODEL...                  the VM's models, no reply
    launcher -> zygote   own-user                       the VM's devices are of our user:
                                                        give up what another's needs, no reply
    launcher -> zygote   fork MODEL + fds [stdin, stderr, fd 3, fd 4, ...]
    zygote -> launcher   {"pid": N} | {"error": "..."}  one of the two per fork

MODEL is a device model (protocol/models.py), checked by the launcher (the VM's, from the
monitor's configure request; a device's, with its spec). The zygote imports the VM's models
as it is told them, before its first fork, so that all its devices share the same pages; a
fork imports its own model if that was not among them (and refuses a name it has no model
of).

In the device the first fd becomes stdin, the second fd 2 (the launcher's pipe that relays
a device's stderr to the operator's: sandbox/relay.py) and the others fds 3, 4, ... in the
order sent (the launcher renumbers the spec's fds to match: fork_device in
sandbox/spawn.py); fd 1 is /dev/null, as the zygote's is; every other fd is closed before
any device code runs.

What it costs in isolation: the devices one zygote forked share its address-space layout
(ASLR is per exec, not per fork), its stack canary and its hash seed; a device that learns
its own layout or canary learns its siblings' (those of the same zygote). Each remains a
separate process behind its own namespaces, seccomp filter and Landlock domain, which is
the boundary.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from splitvmm.errors import exit_now, system_exit_status

# How the zygote is started: this interpreter, isolated (-I, as a device: protocol/spec.py
# DEVICE_COMMAND), the device runtime imported, forking a device per request; its argument
# is its socket's fd. This module is on the launcher's path to that exec
# (sandbox/launcher_start.py): it imports no protocol module.
ZYGOTE_COMMAND = (sys.executable, "-I", "-m", "splitvmm.devprocs.zygote")
# Environment variables a device process inherits: only what the device code reads itself
# (sandbox/policy.py). Nothing else of the monitor's environment (credentials in it,
# LD_PRELOAD, PYTHONPATH...) reaches a process that parses guest data. The interpreter needs
# none: sys.executable finds its virtual environment through pyvenv.cfg, without PATH.
DEVICE_ENV = ("SPLITVMM_POLICY_DIR",)
# fds of one device: a virtio device's irqfds, ioeventfds, RAM and backend fit (the launcher
# takes no request with more: sandbox/launcher_start.py MAX_FDS)
MAX_DEVICE_FDS = 16
MAX_FDS = MAX_DEVICE_FDS + 2  # a fork request: stdin, stderr and the device's fds
FIRST_FD = 3  # a device's first fd after stdio
# Within the monitor's REPLY_TIMEOUT_S for a spawn (sandbox/launcher.py): ready + fork, and
# after a zygote that died (never one that timed out) a new one's (launcher_server.py _spawn).
READY_TIMEOUT_S = 30.0  # the zygote's imports, on a loaded host
FORK_TIMEOUT_S = 10.0  # the model's import (its first fork: ~5-20 ms) and two forks
EXIT_TIMEOUT_S = 1.0  # a zygote that closed its socket is ending
MESSAGE = 256
OWN_USER = b"own-user"


def device_env() -> dict[str, str]:
    """The environment of a device process (and of the zygote that forks them)."""
    return {k: os.environ[k] for k in DEVICE_ENV if k in os.environ}


class ZygoteError(OSError):
    """The zygote is gone, silent or broke its protocol: no device can be forked."""


class Zygote:
    """The launcher's handle on its zygote (one thread: the launcher's)."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen[bytes]) -> None:
        self._sock = sock
        self.process = process
        self._ready = False
        self._timed_out = False
        # An fd whose hang-up ends any wait for the zygote: the monitor's socket, set by the
        # launcher (launcher_server.py). A monitor that stops while a spawn waits here (the
        # zygote's imports on a loaded host, or a zygote that hangs) is not made to wait.
        self.hangup_fd: int | None = None

    @classmethod
    def start(cls, env: dict[str, str], command: Sequence[str] = ZYGOTE_COMMAND) -> Zygote:
        """exec the zygote (`command` and its socket's fd), our child; it gets ready (imports)
        while we go on."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [*command, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                env=env,
            )
        finally:
            theirs.close()
        return cls(ours, process)

    def load(self, models: Sequence[str]) -> None:
        """Have it import `models` (the VM's) before the next fork; no reply (a model it cannot
        import is the error of a fork of it). Sent while it may still be importing its own
        modules: it reads its requests in order once it is ready."""
        if not models:
            return
        try:
            self._sock.send(b"load " + " ".join(models).encode())
        except OSError:
            pass  # it has ended: the next fork says so, and the launcher starts another

    def own_user(self) -> None:
        """Tell it that the VM's devices run as our user (no vm.device_uid): it gives up the
        capabilities that only a device of another user needs (confine.FOR_ANOTHER_USER:
        CAP_SETUID, CAP_SETGID, CAP_KILL), which a root launcher kept for it, as it was
        started before the VM's config was read (sandbox/launcher_start.py). No reply; sent
        before the first fork, so read before it."""
        try:
            self._sock.send(OWN_USER)
        except OSError:
            # It has ended, or may not have read it: ended either way, so that the launcher's
            # next fork starts another, which inherits no such capability
            self.process.kill()

    def fork(self, model: str, stdin: int, stderr: int, fds: Sequence[int]) -> int:
        """A device process of `model` with `stdin` as fd 0, `stderr` as fd 2 and `fds` as
        fds 3, 4, ... (fd 1 is /dev/null, the zygote's): its pid, ours to
        reap (the module docstring). ZygoteError if the zygote failed; it is killed then (a
        reply that comes late would answer the next request), and ended() says so."""
        try:
            return self._fork(model, [stdin, stderr, *fds])
        except ZygoteError:
            self.process.kill()
            self.process.wait()
            raise

    def ended(self) -> bool:
        return self.process.poll() is not None

    def fileno(self) -> int:
        """Its socket: readable once it is ready (its "ready" waits there for fork()) or has
        ended."""
        return self._sock.fileno()

    @property
    def timed_out(self) -> bool:
        """Whether it failed by saying nothing in time (a second try would wait as long)."""
        return self._timed_out

    def _fork(self, model: str, fds: Sequence[int]) -> int:
        if not self._ready:
            self._expect(READY_TIMEOUT_S, "ready")
            self._ready = True
        try:
            socket.send_fds(self._sock, [b"fork " + model.encode()], fds)
        except OSError as e:
            raise ZygoteError(f"the zygote takes no request: {e}") from None
        reply = self._expect(FORK_TIMEOUT_S, "pid")
        pid = reply.get("pid")
        if type(pid) is not int or pid <= 1:
            raise ZygoteError(f"the zygote could not fork: {reply.get('error', reply)}")
        return pid

    def _expect(self, timeout_s: float, what: str) -> dict[str, object]:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if self.hangup_fd is not None:
            # POLLRDHUP: the monitor shut its sending side (a stop gave its request up) or
            # closed its end (POLLHUP too)
            poller.register(self.hangup_fd, select.POLLRDHUP)
        try:
            events = dict(poller.poll(round(timeout_s * 1000)))
            if self.hangup_fd in events:
                raise ZygoteError(f"the monitor left while the zygote's {what} was awaited")
            if not events:
                self._timed_out = True
                raise ZygoteError(f"the zygote sent no {what} within {timeout_s:g} s")
            data = self._sock.recv(MESSAGE)
        except ZygoteError:
            raise
        except OSError as e:
            raise ZygoteError(f"the zygote's socket failed: {e}") from None
        if not data:
            raise ZygoteError(f"the zygote exited (status {self._status()})")
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or (what == "ready") != (msg == {"op": "ready"}):
            raise ZygoteError(f"the zygote broke its protocol: {data[:100]!r}")
        return msg

    def _status(self) -> int | str:
        """Its exit status, once its socket said EOF (it may take a moment to end)."""
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "unknown: it closed its socket and runs on"

    def close(self) -> None:
        """End it and reap it: SIGKILL, as it holds nothing to save, and may be importing
        still (a VM that failed early) or forking a spare nobody waits for."""
        self._sock.close()
        self.process.kill()
        self.process.wait()


# -- the zygote's side ------------------------------------------------------------------------
DeviceMain = Callable[[int], None]  # run a device whose parent must be this pid
LoadModel = Callable[[str], object]  # import a model's module; an Exception if there is none


def serve(sock_fd: int, device_main: DeviceMain, launcher: int, load_model: LoadModel) -> int:
    """The zygote's loop, once what every device runs on is imported: fork a device per
    request, its model loaded first by `load_model`, until the launcher closes its end.
    Returns the zygote's exit status. `launcher`: our parent, read (and its death made ours,
    PR_SET_PDEATHSIG) before the imports."""
    if os.getppid() != launcher:
        return 1
    sock = socket.socket(fileno=sock_fd)
    gc.freeze()  # from here on, what the children share is never written by a collection
    try:
        _serve_requests(sock, launcher, device_main, load_model)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the launcher is gone (a VM that failed while we imported): nobody to serve
    return 0


def _serve_requests(
    sock: socket.socket, launcher: int, device_main: DeviceMain, load_model: LoadModel
) -> None:
    sock.sendall(json.dumps({"op": "ready"}).encode())
    while True:
        data, fds, flags, _ = socket.recv_fds(sock, MESSAGE, MAX_FDS)
        if not data and not fds:
            return  # the launcher has closed its end
        try:
            cut = flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
            verb, _, model = data.partition(b" ")
            if verb == b"load" and model.isascii() and not fds and not cut:
                for name in model.decode().split():
                    _loaded(load_model, name)  # a failure is the fork's of that model
                continue  # no reply
            if data == OWN_USER and not fds and not cut:
                if not _gave_up_another_users_capabilities():
                    return
                continue  # no reply
            if verb != b"fork" or not model.isascii() or cut or len(fds) < 2:
                reply: dict[str, object] = {"error": "a request is not fork MODEL with its fds"}
            elif (problem := _loaded(load_model, model.decode())) is not None:
                reply = {"error": problem}
            else:
                reply = {"pid": _fork_device(sock, fds, launcher, device_main)}
        except OSError as e:
            reply = {"error": f"fork: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(json.dumps(reply).encode())


def _gave_up_another_users_capabilities() -> bool:
    """Zygote.own_user's request: whether it was done. A zygote that cannot (capset refused:
    no known cause) says why and ends; the launcher's next fork starts another, which
    inherits none of them (it gave them up itself)."""
    from splitvmm.native import confine  # here: the launcher's path to our exec imports us

    try:
        confine.drop_only(confine.FOR_ANOTHER_USER)
    except OSError as e:
        print(f"splitvmm: zygote: cannot give up its capabilities: {e}", file=sys.stderr)
        return False
    return True


def _loaded(load_model: LoadModel, model: str) -> str | None:
    """Import `model`'s module (once: later calls find it loaded) and freeze what that made,
    as the imports before the first request were; what went wrong, or None."""
    try:
        load_model(model)
    except Exception as e:  # an unknown model, a broken install: this request's error only
        return f"model {model!r}: {e}"
    gc.freeze()
    return None


def _fork_device(sock: socket.socket, fds: list[int], launcher: int, main: DeviceMain) -> int:
    """Fork twice (the module docstring); the device's pid once its first parent is reaped."""
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:
            os.close(pid_r)
            _intermediate(sock, fds, pid_w, launcher, main)
        os.close(pid_w)
        pid_w = -1
        data = os.read(pid_r, 4)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(pid_r)
        if pid_w >= 0:
            os.close(pid_w)
    if len(data) != 4 or status != 0:
        raise OSError(f"the device's first parent failed (status {status})")
    return int.from_bytes(data, "little")


def _intermediate(
    sock: socket.socket, fds: list[int], pid_w: int, launcher: int, main: DeviceMain
) -> None:
    """The short-lived child: fork the device, tell the zygote its pid, exit."""
    code = 1
    try:
        pid = os.fork()
        if pid == 0:
            os.close(pid_w)
            _device(sock, fds, launcher, main)
        os.write(pid_w, pid.to_bytes(4, "little"))
        code = 0
    finally:
        os._exit(code)


def _device(sock: socket.socket, fds: list[int], launcher: int, main: DeviceMain) -> None:
    """The device process: its fds in place, nothing else held, then the device's main."""
    code = 1
    try:
        sock.detach()  # the fd is closed below; the object must never close a reused number
        os.setsid()  # as an exec'd device (sandbox/spawn.py start_device)
        _arrange_fds(fds)
        gc.enable()  # a zygote may hold it off (devprocs/zygote.py); a device runs for long
        main(launcher)
        code = 0
    except SystemExit as e:  # ends as an exec'd device would, by the interpreter's rules
        code = system_exit_status(e.code)
    except KeyboardInterrupt:
        code = -signal.SIGINT
    except BaseException:
        # The interpreter's own printing (C in 3.11), as an exec'd device's: the traceback
        # module stat()s each source file through linecache, and a sandboxed device's filter
        # kills on stat (SIGSYS, and no traceback); this only tries to open them (ENOENT).
        sys.__excepthook__(*sys.exc_info())
    finally:
        exit_now(code)


def _arrange_fds(fds: list[int]) -> None:
    """fds[0] becomes 0, fds[1] 2, fds[2:] 3, 4, ...; every other fd above 2 is closed."""
    top = FIRST_FD + len(fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]  # out of the way
    os.dup2(moved[0], 0)
    os.dup2(moved[1], 2)
    for number, fd in enumerate(moved[2:], FIRST_FD):
        os.dup2(fd, number)  # inheritable, as pass_fds leaves them
    os.closerange(FIRST_FD + len(fds) - 2, os.sysconf("SC_OPEN_MAX"))
