"""The VM's private runtime directory: device channels (and later the control socket).

`$XDG_RUNTIME_DIR/splitvmm/<name>/`, else `/run/splitvmm/<name>/` for root, else
a directory under the system temp dir; mode 0700. A relative XDG_RUNTIME_DIR is
ignored, as the XDG Base Directory spec asks (it would make the directory under
whatever the cwd is, and the launcher refuses a relative path anyway), and so is one
that another user owns or may write to (_xdg_problem). A lock file
held for the VM's lifetime tells a second `up` with the same name that the first
still runs.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from splitvmm.errors import SplitvmmError
from splitvmm.hostpath import same_file

log = logging.getLogger("splitvmm.rundir")

MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1


def runtime_root() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        real = os.path.realpath(xdg)  # what a symlink named when we looked, used from now on
        problem = _xdg_problem(real)
        if problem is None:
            return Path(real) / "splitvmm"
        log.warning("XDG_RUNTIME_DIR=%r %s: ignored", xdg, problem)
    elif xdg:
        log.warning("XDG_RUNTIME_DIR=%r is not an absolute path: ignored", xdg)
    if os.geteuid() == 0:
        return Path("/run/splitvmm")
    return Path(os.path.realpath(tempfile.gettempdir())) / f"splitvmm-{os.geteuid()}"


def _xdg_problem(real: str) -> str | None:
    """Why XDG_RUNTIME_DIR (its real path) is not ours to use, or None. The XDG Base Directory
    spec: it must be owned by the user, who alone may write to it. One another user owns or
    may write to, or could replace (untrusted_component), as root inherits it through
    `sudo -E` or `su` without `-`, would let that user swap our splitvmm/ beneath it for a
    symlink between our checks and our use: the control socket's signing keys sent to their
    socket, the runtime dir's removal made in a directory of their choosing."""
    if problem := untrusted_component(real):
        return problem
    try:
        st = os.stat(real)
    except OSError:
        return None  # not made yet (RuntimeDir makes it ours), or a file in the way: named there
    if not stat.S_ISDIR(st.st_mode):
        return None
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def untrusted_component(path: str | os.PathLike[str]) -> str | None:
    """Where another user could change what `path` (a real path when it was looked up) names,
    or None: a directory on the way that is a symlink (one put there since), that is neither
    root's nor ours, or that others may write to (its group included) without the sticky bit
    (which keeps them from renaming or removing our entries, as in /tmp). Inside a user
    namespace, a directory of a user it does not map (the host's root, as / and /tmp)
    cannot be told from another's: it is taken on trust down to the first directory others
    may write to, and nowhere below one, where any user could have made it. (So another
    host user's shared directory that lies there, not below one, passes in a namespace.)
    The components not made yet are left to be made ours."""
    parts = Path(path).parts
    unmapped = _unmapped_uid()
    for depth in range(1, len(parts)):  # the directories above the last component
        directory = os.path.join(*parts[:depth])
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            return None
        except OSError:
            return None  # one we may not search: whoever makes the path below names it
        if stat.S_ISLNK(st.st_mode):
            return f"lies under {directory}, a symlink put there since it was looked up"
        if st.st_uid not in (0, os.geteuid(), unmapped):
            return f"lies in {directory}, which belongs to uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if not st.st_mode & stat.S_ISVTX:
                mode = stat.S_IMODE(st.st_mode)
                return f"lies in {directory}, which other users may write to (mode {mode:04o})"
            unmapped = None  # below a shared directory: an unmapped owner may be anyone
    return None


@functools.cache
def _unmapped_uid() -> int | None:
    """The uid that a user our user namespace does not map reads as (overflowuid), or None
    where every user is mapped (no user namespace)."""
    try:
        with open("/proc/self/uid_map") as f:
            uid_map = f.read()
        with open("/proc/sys/kernel/overflowuid") as f:
            overflow = int(f.read())
    except (OSError, ValueError):
        return None
    return unmapped_uid(uid_map, overflow)


def unmapped_uid(uid_map: str, overflow: int) -> int | None:
    """`overflow`, unless a range of `uid_map` (/proc/PID/uid_map: inside, outside, count per
    line) maps it: then it names a user of the namespace's own (rootless podman's nobody)."""
    for line in uid_map.splitlines():
        inside, _outside, count = (int(field) for field in line.split())
        if inside <= overflow < inside + count:
            return None
    return overflow


def _check_trusted(root: Path) -> None:
    if problem := untrusted_component(root):
        raise SplitvmmError(
            f"the runtime directory's root {root} {problem}: set XDG_RUNTIME_DIR to a "
            "directory of yours"
        )


def _check_ours(path: Path) -> None:
    """A directory we own (not a symlink), private to us: the fallback root lives in a
    shared temp dir, where another user could have made it first to hijack our sockets."""
    if stat.S_IMODE(_check_owned(path).st_mode) != 0o700:
        os.chmod(path, 0o700)


def check_private(path: Path) -> None:
    """What a client (`splitvmm ctl`) checks before it trusts a socket under `path`: a
    directory we own, that no other user may write to (as `up` leaves it). Else another
    local user could have put a socket there first and be sent our requests, a snapshot's
    signing key among them."""
    st = _check_owned(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SplitvmmError(f"{path} may be written by other users: refusing to use it")


def _check_owned(path: Path) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SplitvmmError(f"{path} is not a directory owned by this user: refusing to use it")
    return st


def check_socket_path(path: Path, what: str, device_named: bool = False) -> None:
    """The one check of a socket path in the runtime dir (a device's channel, the control
    socket): past sun_path's size, bind() fails with a bare OSError, after devices started.
    `device_named`: a device's name is part of the path, and shortening it helps too."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return
    names = "vm.name, device name" if device_named else "vm.name"
    raise SplitvmmError(
        f"{what} {path} is longer than a UNIX socket allows ({MAX_SOCKET_PATH} bytes): "
        f"use a shorter {names} or XDG_RUNTIME_DIR"
    )


def _make_dir(path: Path, parents: bool) -> None:
    """mkdir, its failure one SplitvmmError naming the path (`up` prints it as one line): a
    read-only XDG_RUNTIME_DIR, one we may not write to, a file where the directory goes."""
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except FileExistsError:  # (exist_ok: only at `path`, by something not a directory)
        raise SplitvmmError(
            f"cannot make the runtime directory {path}: something that is not a directory is there"
        ) from None
    except OSError as e:
        raise SplitvmmError(
            f"cannot make the runtime directory {path}: {e.strerror or e}"
        ) from None


class RuntimeDir:
    def __init__(self, name: str, root: Path | None = None, enterable: bool = False) -> None:
        """`enterable`: 0711, not 0700, for devices that run as another user (config.py
        vm.device_uid): each enters it as root before it switches, and must then look its
        channel's name up in it (sandbox/device.py); the root above stays 0700, so no one
        else reaches it."""
        root = root or runtime_root()
        self.path = root / name
        self._lock_fd = -1
        try:  # the launcher takes it as UTF-8 (sandbox/launcher_server.py), the devices too
            os.fsencode(self.path).decode()
        except UnicodeDecodeError:
            raise SplitvmmError(
                f"the runtime directory {os.fsencode(self.path)!r} is not UTF-8: "
                "set XDG_RUNTIME_DIR to a UTF-8 path"
            ) from None
        try:
            self._take(root, name)
            if enterable:
                os.chmod(self.path, 0o711)
        except OSError as e:  # what _make_dir does not name: a chmod, the lock file, a stale
            # socket on a file system that turned read-only under an existing directory
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            where = e.filename if e.filename is not None else self.path
            raise SplitvmmError(
                f"cannot use the runtime directory {where}: {e.strerror or e}"
            ) from None

    def _take(self, root: Path, name: str) -> None:
        # Before we make anything there, and again after: runtime_root() checked
        # XDG_RUNTIME_DIR, but one not there yet, in a sticky directory others may write to,
        # is theirs if they make it first (a directory, or a symlink to one of ours). One
        # they make between the two checks holds an empty splitvmm/ of ours, refused.
        _check_trusted(root)
        _make_dir(root, parents=True)
        _check_trusted(root)
        _check_ours(root)
        while True:
            _make_dir(self.path, parents=False)
            _check_ours(self.path)
            lock = self.path / "lock"
            # O_NOFOLLOW: same_file compares the path itself; through a symlink the two
            # never agree, and this loop would retry for ever
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._lock_fd = os.open(lock, flags, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = -1
                raise SplitvmmError(
                    f"a VM named {name!r} is already running ({self.path})"
                ) from None
            if same_file(self._lock_fd, lock):
                break
            # The VM of this name that held it ended between our open and our flock: its
            # close() removed the file (and the directory) before it let the lock go, so ours
            # is a lock on a file no other `up` can see. Take the one there now.
            os.close(self._lock_fd)
            self._lock_fd = -1
        # Left over from a VM that died without cleaning up: channels are per run, and so
        # are warm spares' sockets (a stale one made every spare of the next run fail to bind).
        # (A VM that has just ended may be removing them too.)
        for pattern in ("*.sock", "*.sock.spare"):
            for stale in self.path.glob(pattern):
                stale.unlink(missing_ok=True)
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
