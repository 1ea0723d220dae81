"""Syscalls a process makes to confine itself: namespaces, mounts, capabilities, prctl.

Thin checked wrappers over the cffi module built by _build_sys.py (constants and
struct layouts from the kernel headers). Each wrapper raises OSError naming the
call; the device sandbox (sandbox/device.py) decides the order. The launcher imports
this module before it execs its zygote (sandbox/launcher_start.py): it imports
nothing but the cffi module.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from splitvmm.native._sys import ffi, lib

CLONE_NEWUSER: int = lib.CLONE_NEWUSER
CLONE_NEWNS: int = lib.CLONE_NEWNS
CLONE_NEWNET: int = lib.CLONE_NEWNET
CLONE_NEWIPC: int = lib.CLONE_NEWIPC
CLONE_NEWUTS: int = lib.CLONE_NEWUTS
CLONE_NEWPID: int = lib.CLONE_NEWPID
CLONE_THREAD: int = lib.CLONE_THREAD

MS_RDONLY: int = lib.MS_RDONLY
MS_NOSUID: int = lib.MS_NOSUID
MS_NODEV: int = lib.MS_NODEV
MS_NOEXEC: int = lib.MS_NOEXEC
MS_REMOUNT: int = lib.MS_REMOUNT
MS_BIND: int = lib.MS_BIND
MS_REC: int = lib.MS_REC
MS_PRIVATE: int = lib.MS_PRIVATE
MNT_DETACH: int = lib.MNT_DETACH

# prctl(2) options by name, for the policy parser's constant table (<linux/prctl.h>).
PRCTL_OPTIONS: dict[str, int] = {"PR_SET_NAME": lib.PR_SET_NAME}

# mmap(2) flag (<sys/mman.h>) for the policy parser's constant table: Python's mmap module
# has MAP_SHARED and MAP_ANONYMOUS, not this one.
MAP_GROWSDOWN: int = lib.MAP_GROWSDOWN

# Futex operations by name, for the policy parser's constant table (<linux/futex.h>).
FUTEX_OPS: dict[str, int] = {
    name: getattr(lib, name)
    for name in (
        "FUTEX_WAIT_PRIVATE",
        "FUTEX_WAKE_PRIVATE",
        "FUTEX_WAIT_BITSET_PRIVATE",
        "FUTEX_WAKE_BITSET_PRIVATE",
        "FUTEX_CLOCK_REALTIME",
        "FUTEX_WAIT_BITSET",
        "FUTEX_WAKE",
    )
}

CAP_SETPCAP: int = lib.CAP_SETPCAP  # what the bounding set and securebits take to change
CAP_SETFCAP: int = lib.CAP_SETFCAP  # what a root launcher keeps (sandbox/launcher.py) ...
CAP_SYS_ADMIN: int = lib.CAP_SYS_ADMIN  # ... where only it may make a user namespace ...
CAP_SETUID: int = lib.CAP_SETUID  # ... and, for devices run as another user (vm.device_uid),
CAP_SETGID: int = lib.CAP_SETGID  # their switch to it ...
CAP_KILL: int = lib.CAP_KILL  # ... and their end (the monitor keeps it: monitor/confinement.py)
# What a root launcher keeps for devices run as another user, and gives up (as do its
# devices) where the VM has none (sandbox/launcher_start.py, launcher_server.py).
FOR_ANOTHER_USER = frozenset({CAP_SETUID, CAP_SETGID, CAP_KILL})

# Every securebit with its lock: root gets no capabilities from uid 0, setuid keeps
# none, ambient capabilities cannot be raised -- and none of it can be undone.
SECUREBITS_LOCKED = (
    lib.SECBIT_NOROOT
    | lib.SECBIT_NOROOT_LOCKED
    | lib.SECBIT_NO_SETUID_FIXUP
    | lib.SECBIT_NO_SETUID_FIXUP_LOCKED
    | lib.SECBIT_KEEP_CAPS_LOCKED
    | lib.SECBIT_NO_CAP_AMBIENT_RAISE
    | lib.SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


def check(ret: int, what: str) -> int:
    """`ret` of a libc call, or OSError with errno, naming the call (`what`)."""
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    check(lib.unshare(flags), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    src = source.encode() if source is not None else ffi.NULL
    typ = fstype.encode() if fstype is not None else ffi.NULL
    opts = data.encode() if data else ffi.NULL
    check(lib.mount(src, target.encode(), typ, flags, opts), f"mount({target!r}, {flags:#x})")


def umount2(target: str, flags: int) -> None:
    check(lib.umount2(target.encode(), flags), f"umount2({target!r})")


def detached_tmpfs(options: dict[str, str]) -> int:
    """A new tmpfs with `options` (size=, mode=...), nosuid, nodev and noexec, mounted nowhere
    yet: the fd of its root (fsopen, fsconfig, fsmount; Linux 5.2+), for attach_mount()."""
    fs = check(lib.sv_fsopen(b"tmpfs", lib.FSOPEN_CLOEXEC), "fsopen(tmpfs)")
    try:
        for key, value in options.items():
            check(
                lib.sv_fsconfig(fs, lib.FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
                f"fsconfig({key}={value})",
            )
        check(lib.sv_fsconfig(fs, lib.FSCONFIG_CMD_CREATE, ffi.NULL, ffi.NULL, 0), "fsconfig")
        attrs = lib.MOUNT_ATTR_NOSUID | lib.MOUNT_ATTR_NODEV | lib.MOUNT_ATTR_NOEXEC
        return check(lib.sv_fsmount(fs, lib.FSMOUNT_CLOEXEC, attrs), "fsmount")
    finally:
        os.close(fs)


def attach_mount(mount_fd: int, target_fd: int) -> None:
    """Mount the detached `mount_fd` (detached_tmpfs) on the directory `target_fd` (an O_PATH
    fd): no path is looked up, so no directory above the target need be searchable."""
    flags = lib.MOVE_MOUNT_F_EMPTY_PATH | lib.MOVE_MOUNT_T_EMPTY_PATH
    check(lib.sv_move_mount(mount_fd, b"", target_fd, b"", flags), "move_mount")


def pivot_root(new_root: str, put_old: str) -> None:
    check(lib.sv_pivot_root(new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(lib.sv_prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_no_new_privs() -> None:
    prctl(lib.PR_SET_NO_NEW_PRIVS, 1)


def set_parent_death_signal(sig: int) -> None:
    """`sig` when our parent thread dies (cleared by fork: each process sets its own)."""
    prctl(lib.PR_SET_PDEATHSIG, sig)


def set_name(name: str) -> None:
    """This thread's name (ps -o comm, top; 15 bytes kept): a forked device is otherwise
    named after the zygote it came from."""
    buf = ffi.new("char[]", name.encode(errors="replace")[:15])
    # SAFETY: `buf` is cffi-owned and NUL-terminated, alive for the call; the kernel copies it.
    prctl(lib.PR_SET_NAME, int(ffi.cast("uintptr_t", buf)))


def set_child_subreaper() -> None:
    """Orphaned descendants become our children (not init's): we reap them and may wait on
    them, as the launcher does for the devices its zygote double-forks (sandbox/zygote.py)."""
    prctl(lib.PR_SET_CHILD_SUBREAPER, 1)


def set_fsuid(uid: int) -> None:
    """This thread's file-system uid (setfsuid(2)), which reports no failure: read back."""
    lib.sv_setfsuid(uid)
    if lib.sv_setfsuid(0xFFFFFFFF) != uid:  # -1: no change, the current one returned
        raise OSError(errno.EPERM, f"setfsuid({uid}): {os.strerror(errno.EPERM)}")


def set_dumpable(dumpable: bool) -> None:
    """Not dumpable: no core file (it would hold guest memory), no same-uid ptrace."""
    prctl(lib.PR_SET_DUMPABLE, int(dumpable))


def _securebits_to_lock() -> int:
    """SECUREBITS_LOCKED, but a bit that is locked already (systemd's SecureBits=, setpriv)
    keeps the value it was locked at: changing it is EPERM. Each securebit acts only at an
    execve or a setuid, which the caller rules out anyway (no_new_privs, no capability)."""
    now = prctl(lib.PR_GET_SECUREBITS)
    bits = int(SECUREBITS_LOCKED)
    for base in range(0, 32, 2):  # each bit, then its lock
        if now & (2 << base):
            bits = (bits & ~(3 << base)) | (now & (3 << base))
    return bits


def drop_capabilities(bounding: bool = True, keep: frozenset[int] = frozenset()) -> None:
    """Lock the securebits, empty the bounding and ambient sets, then all capability sets,
    but for those of `keep` held now (effective and permitted, and in the bounding set).

    Capabilities are per thread: only the calling thread loses them, so call
    this before any other thread exists. bounding=False: leave the securebits and the
    bounding set, which only a holder of CAP_SETPCAP may change.
    """
    if bounding:
        prctl(lib.PR_SET_SECUREBITS, _securebits_to_lock())
        _limit_bounding_set(keep)
    prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL)
    kept = capabilities()[1] & sum(1 << cap for cap in keep)
    _capset(kept, kept, 0)


def keep_only_capabilities(keep: frozenset[int]) -> None:
    """Hold no capability but those of `keep` held now, effective and permitted, and pass
    on no other through an exec. The bounding set loses every other first (it needs
    CAP_SETPCAP, which goes next), where CAP_SETPCAP is held: else it stays, which
    no_new_privs makes moot (an exec then gains nothing the caller lacks). The inheritable
    set keeps those of `keep` it has, and the ambient set with it (capset clears an ambient
    capability that is not both permitted and inheritable): under SECBIT_NOROOT they are
    what an exec passes on. The securebits stay: SECBIT_NOROOT would take `keep` from a
    root exec. Per thread, as drop_capabilities."""
    effective, permitted, inheritable = capabilities()
    if effective >> lib.CAP_SETPCAP & 1:
        _limit_bounding_set(keep)
    mask = sum(1 << cap for cap in keep)
    _capset(permitted & mask, permitted & mask, inheritable & mask)


def drop_only(drop: frozenset[int]) -> None:
    """Give up the capabilities of `drop` (effective, permitted and inheritable), keeping
    every other one held (the bounding set, which takes CAP_SETPCAP, stays)."""
    effective, permitted, inheritable = capabilities()
    mask = ~sum(1 << cap for cap in drop)
    _capset(effective & mask, permitted & mask, inheritable & mask)


def _limit_bounding_set(keep: frozenset[int]) -> None:
    cap = 0
    while lib.sv_prctl(lib.PR_CAPBSET_READ, cap, 0, 0, 0) >= 0:  # EINVAL past the last cap
        if cap not in keep:
            prctl(lib.PR_CAPBSET_DROP, cap)
        cap += 1


def capabilities() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets, as bit masks."""
    header, data = _cap_buffers()
    check(lib.sv_capget(header, data), "capget(0)")

    def mask(field: str) -> int:
        return sum(getattr(data[i], field) << 32 * i for i in range(len(data)))

    return mask("effective"), mask("permitted"), mask("inheritable")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets, as bit masks."""
    header, data = _cap_buffers()
    for i in range(len(data)):
        data[i].effective = effective >> 32 * i & 0xFFFFFFFF
        data[i].permitted = permitted >> 32 * i & 0xFFFFFFFF
        data[i].inheritable = inheritable >> 32 * i & 0xFFFFFFFF
    check(lib.sv_capset(header, data), f"capset({permitted:#x})")


def _cap_buffers() -> tuple[Any, Any]:
    """capget/capset's header (this thread) and data (zeroed), as VERSION_3 takes them."""
    header = ffi.new("struct __user_cap_header_struct *")
    header.version = lib._LINUX_CAPABILITY_VERSION_3
    header.pid = 0
    # SAFETY: cffi-owned; the caller keeps both alive across its call (VERSION_3: two structs).
    return header, ffi.new("struct __user_cap_data_struct[]", lib._LINUX_CAPABILITY_U32S_3)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of another process's fd (needs ptrace-attach rights over it)."""
    return check(lib.sv_pidfd_getfd(pidfd, target_fd, 0), f"pidfd_getfd({target_fd})")
