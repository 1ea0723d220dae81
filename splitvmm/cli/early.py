"""The launcher of the VM that `splitvmm up` or `splitvmm restore` will run, started before
click parses the command line (cli/__init__.py main()).

The launcher execs the zygote at once (sandbox/launcher_start.py), and the zygote's imports
are the longest path to a VM's first device: every millisecond it starts sooner comes off the
start-up (bench/startup.py). So main() guesses the subcommand from the arguments, before importing
click: the first argument that is not an option of the root command. A wrong guess costs
nothing but time: run_and_exit (cli/up.py) starts a launcher itself when none was started
here, and an unused one ends with the process (it dies with its parent).
"""

from __future__ import annotations

import gc
import os
import signal
from typing import TYPE_CHECKING

from splitvmm import timings

if TYPE_CHECKING:
    import socket

    from splitvmm.sandbox.launcher import Launcher

VM_COMMANDS = ("up", "restore")
VALUED_OPTIONS = ("--log-level",)  # the root command's options that take a value (root.py)

_forked: tuple[socket.socket, int] | None = None  # launcher_start.fork()'s socket and pid
_closed_inherited = False  # close_inherited_fds() ran: no fd past 2 is the operator's
_interrupted = False  # a SIGINT came while _hold_interrupt() held it, for take() to raise
_collector_held = False  # hold_collector() turned the cyclic garbage collector off
# Where a path names an open fd of this process (a shell's `<(make-config)` is /dev/fd/63)
FD_DIRS = ("/dev/fd", "/proc/self/fd", "/proc/thread-self/fd")


def start_launcher(args: list[str]) -> None:
    """Start the launcher if `args` run a VM; errors are left for run_and_exit to report."""
    global _forked
    if subcommand(args) not in VM_COMMANDS:
        return
    close_inherited_fds()
    hold_collector()
    # launcher_start, not the launcher's client: what is imported before the fork delays the
    # zygote twice (here and in the launcher before its exec), and the client imports msgspec.
    from splitvmm.sandbox import launcher_start

    _hold_interrupt()
    try:
        _forked = launcher_start.fork()
    except launcher_start.LauncherError:
        return  # run_and_exit tries again, and says why it failed
    timings.mark("launcher fork")


def hold_collector() -> None:
    """Turn Python's cyclic garbage collector off while a VM's command imports: the monitor's
    ~60 ms of imports make ~35k objects that live as long as it does, and as they grew the
    collector walked them again and again, ~5 ms of a restore's way to its vCPUs on this
    host (bench/snapshot.py). release_collector() turns it back on once they are done."""
    global _collector_held
    if gc.isenabled():
        gc.disable()
        _collector_held = True


def release_collector() -> None:
    """The collector back on, if hold_collector() turned it off, with what was made meanwhile
    frozen (gc.freeze): the modules, the config and the snapshot's checks live as long as
    the VM, and no collection in the vCPU threads' exits need walk them again."""
    global _collector_held
    if _collector_held:
        _collector_held = False
        gc.freeze()
        gc.enable()


def _hold_interrupt() -> None:
    """From the launcher's fork to take() (click's imports and its parsing of the command
    line, while the zygote imports), a SIGINT is held and take() raises it: run_and_exit then
    stops as by SIGINT (130), as anywhere before the VM's own handlers. Raised where it came,
    it was click's "Aborted!" (1: could not start), or a traceback in an import. A SIGINT
    ignored (nohup, a shell's `cmd &`) stays so."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _held)


def _held(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True


def close_inherited_fds() -> None:
    """Close every fd past stdio that the process running a VM inherited, before it starts
    anything. The monitor confines itself with Landlock, which leaves open fds alone: one a
    parent left open (a shell's `9>>file`) stayed writable outside the monitor's domain, and
    the devices' launcher would have inherited it too. Firecracker's jailer closes them
    the same way. Here, at the process's start (main()), not in run_and_exit: a test runs
    `up` in its own process through click, whose fds are not ours to close."""
    global _closed_inherited
    os.closerange(3, 2**31 - 1)  # past any limit: one close_range(2), fds above the soft one too
    _closed_inherited = True


def closed_fd(path: str | os.PathLike[str]) -> int | None:
    """The fd past 2 that `path` names (/dev/fd/N, /proc/self/fd/N), if close_inherited_fds()
    closed it: the operator's file is gone, and its number may be one of ours by now (the
    launcher's socket, its pidfd)."""
    parent, _, number = os.path.abspath(path).rpartition("/")
    digits = number.isascii() and number.isdigit()  # isdigit() alone: "²" too, int() refuses it
    fd_dir = parent in FD_DIRS or parent == f"/proc/{os.getpid()}/fd"  # /proc/$$/fd of an exec
    if _closed_inherited and fd_dir and digits and int(number) > 2:
        return int(number)
    return None


def take() -> Launcher | None:
    """The launcher started here, once (None if none was); KeyboardInterrupt if a SIGINT
    came since its fork (_hold_interrupt)."""
    global _forked
    if signal.getsignal(signal.SIGINT) is _held:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if _interrupted:
            raise KeyboardInterrupt
    if _forked is None:
        return None
    from splitvmm.sandbox.launcher import Launcher

    sock, pid = _forked
    _forked = None
    return Launcher(sock, pid)


def subcommand(args: list[str]) -> str | None:
    """The first argument that is neither an option nor an option's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in VALUED_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None
