"""The monitor confines itself once its VM is built, before any guest instruction runs.

The monitor parses guest exits and snapshots; a bug there must not hand a
guest root's capabilities, the host's file system or the host's syscalls. So,
in this order (Machine.build calls the steps; the reasons are the order):

1. Everything the VM needs from the host is opened first, while the monitor
   has a single thread: /dev/kvm, the RAM memfd, kernel/initrd/firmware,
   device outputs and irqfds, the snapshot being restored, the control socket.
   Device processes are not the monitor's to start: what follows would forbid
   it (no exec; Landlock forbids the mounts of a device's sandbox; a root
   monitor without CAP_SETFCAP cannot map uid 0 into a device's user
   namespace). The launcher (sandbox/launcher.py), forked before all of this,
   starts them when asked, now and for any restart later; the monitor may
   only talk to it, over the socket the policy names (LAUNCHER_FD).
2. Confinement.confine_process(): capabilities, no_new_privs and Landlock belong to a
   thread and are inherited by the threads it makes later, so they are
   applied while there is still one thread. The vCPU, control and supervisor
   threads are all made afterwards and are born confined. Capabilities: all dropped, bounding and ambient sets emptied and
   the securebits locked, when there are any (a root monitor), but CAP_KILL where the
   devices run as another user (vm.device_uid): the monitor ends them, through the pidfds
   the launcher sent (its filter allows no other signal but its own threads'); the bounding set and
   securebits stay where it lacks CAP_SETPCAP to change them (they act only at an
   execve, which it cannot make); an unprivileged monitor has none to drop. Not dumpable, and no core file: a crash writes no
   guest RAM to disk, and no process of the same user may ptrace the monitor or
   read its memory through /proc (as each device). Landlock, only what the
   running monitor does:
   the runtime directory, emptied and removed at tear-down (its parent: remove
   a directory); the snapshot directories the config names (make, write and
   remove files and directories: no file there is read, so one VM's monitor
   cannot read another's snapshot of guest RAM, though it could overwrite or
   remove it: native/landlock.py new_files_rights); Python's own module
   directories (read only: lazy imports, tracebacks); nothing else. It is the
   monitor's only barrier against the host's file system (its filter allows
   open, unlink and rename), so a kernel without Landlock fails the start,
   unless the operator says SPLITVMM_MONITOR_LANDLOCK=optional.
3. load_monitor_filter(): the seccomp allow-list (policies/<arch>/monitor.policy,
   TSYNC), before the devices' channels are served: nothing a device sends is
   read before the filter holds.
4. confine_vcpu_thread(): each vCPU thread, the one that runs guest exits,
   stacks vcpu.policy on itself when it starts: a syscall must pass both.

Anything outside a filter kills the monitor (SECCOMP_RET_KILL_PROCESS).
SPLITVMM_MONITOR_SECCOMP=log (an operator's environment, trusted) logs
instead, for drafting a policy; the kernel writes those lines to its log.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import sysconfig
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import splitvmm
from splitvmm.errors import ConfigError, SplitvmmError
from splitvmm.native import confine, landlock
from splitvmm.native.kvm import IOCTL_NUMBERS
from splitvmm.native.seccomp import pyseccomp as seccomp
from splitvmm.protocol.spec import another_user
from splitvmm.sandbox import policy
from splitvmm.sandbox.launcher_start import thread_count

log = logging.getLogger("splitvmm.confine")

MONITOR_POLICY = "monitor.policy"
VCPU_POLICY = "vcpu.policy"
SECCOMP_ENV = "SPLITVMM_MONITOR_SECCOMP"
# "required" (the default), or "optional": a kernel without Landlock then runs the monitor
# without it, with a warning (an operator's environment, trusted, as SECCOMP_ENV).
LANDLOCK_ENV = "SPLITVMM_MONITOR_LANDLOCK"
# A thread that Python has joined may still be listed in /proc/self/task for a moment: join()
# returns once the thread's Python state is gone, just before its OS thread exits (seen once
# in a full test run with the build's pit-mode thread, monitor/machine.py).
JOINED_THREAD_EXIT_S = 0.5

# Modules the monitor may need after it is confined, imported now: seccomp
# forbids executable mappings, so no C extension can be loaded later.
PRELOAD = (
    "splitvmm.snapshot.writer",
    "splitvmm.monitor.vmstate",
    "encodings.idna",
    "json",
    "traceback",
    "linecache",
    "tokenize",
)


class ConfinementError(SplitvmmError):
    """The monitor could not confine itself; it does not run a guest unconfined."""


def devices_elsewhere(user: tuple[int, int] | None) -> bool:
    """Whether the devices run as another host user than the monitor (config.py
    vm.device_uid): the confined monitor then keeps CAP_KILL to end them (a signal to
    another user's process needs it). ConfigError if it may not: only root starts a
    process as another user."""
    if not another_user(user):
        return False
    if os.geteuid() != 0:
        raise ConfigError(
            "vm.device_uid: only a monitor run as root may run its devices as another user "
            f"(this one runs as uid {os.geteuid()}, gid {os.getegid()})"
        )
    return True


class Confinement:
    """The monitor's confinement, prepared while files can still be read (the policies)."""

    def __init__(
        self, *, launcher_fd: int, policy_dir: Path | None = None, keep_kill: bool = False
    ) -> None:
        """`launcher_fd`: the socket to the launcher, the only one the monitor may send fds
        over or receive them from. `keep_kill`: keep CAP_KILL (devices_elsewhere)."""
        self._keep_kill = keep_kill
        mode = os.environ.get(SECCOMP_ENV, "kill")
        if mode not in ("kill", "log"):
            raise ConfinementError(f"{SECCOMP_ENV}={mode!r}: expected kill or log")
        action = seccomp.KILL_PROCESS if mode == "kill" else seccomp.LOG
        landlock_mode = os.environ.get(LANDLOCK_ENV, "required")
        if landlock_mode not in ("required", "optional"):
            raise ConfinementError(
                f"{LANDLOCK_ENV}={landlock_mode!r}: expected required or optional"
            )
        self._landlock_optional = landlock_mode == "optional"
        constants = policy_constants(launcher_fd)
        self._monitor = _compile(MONITOR_POLICY, policy_dir, constants, action, tsync=True)
        self._vcpu = _compile(VCPU_POLICY, policy_dir, constants, action, tsync=False)
        self._vcpu_lock = threading.Lock()  # libseccomp regenerates the BPF on each load

    def confine_process(self, runtime_dir: Path, snapshot_dirs: Iterable[Path]) -> bool:
        """Step 2: capabilities, no_new_privs, Landlock -- on the only thread there is.
        Whether Landlock now holds the file system (False: this kernel has none, and the
        operator said it is optional)."""
        if not single_threaded():
            raise ConfinementError("the monitor must confine itself before it starts a thread")
        for name in PRELOAD:
            importlib.import_module(name)
        try:
            effective, permitted, _ = confine.capabilities()
            if permitted:
                # Locking the securebits and emptying the bounding set need CAP_SETPCAP, which
                # a monitor holding other capabilities may lack (root under a bounding set
                # without it, a user given CAP_NET_ADMIN for its TAPs). Both act only at an
                # execve, which no_new_privs and the monitor's filter rule out.
                setpcap = bool(effective >> confine.CAP_SETPCAP & 1)
                keep = frozenset({confine.CAP_KILL}) if self._keep_kill else frozenset()
                confine.drop_capabilities(bounding=setpcap, keep=keep)
            confine.set_no_new_privs()
            confine.set_dumpable(False)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except OSError as e:
            raise ConfinementError(f"cannot drop the monitor's privileges: {e}") from None
        rules = landlock_rules(runtime_dir, snapshot_dirs)
        try:
            abi = landlock.restrict_self(rules)
        except landlock.LandlockUnavailable:
            if not self._landlock_optional:
                raise ConfinementError(
                    "this kernel has no Landlock (Linux 5.13+, with landlock among its LSMs): "
                    "without it the confined monitor could still write any file its user may, "
                    f"so the VM does not start; {LANDLOCK_ENV}=optional runs it anyway"
                ) from None
            log.warning("no Landlock on this kernel: the monitor's file system stays open")
            return False
        except OSError as e:
            raise ConfinementError(f"cannot confine the monitor with Landlock: {e}") from None
        log.debug("Landlock ABI %d: the monitor may reach %s", abi, ", ".join(sorted(rules)))
        return True

    def load_monitor_filter(self) -> None:
        """Step 3: the monitor's allow-list, for every thread it has (TSYNC)."""
        _load(self._monitor, MONITOR_POLICY)

    def confine_vcpu_thread(self) -> None:
        """Step 4: run by each vCPU thread on itself before its first KVM_RUN."""
        with self._vcpu_lock:
            _load(self._vcpu, VCPU_POLICY)


def landlock_rules(runtime_dir: Path, snapshot_dirs: Iterable[Path]) -> dict[str, int]:
    """Path -> the Landlock rights granted beneath it (rights for one path are or-ed)."""
    grants = [
        (runtime_dir, landlock.remove_rights()),
        (runtime_dir.parent, landlock.REMOVE_DIR),  # rmdir of the runtime dir itself
        *((d, landlock.new_files_rights()) for d in snapshot_dirs),
        *((Path(d), landlock.read_rights()) for d in python_dirs()),
    ]
    rules: dict[str, int] = {}
    for path, rights in grants:
        rules[str(path)] = rules.get(str(path), 0) | rights
    return rules


def single_threaded(grace_s: float = JOINED_THREAD_EXIT_S) -> bool:
    """Whether this process has one thread: False at once while Python knows of another
    (not yet joined), and `grace_s` for the OS threads of those it has joined to end."""
    if threading.active_count() != 1:
        return False
    deadline = time.monotonic() + grace_s
    while thread_count() != 1:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0002)
    return True


def _compile(
    name: str, policy_dir: Path | None, constants: dict[str, int], action: int, tsync: bool
) -> seccomp.SyscallFilter:
    path = policy.policy_file(name, policy_dir)
    try:
        return policy.compile_filter(policy.parse_file(path, constants), action, tsync=tsync)
    except policy.PolicyError as e:
        raise ConfinementError(f"the monitor's seccomp policy: {e}") from None


def _load(filt: seccomp.SyscallFilter, name: str) -> None:
    try:
        filt.load()
    except OSError as e:
        raise ConfinementError(f"cannot load the monitor's seccomp policy {name}: {e}") from None


def policy_constants(launcher_fd: int) -> dict[str, int]:
    """The names the monitor's policies may use: the KVM ioctls (from <linux/kvm.h>), and
    what only the running monitor knows, its pid and the launcher's socket."""
    return {
        **policy.CONSTANTS,
        **IOCTL_NUMBERS,
        "SELF_PID": os.getpid(),
        "LAUNCHER_FD": launcher_fd,
    }


def python_dirs() -> list[str]:
    """Where the monitor's Python code lives: the standard library, site-packages and
    splitvmm itself (an editable install lives outside site-packages)."""
    paths = sysconfig.get_paths()
    found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    found.add(str(Path(splitvmm.__file__).resolve().parent))
    return sorted(p for p in found if os.path.isdir(p))
