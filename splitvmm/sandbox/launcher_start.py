"""The launcher's first moments: its fork from `splitvmm`, and the launcher itself up to the
exec of its zygote (what the launcher is and does: sandbox/launcher.py).

Why a module of its own. The zygote's imports are the longest path to a VM's first device
(bench/startup.py), and everything imported before its exec lies on that path twice over: in
`splitvmm` before the fork, and in the launcher before the exec. So this module imports the
standard library's basics, errors and sandbox/zygote.py (the zygote's command and handle),
and the launcher then native/confine (prctl wrappers), and nothing else: no msgspec, no
protocol module, no launcher client (tests/integration/test_startup_imports.py). What the
launcher serves requests with (sandbox/launcher_server.py) it imports once its zygote is
ready or the first request comes, whichever is first; the monitor's handle
(sandbox/launcher.py Launcher) wraps the socket and pid that fork() returns. The protocol's
message framing (send, receive), which both sides use, is here too.
"""

from __future__ import annotations

import array
import fcntl
import gc
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Iterable, Sequence

from splitvmm.errors import SplitvmmError
from splitvmm.sandbox.zygote import MAX_DEVICE_FDS

MAX_FDS = MAX_DEVICE_FDS  # a request carries one device's fds (sandbox/zygote.py)
# The signals that stop the VM (Machine._install_stop_handlers); a launcher forked after the
# monitor's handlers were installed takes each at its default: they are not its to act on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class LauncherError(SplitvmmError):
    """The launcher is gone or broke its protocol; no device can be started any more."""


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fork() -> tuple[socket.socket, int]:
    """Fork the launcher: (our end of its socket, its pid). Call it first, single-threaded (a
    fork in a threaded process is unsafe, gh-100228). The launcher says "ready" on the socket
    once it is set up; this does not wait for it."""
    if thread_count() != 1:
        raise LauncherError("the launcher must be started before any thread exists")
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours, theirs = (_fd_above_stdio(s) for s in pair)
    monitor = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        gc.freeze()  # what we inherited is never collected: no finalizer closes an fd we reuse
        gc.enable()  # the monitor may hold it off while it imports (cli/early.py)
        try:
            code = _launcher_main(theirs.detach(), monitor)
        except BaseException:
            import traceback  # here: nothing before the zygote's exec may wait for it

            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return ours, pid


def _launcher_main(sock_fd: int, monitor: int) -> int:
    """The forked launcher, from its first instruction to its exit status. The zygote starts
    before this process imports what it serves requests with (sandbox/launcher_server.py)."""
    from splitvmm.native import confine
    from splitvmm.sandbox.zygote import Zygote, device_env

    os.setsid()  # the terminal's signals are the monitor's
    confine.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != monitor:  # the monitor died before prctl took effect
        return 1
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # a monitor's (machine.py), forked after its build began: not ours
    _keep_only_fds(sock_fd)
    confine.set_no_new_privs()
    stderr = _own_stderr()  # while we may still open it
    try:
        _narrow_capabilities()
    except LauncherError as e:  # one line, not a traceback
        os.write(2, f"splitvmm: launcher: {e}\n".encode(errors="replace"))
        return 1
    confine.set_child_subreaper()  # before the zygote: its grandchildren are ours
    zygote = Zygote.start(device_env())
    sock = socket.socket(fileno=sock_fd)
    try:
        send(sock, {"op": "ready"})
    except (BrokenPipeError, ConnectionResetError):
        zygote.close()
        return 0  # the monitor is gone already (a start that failed early): nobody to serve
    # What it serves requests with (~15-30 ms of imports) waits for the first request or for
    # the zygote's "ready", whichever comes first: until then the two cores this is built for
    # are the monitor's imports' and the zygote's. A zygote done importing leaves its core to
    # ours while the monitor still imports; waiting for the first request (the monitor's
    # configure, once its imports are done) put ours on the way to the first device.
    waiting = select.poll()  # not select(): the socket may be on an fd above 1023
    waiting.register(sock, select.POLLIN)
    waiting.register(zygote.fileno(), select.POLLIN)
    waiting.poll()
    from splitvmm.sandbox import launcher_server

    launcher_server.serve(sock, zygote, stderr)
    return 0


def _own_stderr() -> int | None:
    """A non-blocking description of our own of the terminal or pipe behind stderr, for our
    lines and those we relay from the devices, which must never wait for it (stderrlog.py).
    Opened here, before a root launcher gives up CAP_DAC_OVERRIDE: the terminal of a user
    who ran `sudo splitvmm up` in it (0620, theirs) is one it could not open anew later, and
    its lines then waited on the description it shares with the operator's shell. None for
    a regular file or a socket (written without one), no stderr, or one we cannot open."""
    from splitvmm.native import files

    try:
        return files.nonblocking_description(2)
    except OSError:  # no stderr (2>&-)
        return None


def _narrow_capabilities() -> None:
    """Give up what neither the launcher nor its zygote nor a device before its sandbox needs
    (sandbox/launcher.py): a user's every capability, root's all but CAP_SETFCAP, CAP_SETUID,
    CAP_SETGID and CAP_KILL.
    LauncherError, saying why, if that fails or leaves the zygote unable to start."""
    from splitvmm.native import confine

    try:
        if os.geteuid() != 0:
            # A user's capabilities (CAP_NET_ADMIN for its TAPs, which the monitor opens
            # itself) stayed here for the VM's life, and went on to every zygote (ambient
            # ones, or the interpreter's file capabilities): none needs any. The bounding set:
            # no_new_privs makes it moot, and emptying it needs CAP_SETPCAP.
            confine.drop_capabilities(bounding=False)
            return
        # Root's every capability stayed here, in the zygote and in each device until its
        # sandbox, for the VM's life. A device needs CAP_SETFCAP: to write uid 0 into its
        # user namespace's uid_map (and CAP_SYS_ADMIN to make that namespace, on a host
        # that lets nothing else make one). One that runs as another user (vm.device_uid,
        # which a VM's config says after this fork) needs CAP_SETUID and CAP_SETGID to
        # become it, and we CAP_KILL to end it at our close (sandbox/device.py _become); we
        # and the zygote started below give those three up once the VM has said it has no
        # such device (launcher_server.py _configure, Zygote.own_user).
        # The zygote, exec'd as root, gets the bounding set, and under no_new_privs no more
        # than we hold.
        keep = {confine.CAP_SETFCAP, *confine.FOR_ANOTHER_USER}
        if userns_needs_sys_admin():
            keep.add(confine.CAP_SYS_ADMIN)
        confine.keep_only_capabilities(frozenset(keep))
    except OSError as e:
        raise LauncherError(f"cannot give up its capabilities: {e}") from None
    # Without CAP_DAC_READ_SEARCH root reads by the modes, as anyone: a checkout or an
    # interpreter in another user's private home (sudo from it) would fail the zygote's exec
    # or its imports, and then every device, each with a traceback.
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path, mode in ((sys.executable, os.X_OK), (package, os.R_OK | os.X_OK)):
        if not os.access(path, mode, effective_ids=True):
            raise LauncherError(
                f"{path} cannot be read without CAP_DAC_READ_SEARCH, which a root launcher "
                "gives up: run splitvmm from where root may read it by its modes"
            )


# Sysctls of distribution kernels under which only CAP_SYS_ADMIN may make a user namespace
# (a device's first step, sandbox/device.py), with the value that says so: Debian's patch
# (0: unprivileged ones refused), Ubuntu's AppArmor (1: they lose every capability in it).
USERNS_RESTRICTED = (
    ("kernel/unprivileged_userns_clone", "0"),
    ("kernel/apparmor_restrict_unprivileged_userns", "1"),
)


def userns_needs_sys_admin(proc_sys: str = "/proc/sys") -> bool:
    """Whether this host makes a user namespace only for CAP_SYS_ADMIN (USERNS_RESTRICTED)."""
    for name, restricted in USERNS_RESTRICTED:
        try:
            with open(os.path.join(proc_sys, name)) as f:
                if f.read().strip() == restricted:
                    return True
        except OSError:  # a mainline kernel has neither
            continue
    return False


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


def _fd_above_stdio(sock: socket.socket) -> socket.socket:
    """The socket on an fd above 2: with stdin closed, a socketpair may get fd 0, which the
    console (and the launcher's /dev/null) will claim."""
    if sock.fileno() > 2:
        return sock
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
    sock.close()
    return socket.socket(fileno=fd)


# -- messages ---------------------------------------------------------------------------------
def send(sock: socket.socket, msg: dict[str, object] | bytes, fds: Sequence[int] = ()) -> None:
    data = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    socket.send_fds(sock, [data], list(fds))


def receive(sock: socket.socket, size: int) -> tuple[bytes, list[int], bool]:
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


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
