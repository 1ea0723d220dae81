"""enter_sandbox(): the capability mode every device process enters before it reads guest data.

Layers, each with an escape test in tests/sandbox/:
(a) namespaces: a new user (root inside, mapped to the monitor's uid outside, or
    to the VM's device user: vm.device_uid),
    mount, network, IPC, UTS and PID namespace; the root is an empty read-only
    tmpfs holding only the device's channel socket;
(b) rlimits: no new processes, no fd above those it holds, no core file, no
    file growth (unless it holds a writable regular file, e.g. a log), and an
    address-space limit (RLIMIT_AS) and a private-memory limit (RLIMIT_DATA) that
    the caller sizes, and a stack of at most 8 MiB: a runaway or hostile device gets
    MemoryError instead of making the host swap;
(c) no_new_privs, locked securebits, no capabilities (bounding and ambient sets
    emptied too), not dumpable;
(d) Landlock: every file-system right the kernel's ABI knows handled, none granted
    (a warning and no Landlock where the kernel has none: (a) already hides the fs);
(e) seccomp last: the model's allow-list (policies/<arch>/<model>_device.policy),
    anything else kills the whole process (SECCOMP_RET_KILL_PROCESS).

Why this order, and not "connect the channel, then sandbox":

* unshare(CLONE_NEWUSER) fails with EINVAL in a multithreaded process. A device
  process has one thread for its whole life (its channel is read and written by
  that thread: devprocs/channel.py), but the namespaces come first all the same.
  Once in them, the device's own user namespace is limited to no nested one
  (user.max_user_namespaces 0, set while it holds CAP_SYS_RESOURCE there).
* Capabilities, Landlock domains and no_new_privs belong to a thread, not to
  the process: a thread keeps what it had when it was made. So (c) and (d) come
  before anything could make a thread (a model's set-up runs earlier, and makes
  none: every model serves from the one thread).
* The channel is an ipc:// path in the monitor's runtime directory, which the
  empty root hides. Before pivoting, the channel socket is bind-mounted (read
  only) into the new root as /channel, so the device connects after the file
  system is gone. Connecting to it is all it allows: the monitor accepts one
  peer and closes its listener then, so any other is refused (monitor/zmtp.py),
  and seccomp forbids socket() and connect() from then on anyway.
* rlimits come after the connect: RLIMIT_NOFILE must sit just above the
  channel's socket.
* seccomp is last, with TSYNC (one filter for every thread, were there
  another); the common policy allows nothing that only threads need.
* CLONE_NEWPID only moves the children of the caller into the new namespace.
  So the process forks once (still single-threaded, so safe, gh-100228): the
  child is pid 1 of the new namespace and becomes the device; the parent
  stays as the *warden*, the pid the monitor knows. The warden closes every fd
  but the liveness pipe (while the warden holds it open, the device knows its
  parent-death signal is armed) and stderr (the one line it writes if its own
  confinement fails: the monitor would otherwise see only "exit status 1");
  fds 0 and 1 are closed, as it reads and prints nothing. It confines itself
  with the same layers, except that its Landlock domain lets it execute one
  file, splitvmm/native/warden (a small static C program, opened before the
  fork: the device's pivot_root moves the warden's root too), and execs it;
  the program makes itself not dumpable, loads the warden's own tiny filter
  (policies/<arch>/warden.policy, compiled here and handed over as raw BPF),
  waits for the device and then dies the way the device died (the same
  signal or exit status), so the monitor's supervision is unchanged. Being a
  program of its own, it holds no copy of the device's interpreter. Killing
  the warden kills the device (PR_SET_PDEATHSIG), as the death of its parent, the launcher
  (sandbox/launcher.py), kills the warden, and the monitor's the launcher. The device
  also leaves the monitor's process group (setsid): kill(0, sig) reaches a
  whole process group whatever the PID namespace. Being pid 1, it ignores
  signals it has no handler for unless they come as SIGKILL or SIGSTOP from an
  ancestor namespace: the monitor stops a device by killing its warden.

The host user: the uid map can name only the caller's own uid (a process cannot
map another uid once it is inside the new namespace), so the device is root
inside its namespaces and, outside, whoever it is when it makes them. A root
monitor's device is uid 0 outside, unless the VM's config names another user
(config.py vm.device_uid): then the device becomes that user first (_become), and
a device that escaped every other layer would be that user on the host, not
root. As root, the kernel does not apply RLIMIT_NPROC to it, and seccomp's
clone/fork rules are then the barrier against new processes. Its empty root is
made by fds alone (_pivot_to_empty_root), as that user may not search the
directories above its channel.

Caveats: Landlock's `scoped` rights (signals, abstract UNIX sockets) are not
used: the build host's <linux/landlock.h> predates them; seccomp and the PID
and network namespaces cover the same ground. The bind-mounted channel socket
stays connectable from the empty root (Landlock, up to ABI 7 at least, does
not govern connecting to a UNIX socket); the monitor can close that door by
unbinding its endpoint once the device is READY.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import resource
import signal
import stat
from collections.abc import Callable
from typing import NoReturn, TypeVar

from splitvmm import native
from splitvmm.errors import SplitvmmError
from splitvmm.native import confine, files, landlock
from splitvmm.native.seccomp import pyseccomp as seccomp
from splitvmm.protocol.spec import another_user
from splitvmm.sandbox import policy
from splitvmm.sandbox.launcher_start import userns_needs_sys_admin

log = logging.getLogger("splitvmm.dev.sandbox")

T = TypeVar("T")

NAMESPACES = (
    confine.CLONE_NEWUSER
    | confine.CLONE_NEWNS
    | confine.CLONE_NEWNET
    | confine.CLONE_NEWIPC
    | confine.CLONE_NEWUTS
    | confine.CLONE_NEWPID
)
CHANNEL_NAME = "channel"  # the channel socket's name in the empty root
STD_FDS = frozenset({0, 1, 2})
MAX_STACK = 8 << 20  # RLIMIT_STACK at most (_stack_limit): Linux's default
_READ_ONLY = (
    confine.MS_REMOUNT
    | confine.MS_BIND
    | confine.MS_RDONLY
    | confine.MS_NOSUID
    | confine.MS_NODEV
    | confine.MS_NOEXEC
)


class SandboxError(SplitvmmError):
    """A sandbox layer could not be applied; the device must not run without it."""


class SeccompMode(enum.StrEnum):
    KILL = "kill"  # enforce: a syscall outside the policy kills the process
    LOG = "log"  # audit: outside the policy is logged (kmsg, rate-limited) and runs
    TRACE = "trace"  # audit: every syscall waits for `splitvmm policy audit` to let it run


def enter_sandbox(
    model: str,
    keep_fds: set[int],
    audit: bool | str = False,
    *,
    channel: str,
    connect: Callable[[str], T],
    address_space: int,
    private_memory: int,
    fixed_size: frozenset[int] = frozenset(),
    user: tuple[int, int] | None = None,
) -> T:
    """Confine this device process; returns what `connect(endpoint)` returned.

    `audit`: False (enforce), True (SeccompMode.LOG) or a SeccompMode value.
    `address_space`: RLIMIT_AS in bytes, from the time the channel is connected.
    `private_memory`: RLIMIT_DATA in bytes, the device's own memory (_set_rlimits).
    `fixed_size`: fds of `keep_fds` whose files must not grow (a disk image): what the
    file-size limit is made of (_file_size_limit).
    `user`: the host (uid, gid) to run as from before the namespaces on (_become); None:
    stay who we are.

    Call it single-threaded, after every import, holding the fds in `keep_fds`
    (0, 1 and 2 are always kept; any other fd is closed). `connect` gets the
    ipc:// endpoint of the channel inside the new root and must return only
    once the connection is established: after it, seccomp forbids new sockets.
    Forks: only the device process returns (see the module docstring).
    """
    mode = _mode(audit)
    _stderr_write_only()
    device_policy = _device_policy(model)  # read now: no file system later
    warden_policy = policy.load_warden_policy(os.getpid())  # the warden is this process
    socket_path = _channel_path(channel)
    _close_fds_except(keep_fds | STD_FDS)
    # Entered as the one who started us: as another user (`user`) we may not pass the
    # runtime dir's parents, but may look a name up in it (monitor/rundir.py: 0711 then).
    _enter_dir(os.path.dirname(socket_path))
    became = user if another_user(user) else None  # our own: nothing to become
    program = _open_warden()
    if became is not None:
        _become(*became)
    _unshare_namespaces()
    if became is not None:
        _settle_ids()
        _refuse_a_warden_we_may_read(program, became[0])
    channel_dir, channel_fd = _open_channel(os.path.basename(socket_path))
    os.chdir("/")  # so that pivot_root moves the warden's cwd too
    _fork_warden(warden_policy, address_space, program)
    fd_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    endpoint = _pivot_to_empty_root(channel_dir, channel_fd)
    _drop_privileges(dumpable=mode is SeccompMode.TRACE)
    _restrict_landlock()
    conn = connect(endpoint)
    held = {int(name) for name in os.listdir(fd_dir)} - {fd_dir}
    os.close(fd_dir)
    _set_rlimits(held, address_space, private_memory, fixed_size)
    _load_seccomp(_seccomp_filter(model, device_policy, mode))
    return conn


# Device policies a zygote read, parsed and compiled before it forks (preload_policy), by
# model: its devices inherit them, and read no policy file and build no filter at start. The
# filter is the enforcing one, the only one a zygote's device loads (a device whose filter
# logs or traces is exec'd: sandbox/launcher.py).
_PRELOADED: dict[str, tuple[policy.Policy, seccomp.SyscallFilter]] = {}


def preload_policy(model: str) -> None:
    """Read, parse and compile `model`'s device policy now, for the processes this one forks
    (a zygote: devprocs/runtime.py prepare_model); PolicyError if it cannot be read. Once
    a model: the zygote prepares a model at its `load` and again at each `fork` of it
    (sandbox/zygote.py _loaded), which must not read and compile it anew on a fork's way."""
    if model in _PRELOADED:
        return
    device_policy = policy.load_model_policy(model)
    _PRELOADED[model] = device_policy, policy.compile_filter(device_policy, seccomp.KILL_PROCESS)


def _device_policy(model: str) -> policy.Policy:
    """The policy enter_sandbox loads: preloaded, or read from its file now."""
    preloaded = _PRELOADED.get(model)
    return preloaded[0] if preloaded is not None else policy.load_model_policy(model)


def _stderr_write_only() -> None:
    """fd 2 is the operator's stderr, for a device's warnings and a crashing one's
    traceback: often their terminal, open read-write. A device must not read what they type
    (we lead our own session: no job control stops the read), so a write-only open of the
    same terminal or pipe replaces it; where none can be made, /dev/null. A regular file or a
    socket (journald's) is left as it is: nothing typed comes through it."""
    try:
        mode = os.fstat(2).st_mode
        flags = fcntl.fcntl(2, fcntl.F_GETFL)
    except OSError:
        return  # no stderr at all (2>&-): nothing to read through either
    if flags & os.O_ACCMODE == os.O_WRONLY or not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return
    error = files.reopen_write_only(2)
    if error is not None:
        log.warning("stderr cannot be reopened write-only (%s): /dev/null from here on", error)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)


def _mode(audit: bool | str) -> SeccompMode:
    if audit is True:
        return SeccompMode.LOG
    if audit is False:
        return SeccompMode.KILL
    return SeccompMode(audit)


def _channel_path(channel: str) -> str:
    path = channel.removeprefix("ipc://")
    if path == channel or not os.path.isabs(path) or os.path.dirname(path) == "/":
        raise SandboxError(f"channel {channel!r} is not ipc:// on an absolute path in a directory")
    return path


def _close_fds_except(keep: set[int]) -> None:
    for fd in sorted({int(name) for name in os.listdir("/proc/self/fd")} - keep):
        try:
            os.close(fd)
        except OSError:  # the fd listdir used for itself, already closed
            continue


def _enter_dir(path: str) -> None:
    try:
        os.chdir(path)
    except OSError as e:
        raise SandboxError(f"cannot enter the channel's directory {path}: {e.strerror}") from None


def _open_channel(name: str) -> tuple[int, int]:
    """O_PATH fds of the working directory (the channel's) and of the channel's socket in
    it, by its `name`: what _pivot_to_empty_root mounts on and binds. Opened in our own mount
    namespace, as a bind mount takes no source from another one."""
    try:
        directory = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return directory, os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=directory)
    except OSError as e:
        raise SandboxError(f"cannot open the device channel {name}: {e.strerror}") from None


def _open_warden() -> int:
    """splitvmm/native/warden, for the warden to exec (_fork_warden): opened now, as the
    device may pivot to its empty root (the same mount namespace as the warden's, whose root
    moves with it) before the warden has exec'd it."""
    try:
        return os.open(WARDEN, os.O_PATH | os.O_CLOEXEC)  # exec'd by fd: no read needed
    except OSError as e:
        raise SandboxError(
            f"the device warden {WARDEN} cannot be opened ({e.strerror}): it is built with "
            "splitvmm's native modules (scripts/bootstrap.sh)"
        ) from None


def _refuse_a_warden_we_may_read(program: int, uid: int) -> None:
    """For a device of another user, once every id is that user's (_settle_ids): a program
    that user may not read. The warden execs it in a user namespace the user owns, where any
    host process of the user has every capability, and the kernel keeps the warden out of
    their reach (not dumpable, its memory the host's) only for a program its exec could not
    read (would_dump). The kernel's own check, the one would_dump makes (inode_permission,
    MAY_READ: POSIX ACLs and LSMs' inode hooks included), by access(2) through our O_PATH fd:
    the mode bits alone miss an ACL, and an open(2) would also ask the LSMs' file_open
    (AppArmor's only read check, which would_dump does not) and block on a FIFO. Our real
    ids are the user's, as every other one (_settle_ids)."""
    path = f"/proc/self/fd/{program}"
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise SandboxError(f"the device warden {WARDEN} cannot be checked: {e.strerror}") from None
    if not regular:
        raise SandboxError(f"the device warden {WARDEN} is not a regular file")
    if not os.access(path, os.R_OK):
        return
    raise SandboxError(
        f"the device warden {WARDEN} may be read by uid {uid}, which its devices run "
        f"as: a process of that user could take the warden over (chmod 0711 {WARDEN}: "
        "the build leaves it so, a wheel's install does not)"
    )


def _become(uid: int, gid: int) -> None:
    """Run as host user `uid` and group `gid` from here on (config.py vm.device_uid): no
    supplementary group, and real and effective uid the user's, with every capability in
    the host's user namespace gone (the launcher's root kept CAP_SETUID and CAP_SETGID for
    this: sandbox/launcher_start.py). The user namespace that follows is that user's, its
    root mapped to it: a device that escaped every layer would be that user on the host.
    Where only CAP_SYS_ADMIN makes a user namespace (launcher_start.py USERNS_RESTRICTED),
    that capability alone stays, for the unshare.

    Root stays the saved and the file-system uid until the maps are written (_settle_ids
    then makes every uid the user's). The switch leaves the process not dumpable, its
    /proc/self files the host root's, which the file-system uid may still open; and it must
    stay so: made dumpable to open its maps, it was open meanwhile to any host process of
    `uid` (/proc/PID/mem, ptrace: the namespace it makes is that user's), and a PTRACE_SEIZE
    in that window kept a device traced, its seccomp filter never loaded (a review's race).
    A change of ids also clears the parent-death signal, which is armed again each time."""
    restricted = userns_needs_sys_admin()
    parent = os.getppid()
    if _suid_dumpable() == 1:  # the warden's exec then makes it dumpable to that user
        raise SandboxError(
            "fs.suid_dumpable is 1: a device run as another user would be open to that "
            "user's processes (sysctl fs.suid_dumpable=0 or 2)"
        )
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, 0)  # the effective capabilities go; the permitted ones next
        confine.keep_only_capabilities(
            frozenset({confine.CAP_SYS_ADMIN}) if restricted else frozenset()
        )
        confine.set_fsuid(0)  # allowed by the saved uid; no capability raised with it
        _after_ids_changed(parent)
    except OSError as e:
        raise SandboxError(
            f"cannot run as uid {uid}, gid {gid}: {e.strerror or e}"
            + (" (only a launcher run as root may)" if e.errno == errno.EPERM else "")
        ) from None


def _suid_dumpable() -> int:
    """fs.suid_dumpable: what a change of ids, or the exec of a program the process may not
    read, sets its dumpable flag to (1: dumpable to its own user)."""
    try:
        with open("/proc/sys/fs/suid_dumpable") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        raise SandboxError(f"cannot read fs.suid_dumpable: {e}") from None


def _settle_ids() -> None:
    """Once the maps are written: every uid the namespace's root, i.e. the device's user
    (the saved and file-system uids were still the host's root: _become)."""
    parent = os.getppid()
    try:
        os.setresuid(0, 0, 0)
        _after_ids_changed(parent)
    except OSError as e:
        raise SandboxError(f"cannot give up the host root's saved uid: {e}") from None


def _after_ids_changed(parent: int) -> None:
    """A change of effective or file-system uid or gid clears PR_SET_PDEATHSIG (prctl(2)): arm
    it again, or the warden outlives the launcher (and the monitor) that started it. It also
    sets the dumpable flag to fs.suid_dumpable (kernel/cred.c commit_creds), 1 or 2 on some
    hosts: not dumpable again, whatever that sysctl says."""
    confine.set_dumpable(False)
    confine.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was armed again
        os._exit(1)


# -- (a) namespaces ---------------------------------------------------------------------------
def _unshare_namespaces() -> None:
    uid, gid = os.geteuid(), os.getegid()
    try:
        confine.unshare(NAMESPACES)
        # Without setgroups denied, an unprivileged process may not write its gid map.
        for fd, text in zip(_open_id_maps(), ("deny", f"0 {uid} 1", f"0 {gid} 1"), strict=True):
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    except OSError as e:
        raise SandboxError(f"cannot create the device's namespaces: {e}") from None
    _no_nested_user_namespace()


def _open_id_maps() -> list[int]:
    """/proc/self/setgroups, uid_map and gid_map, open for writing; the process is not dumpable
    from here on. One that switched its uid (_become) never is: its /proc/self files are the
    host root's, which is its file-system uid until _settle_ids."""
    fds = [
        os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        for name in ("setgroups", "uid_map", "gid_map")
    ]
    confine.set_dumpable(False)
    return fds


def _no_nested_user_namespace() -> None:
    """No user namespace inside ours, as a layer under seccomp (whose filter already kills on
    unshare, clone's namespace flags, clone3 and setns): a nested one would give back every
    capability inside it, and the kernel code that only a namespace's root reaches. The limit
    is our user namespace's own (the sysctl's table is the writer's namespace's), set while
    we hold CAP_SYS_RESOURCE in it; _drop_privileges then leaves nothing that could raise it
    (bubblewrap's --disable-userns sets it in an outer namespace instead, as its sandboxed
    process may keep capabilities). Best effort: where /proc/sys is read-only (a container,
    systemd's ProtectKernelTunables) or has no user table, the device starts without it."""
    try:
        _write_proc("/proc/sys/user/max_user_namespaces", "0")
    except OSError as e:
        log.warning("nested user namespaces not limited in the device (%s): seccomp alone "
                    "refuses them", e.strerror or e)  # fmt: skip


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _fork_warden(warden_policy: policy.Policy, address_space: int, program: int) -> None:
    """Fork: the child returns (pid 1 of the new PID namespace); the parent never does, but
    execs `program` (_open_warden) as the warden."""
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as e:  # EAGAIN: a limit on processes (a cgroup's pids.max)
        raise SandboxError(f"cannot fork the device's warden: {e}") from None
    if pid:
        os.close(alive_r)
        _warden(pid, alive_w, program, warden_policy, address_space)
    os.close(program)
    os.close(alive_w)
    # Leave the monitor's process group: kill(0, sig) would reach every process in it
    # (the monitor included), pid namespace or not; and the terminal's Ctrl-C is the
    # monitor's to handle.
    os.setsid()
    # The warden is our parent now: its death must end us, as the monitor's ends it.
    confine.set_parent_death_signal(signal.SIGKILL)
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":  # EOF: the warden died before prctl took effect
            os._exit(1)
    except BlockingIOError:
        pass  # the warden is alive, and from now on its death kills us
    os.close(alive_r)


def _pivot_to_empty_root(directory: int, sock_fd: int) -> str:
    """Make an empty read-only tmpfs our root, with only the channel socket bound in it:
    `directory` and `sock_fd` from _open_channel, which this closes. Every step goes by fd
    or by a name in the new tmpfs: no path above it is looked up (a device run as another
    user may not search the runtime dir's parents)."""
    try:
        confine.mount(None, "/", None, confine.MS_REC | confine.MS_PRIVATE)
        root = confine.detached_tmpfs({"size": "4k", "nr_inodes": "4", "mode": "0555"})
        confine.attach_mount(root, directory)  # on the channel's dir, in our namespace only
        os.close(directory)
        os.fchdir(root)
        os.close(root)
        os.close(os.open(CHANNEL_NAME, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        # The tmpfs now hides the socket's directory: bind it through our O_PATH fd.
        confine.mount(f"/proc/self/fd/{sock_fd}", CHANNEL_NAME, None, confine.MS_BIND)
        os.close(sock_fd)
        confine.pivot_root(".", ".")  # the old root is stacked on "." ...
        confine.umount2(".", confine.MNT_DETACH)  # ... and detached, with everything under it
        os.chdir("/")
        confine.mount(None, "/", None, _READ_ONLY)
        confine.mount(None, f"/{CHANNEL_NAME}", None, _READ_ONLY)
    except OSError as e:
        raise SandboxError(f"cannot make the device's empty root: {e}") from None
    return f"ipc:///{CHANNEL_NAME}"


# -- (c) privileges and (d) Landlock --------------------------------------------------------
def _drop_privileges(dumpable: bool) -> None:
    try:
        confine.set_dumpable(dumpable)  # no core file with guest data; TRACE: auditor attaches
        confine.set_no_new_privs()
        confine.drop_capabilities()
    except OSError as e:
        raise SandboxError(f"cannot drop privileges: {e}") from None


def _restrict_landlock() -> None:
    try:
        abi = landlock.restrict_self_deny_all()
    except landlock.LandlockUnavailable:
        log.warning("Landlock is not available on this kernel: the empty root alone hides the fs")
        return
    except OSError as e:
        raise SandboxError(f"cannot enter Landlock: {e}") from None
    log.debug("Landlock ABI %d: every file-system right denied", abi)


# -- (b) rlimits and (e) seccomp --------------------------------------------------------------
def _set_rlimits(
    held: set[int], address_space: int, private_memory: int, fixed_size: frozenset[int]
) -> None:
    """RLIMIT_AS counts what the device maps of its fds (a virtio device's guest RAM), which
    it may unmap: alone, it would let a hostile device take as much memory of its own as
    the guest has. RLIMIT_DATA bounds private memory (malloc, brk, a private mapping
    written), mapped fds aside; the policy refuses the mappings it does not count, shared
    anonymous ones and stacks (policies/<arch>/common_device.policy)."""
    fsize = _file_size_limit(held, fixed_size)
    limits = {
        resource.RLIMIT_NPROC: 0,  # no fork, no thread
        resource.RLIMIT_NOFILE: max(held) + 1,  # no fd above those we hold
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: fsize,  # no file we write grows, but a log (_file_size_limit)
        resource.RLIMIT_AS: address_space,  # MemoryError, not the host's memory
        resource.RLIMIT_DATA: private_memory,  # ... also with guest RAM unmapped
        resource.RLIMIT_STACK: _stack_limit(),  # ... and the stack, which it does not count
    }
    try:
        for which, value in limits.items():
            _set_limit(which, value)
    except (OSError, ValueError) as e:
        raise SandboxError(f"cannot set rlimits: {e}") from None


def _set_limit(which: int, value: int) -> None:
    """Both limits of `which` at `value`, or at the hard limit inherited where that is lower:
    no process in the device's user namespace may raise it (root's CAP_SYS_RESOURCE counts in
    the host's only), and the operator's lower one (`ulimit -f`, systemd's LimitDATA=)
    confines more."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
        value = hard
    resource.setrlimit(which, (value, value))


def _stack_limit() -> int:
    """RLIMIT_STACK: the main thread's stack, which RLIMIT_DATA does not count and which
    grows wherever there is room below it (RLIMIT_AS aside, room a device makes by unmapping
    guest RAM). What the device inherited, and never above Linux's default 8 MiB: under
    `ulimit -s unlimited` it would have no bound but RLIMIT_AS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return MAX_STACK if soft == resource.RLIM_INFINITY else min(soft, MAX_STACK)


def _file_size_limit(held: set[int], fixed_size: frozenset[int]) -> int:
    """RLIMIT_FSIZE. It bounds the end of every write(2) to any file, so: no limit if we
    hold a writable regular file that may grow (an output file; a stderr redirected to a
    file, which only a device started by hand has: the launcher gives each a pipe it relays,
    launcher_server.py). Else the size of the largest of `fixed_size`
    that could grow (a disk image): no write can make a disk image larger than the guest was
    told (a compromised virtio-blk could fill the host's file system with writes past its
    end). One of `fixed_size` sealed against growing (the progress page, written in place)
    sets the limit only where no such file does: it cannot grow whatever the limit, and its
    writes end far below the smallest disk image (protocol/models.py min_size), which a
    page-sized limit let grow to a page. 0 when we write to no file. A file we only map
    (guest RAM) is in neither set and does not count: a mapping's stores are no write(2)."""
    sizes: list[int] = []
    sealed: list[int] = []
    for fd in held:
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or flags & os.O_ACCMODE == os.O_RDONLY:
            continue
        if fd in fixed_size:
            (sealed if _sealed_against_growing(fd) else sizes).append(st.st_size)
        elif not _sealed_against_growing(fd):
            return resource.RLIM_INFINITY
    return max(sizes) if sizes else max(sealed, default=0)


def _sealed_against_growing(fd: int) -> bool:
    """A memfd whose size is sealed (guest RAM, a dirty log): it cannot grow, and is only
    mapped."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_GROW)
    except OSError:
        return False  # no memfd (EINVAL): no seals


def _seccomp_filter(
    model: str, device_policy: policy.Policy, mode: SeccompMode
) -> seccomp.SyscallFilter:
    """The filter a device of `model` loads last: `device_policy`'s, enforcing (preloaded by
    a zygote, or built now), logging, or tracing every syscall."""
    if mode is SeccompMode.TRACE:
        # Every syscall goes to the listener (`policy audit` takes it with pidfd_getfd).
        filt = seccomp.SyscallFilter(defaction=seccomp.NOTIFY)
        filt.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        return filt
    if mode is SeccompMode.LOG:
        return policy.compile_filter(device_policy, seccomp.LOG)
    preloaded = _PRELOADED.get(model)
    if preloaded is not None and preloaded[0] is device_policy:
        return preloaded[1]
    return policy.compile_filter(device_policy, seccomp.KILL_PROCESS)


def _load_seccomp(filt: seccomp.SyscallFilter) -> None:
    try:
        filt.load()
    except OSError as e:
        raise SandboxError(f"cannot load the seccomp filter: {e}") from None


# -- the warden ---------------------------------------------------------------------------------
# A small static program (splitvmm/native/warden.c, built with the cffi modules): an idle
# Python warden held a private copy of every page the device wrote after the fork.
WARDEN = os.path.join(os.path.dirname(os.path.realpath(native.__file__)), "warden")


def _warden(
    child: int, alive_w: int, program: int, warden_policy: policy.Policy, address_space: int
) -> NoReturn:
    """Become the warden: confined like the device (fds, privileges, Landlock, rlimits), then
    exec'd as splitvmm/native/warden (`program`, an fd: by then its name may be gone), which
    loads its seccomp filter (exported here as raw BPF), waits for the device and dies the
    way it died."""
    try:
        filter_fd = _confine_warden(alive_w, program, warden_policy, address_space)
        os.execve(program, [WARDEN, str(child), str(filter_fd)], {})
    except BaseException as e:  # the device dies with us (PDEATHSIG); say why we went
        # Whatever the write does, this process ends below: it must never return into the
        # device's code, unfiltered.
        with contextlib.suppress(OSError):
            os.write(2, f"splitvmm: device warden failed: {e!r}\n".encode(errors="replace"))
    os._exit(1)


def _confine_warden(
    alive_w: int, program: int, warden_policy: policy.Policy, address_space: int
) -> int:
    """Everything but seccomp; returns the fd of the warden's filter (raw BPF), for the exec.
    It keeps stderr, the liveness pipe (see the module docstring), its program (close on
    exec) and that fd only."""
    # By number, not from /proc/self/fd: the device may have pivoted our root away.
    keep = sorted({2, alive_w, program})
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for low, high in zip([-1, *keep], [*keep, limit], strict=True):
        os.closerange(low + 1, high)
    filter_fd = os.memfd_create("warden-filter", 0)  # fd 0 or 1: below alive_w
    with open(filter_fd, "wb", closefd=False) as f:
        policy.compile_filter(warden_policy, tsync=False).export_bpf(f)
    os.lseek(filter_fd, 0, os.SEEK_SET)
    os.set_inheritable(alive_w, True)
    _drop_privileges(dumpable=False)  # exec makes it dumpable again: warden.c unsets it
    try:  # what the device gets (_restrict_landlock), but for executing the warden
        landlock.restrict_self({program: landlock.exec_rights()})
    except landlock.LandlockUnavailable:
        pass  # the device says so (_restrict_landlock)
    for which, value in (
        (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_NOFILE, max(alive_w, program) + 1),
        (resource.RLIMIT_CORE, 0),
        # 0 but where stderr is a file: its one line (warden.c fail()) must get there.
        (resource.RLIMIT_FSIZE, _file_size_limit({2}, frozenset())),
        (resource.RLIMIT_AS, address_space),  # the device's: the warden needs far less
    ):
        _set_limit(which, value)
    return filter_fd
