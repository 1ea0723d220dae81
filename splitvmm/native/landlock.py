"""Landlock: rulesets that handle every file-system access right and grant few or none.

The rights a ruleset may handle depend on the running kernel's Landlock ABI,
probed with LANDLOCK_CREATE_RULESET_VERSION (a kernel rejects a ruleset that
names a right it does not know); the bits come from <linux/landlock.h> through
the cffi module built by _build_sys.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from splitvmm.native._sys import ffi, lib

# The file-system rights each ABI version added (Documentation/userspace-api/landlock.rst).
_FS_RIGHTS_BY_ABI: dict[int, int] = {
    1: (
        lib.LANDLOCK_ACCESS_FS_EXECUTE
        | lib.LANDLOCK_ACCESS_FS_WRITE_FILE
        | lib.LANDLOCK_ACCESS_FS_READ_FILE
        | lib.LANDLOCK_ACCESS_FS_READ_DIR
        | lib.LANDLOCK_ACCESS_FS_REMOVE_DIR
        | lib.LANDLOCK_ACCESS_FS_REMOVE_FILE
        | lib.LANDLOCK_ACCESS_FS_MAKE_CHAR
        | lib.LANDLOCK_ACCESS_FS_MAKE_DIR
        | lib.LANDLOCK_ACCESS_FS_MAKE_REG
        | lib.LANDLOCK_ACCESS_FS_MAKE_SOCK
        | lib.LANDLOCK_ACCESS_FS_MAKE_FIFO
        | lib.LANDLOCK_ACCESS_FS_MAKE_BLOCK
        | lib.LANDLOCK_ACCESS_FS_MAKE_SYM
    ),
    2: lib.LANDLOCK_ACCESS_FS_REFER,
    3: lib.LANDLOCK_ACCESS_FS_TRUNCATE,
    5: lib.LANDLOCK_ACCESS_FS_IOCTL_DEV,
}


class LandlockUnavailable(OSError):
    """The kernel has no Landlock, or it is disabled at boot (`lsm=` without landlock)."""


def abi_version() -> int:
    """The running kernel's Landlock ABI version; LandlockUnavailable if there is none."""
    ret = lib.sv_landlock_create_ruleset(ffi.NULL, 0, lib.LANDLOCK_CREATE_RULESET_VERSION)
    if ret < 0:
        err = ffi.errno
        if err in (errno.ENOSYS, errno.EOPNOTSUPP):
            raise LandlockUnavailable(err, "landlock_create_ruleset: Landlock is not enabled")
        raise OSError(err, f"landlock_create_ruleset(VERSION): {os.strerror(err)}")
    return int(ret)


def fs_rights(abi: int) -> int:
    """Every file-system access right the given ABI knows."""
    rights = 0
    for version, bits in _FS_RIGHTS_BY_ABI.items():
        if version <= abi:
            rights |= bits
    return rights


REMOVE_DIR = int(lib.LANDLOCK_ACCESS_FS_REMOVE_DIR)  # on a parent: rmdir (or rename) a child dir


# Rights that make sense on a directory hierarchy we only read (imports, tracebacks).
def read_rights() -> int:
    return int(lib.LANDLOCK_ACCESS_FS_READ_FILE | lib.LANDLOCK_ACCESS_FS_READ_DIR)


def exec_rights() -> int:
    """Run a program: execve opens it for reading and executing."""
    return int(lib.LANDLOCK_ACCESS_FS_READ_FILE | lib.LANDLOCK_ACCESS_FS_EXECUTE)


def remove_rights() -> int:
    """List a hierarchy and remove what is in it (a tear-down): nothing is made or read."""
    return int(lib.LANDLOCK_ACCESS_FS_READ_DIR | lib.LANDLOCK_ACCESS_FS_REMOVE_FILE | REMOVE_DIR)


def new_files_rights() -> int:
    """Make directories and regular files, write them, rename and remove them (a snapshot
    writer): no file is read, no link, device, FIFO or socket is made, nothing is moved in
    from elsewhere (no REFER). Landlock cannot tell a new file from an old one: the files
    already beneath may be written and removed too, and truncated under ABI < 3 (which has
    no truncate right to withhold)."""
    return remove_rights() | int(
        lib.LANDLOCK_ACCESS_FS_MAKE_DIR
        | lib.LANDLOCK_ACCESS_FS_MAKE_REG
        | lib.LANDLOCK_ACCESS_FS_WRITE_FILE
    )


def restrict_self_deny_all() -> int:
    """Confine the calling thread (and the threads it creates later): no file-system access.

    Needs no_new_privs (or CAP_SYS_ADMIN). Landlock is per thread: threads that
    already exist are not confined, so call this before starting any. Returns
    the ABI version used.
    """
    return restrict_self({})


def restrict_self(beneath: Mapping[str, int] | Mapping[int, int]) -> int:
    """Confine the calling thread (and the threads it creates later) to `beneath`:
    path (or an open fd) -> the rights granted on everything under it (masked to what this
    ABI knows); every other file-system access is denied. Returns the ABI version."""
    abi = abi_version()
    handled = fs_rights(abi)
    attr = ffi.new("struct landlock_ruleset_attr *")
    attr.handled_access_fs = handled
    # SAFETY: `attr` is a cffi-owned struct alive for the whole call; the kernel copies it.
    fd = lib.sv_landlock_create_ruleset(attr, ffi.sizeof(attr[0]), 0)
    if fd < 0:
        err = ffi.errno
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for path, rights in beneath.items():
            _add_path_rule(fd, path, rights & handled)
        if lib.sv_landlock_restrict_self(fd, 0) < 0:
            err = ffi.errno
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)
    return abi


def _add_path_rule(ruleset_fd: int, path: str | int, rights: int) -> None:
    """A rule for `path`, or for the file an fd given as `path` refers to (opened earlier, as
    the device warden's program, which its file system may no longer show by name)."""
    target = path if isinstance(path, int) else os.open(path, os.O_PATH | os.O_CLOEXEC)
    if stat.S_ISREG(os.fstat(target).st_mode):  # a file takes only the rights of files
        rights &= _FILE_RIGHTS
    try:
        rule = ffi.new("struct landlock_path_beneath_attr *")
        rule.allowed_access = rights
        rule.parent_fd = target
        # SAFETY: `rule` is cffi-owned and alive for the call; the kernel copies it.
        if lib.sv_landlock_add_rule(ruleset_fd, lib.LANDLOCK_RULE_PATH_BENEATH, rule, 0) < 0:
            err = ffi.errno
            raise OSError(err, f"landlock_add_rule({path!r}): {os.strerror(err)}")
    finally:
        if not isinstance(path, int):
            os.close(target)


_FILE_RIGHTS = (
    lib.LANDLOCK_ACCESS_FS_EXECUTE
    | lib.LANDLOCK_ACCESS_FS_WRITE_FILE
    | lib.LANDLOCK_ACCESS_FS_READ_FILE
    | lib.LANDLOCK_ACCESS_FS_TRUNCATE
    | lib.LANDLOCK_ACCESS_FS_IOCTL_DEV
)
