"""Opening a host path on the operator's behalf: regular files only, no symlink, no hang.

The monitor often runs as root, and it opens paths it was told about: the kernel, initrd and
firmware it maps into the guest, the serial output it creates, the disk images its devices
read and write, the chunk files of a snapshot it restores, the key a snapshot is signed with.
Each of these goes through open_host_file, so each gets the same defences:

- O_NOFOLLOW: the last component may not be a symlink (a link planted at /tmp/serial.log
  pointing at /etc/shadow would otherwise have root append guest output to it). Earlier
  components may be symlinks: the operator chose the path and the directories on it, so
  that is theirs to judge. Inside a snapshot directory (opened with dir_fd, plain names only,
  see snapshot/format.py File) this means no chunk file and no manifest is a symlink.
- lstat first, then O_NONBLOCK: a FIFO, socket or device is refused before it is opened where
  possible (opening some devices has side effects), and if one appears between the two steps
  the open cannot hang on it (a FIFO without a writer would block open() for ever).
- fstat of the opened fd decides: anything but a regular file is refused, with one sentence
  naming the config key and the path -- except for an output (Access.APPEND), which may also
  be a FIFO that has a reader or a character device (/dev/null, a terminal, a real serial
  line): a stream makes sense there, and O_NONBLOCK|O_NOCTTY open it without hanging or
  taking a controlling terminal. Then O_NONBLOCK is cleared again: the fd is used (or
  handed to a device process) as an ordinary blocking file.
- Files it creates (serial output, snapshot chunks) are 0600: guest output and guest memory
  are private to the operator.

connect_unix does the same for `unix:PATH` outputs: the path must be a socket (lstat), and the
connect has a short deadline, so an odd or hostile path cannot stall start-up.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from splitvmm.errors import SplitvmmError, shown

CONNECT_TIMEOUT_S = 2.0  # a local listener accepts at once; a full or stuck one is an error
# O_NOCTTY: a terminal swapped in after the lstat, opened readable by a monitor that leads
# its session, would be its controlling terminal from then on, refused by fstat or not
BASE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
NEW_FILE_MODE = 0o600
MISSING = "does not exist"


class Access(enum.Enum):
    """How a host file is opened, with the flags each way adds to BASE_FLAGS."""

    READ = os.O_RDONLY  # kernel, initrd, firmware, snapshot chunks, key files
    READ_WRITE = os.O_RDWR  # a disk image a device writes to (never created)
    APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # serial output: created 0600 if missing
    # The same in two opens that say whether it made the file (open_output_file): one that
    # makes it or fails (O_EXCL never opens what is there, symlink or FIFO, so nothing is
    # looked at before it), and one that opens only a file that is there.
    APPEND_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
    APPEND_EXISTING = os.O_WRONLY | os.O_APPEND
    CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # snapshot writer: a new file, never reused


class HostFileError(SplitvmmError):
    """A host path cannot be used: str() is one sentence naming the key and the path; reason
    alone reads after a label of the caller's ("chunk vm (vm.json): is a FIFO, ...")."""

    def __init__(self, key: str, path: str | os.PathLike[str], reason: str) -> None:
        name = os.fspath(path)
        super().__init__(f"{key}: {name if name and name.isprintable() else shown(name)} {reason}")
        self.key, self.path, self.reason = key, name, reason


class HostFileExists(HostFileError):
    """An open that was to make the file found one there (O_EXCL: EEXIST)."""


class HostFileMissing(HostFileError):
    """An open of a file that is there (no O_CREAT) found none (ENOENT)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "a file of unknown type"


def not_regular(mode: int) -> str:
    return f"is {_kind(mode)}, not a regular file"


def _usable(mode: int, access: Access) -> bool:
    """A regular file, or for an output also a FIFO or a character device (a stream)."""
    streams = (Access.APPEND, Access.APPEND_EXISTING)
    if access in streams and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return True
    return stat.S_ISREG(mode)


def _precheck(path: str, dir_fd: int | None, access: Access) -> str | None:
    """Why path is refused before opening it, or None (missing is fine when creating)."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None if access.value & os.O_CREAT else MISSING
    except OSError as e:
        return f"cannot be opened: {e.strerror}"
    return None if _usable(st.st_mode, access) else not_regular(st.st_mode)


def _open_error(e: OSError, access: Access) -> str:
    if e.errno == errno.ELOOP:
        return "is a symlink, not a regular file"
    if e.errno == errno.ENOENT and access.value & os.O_CREAT:
        return "cannot be created: its directory does not exist"
    if e.errno == errno.ENOENT:
        return MISSING
    if e.errno == errno.EISDIR:
        return "is a directory, not a regular file"
    if e.errno == errno.EEXIST:
        return "already exists"
    if e.errno == errno.ENXIO:  # a FIFO without a reader, or a socket swapped in after lstat
        return "is a FIFO that nobody reads, or not a regular file"
    return f"cannot be opened: {e.strerror}"


def _refusal(key: str, name: str, reason: str) -> HostFileError:
    """The error for `reason`: HostFileMissing where the file is not there."""
    return (HostFileMissing if reason == MISSING else HostFileError)(key, name, reason)


def open_host_file(
    path: str | os.PathLike[str],
    key: str,
    access: Access = Access.READ,
    dir_fd: int | None = None,
    flags: int = 0,
) -> int:
    """An fd (blocking, close-on-exec) of the regular file at path, relative to dir_fd if
    given, opened with `flags` besides (O_DIRECT for a disk image that asks for it);
    HostFileError naming `key` and the path otherwise. The caller closes the fd."""
    name = os.fspath(path)
    reason = None if access is Access.APPEND_NEW else _precheck(name, dir_fd, access)
    if reason is not None:
        raise _refusal(key, name, reason)
    try:
        fd = os.open(name, access.value | BASE_FLAGS | flags, NEW_FILE_MODE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise HostFileError(key, name, "is on a file system without direct I/O") from None
        reason = _open_error(e, access)
        if e.errno == errno.EEXIST:
            raise HostFileExists(key, name, reason) from None
        raise _refusal(key, name, reason) from None
    try:
        mode = os.fstat(fd).st_mode
        if not _usable(mode, access):
            raise HostFileError(key, name, not_regular(mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


OUTPUT_OPEN_TRIES = 3  # each: the file removed between the open that found it and the next


def open_output_file(path: str, key: str) -> tuple[int, bool]:
    """An output's fd (as Access.APPEND opens it), and whether this open made the file. Asked
    of the opens themselves: a look before them could see no file that another VM, starting
    at the same moment, then made, and both would take it for theirs; and one open that
    makes a missing file could not tell. So an open that makes it or fails (O_EXCL), then one
    that opens it only if it is there, again while it is removed between the two."""
    for _ in range(OUTPUT_OPEN_TRIES):
        try:
            return open_host_file(path, key, Access.APPEND_NEW), True
        except HostFileExists:
            pass
        try:
            return open_host_file(path, key, Access.APPEND_EXISTING), False
        except HostFileMissing:
            continue
    raise HostFileError(
        key,
        path,
        f"was removed each of the {OUTPUT_OPEN_TRIES} times it was found as it was opened",
    )


def same_file(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether `path` names the file open as `fd` (not a file made there since; a symlink
    there is not it)."""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _connect_error(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return "did not accept the connection in time"
    if e.errno == errno.EAGAIN:  # a listener that does not accept: its backlog is full
        return "is not accepting connections (its backlog is full)"
    return f"refused the connection: {e.strerror or e}"


def connect_unix(path: str | Path, key: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A blocking stream socket connected to the UNIX socket at path (not a symlink to one)."""
    name = os.fspath(path)
    try:
        mode = os.lstat(name).st_mode
    except OSError as e:
        reason = "does not exist" if e.errno == errno.ENOENT else f"cannot be used: {e.strerror}"
        raise HostFileError(key, name, reason) from None
    if not stat.S_ISSOCK(mode):
        raise HostFileError(key, name, f"is {_kind(mode)}, not a UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)  # non-blocking connect, waited for at most `timeout` seconds
    try:
        sock.connect(name)
        sock.setblocking(True)
    except OSError as e:
        sock.close()
        raise HostFileError(key, name, _connect_error(e)) from None
    return sock
