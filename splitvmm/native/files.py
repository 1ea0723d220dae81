"""File operations the standard library lacks: fallocate(2) with a mode (a virtio-blk
device's discard and write-zeroes punch holes in, or zero ranges of, its disk image),
byte-range locks of an open file description (a disk image's lock as QEMU takes it: the
standard library's fcntl would need struct flock packed by hand), a write-only
description of an fd shared read-write (a device's output and its stderr), and the start of a
file's writeback and the wait for the writeback under way (sync_file_range(2): a snapshot's
RAM file, a restarted virtio-blk device's look for a write-back error)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from splitvmm.native._sys import ffi, lib

FALLOC_FL_KEEP_SIZE: int = lib.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE: int = lib.FALLOC_FL_PUNCH_HOLE  # needs KEEP_SIZE with it
FALLOC_FL_ZERO_RANGE: int = lib.FALLOC_FL_ZERO_RANGE
SYNC_FILE_RANGE_WRITE: int = lib.SYNC_FILE_RANGE_WRITE  # start the writes, wait for none
SYNC_FILE_RANGE_WAIT_BEFORE: int = lib.SYNC_FILE_RANGE_WAIT_BEFORE  # wait, start nothing


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError (EOPNOTSUPP where the file system cannot) naming the call."""
    if lib.sv_fallocate(fd, mode, offset, length) < 0:
        err = ffi.errno
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length})")


def start_writeback(fd: int) -> None:
    """Start writing the dirty pages of `fd`'s file to its disk, without waiting for them
    (sync_file_range(SYNC_FILE_RANGE_WRITE) over the whole file): a later fsync then waits
    for what was written since, not for all of it. No durability of its own (the metadata,
    the disk's cache): only fsync gives that."""
    _sync_file_range(fd, SYNC_FILE_RANGE_WRITE)


def wait_writeback(fd: int) -> None:
    """Wait for the writes of `fd`'s file to its disk that are under way, starting none
    (sync_file_range(SYNC_FILE_RANGE_WAIT_BEFORE) over the whole file). OSError with the
    write-back error, if any, that this open file description has not been told of yet, as
    fsync would report it: the kernel keeps one such mark per description (errseq), so a
    description opened before a failure learns of it even after another description's fsync
    took the failure. Nothing is made durable."""
    _sync_file_range(fd, SYNC_FILE_RANGE_WAIT_BEFORE)


def _sync_file_range(fd: int, flags: int) -> None:
    """sync_file_range(2) over the whole file; OSError naming the call."""
    if lib.sv_sync_file_range(fd, 0, 0, flags) < 0:
        err = ffi.errno
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


def ofd_read_lock(fd: int, start: int, length: int) -> None:
    """A shared (F_RDLCK) lock of `fd`'s open file description on `length` bytes at `start`
    (F_OFD_SETLK): it lasts until that description's last fd closes, whichever process
    holds it, and no close of another description of the file ends it (as one would end a
    process's F_SETLK lock). OSError: EAGAIN or EACCES where another holds a write lock
    there; EINVAL where the kernel has no OFD locks; ENOLCK or EOPNOTSUPP where the file
    system has none."""
    _ofd_setlk(fd, "F_RDLCK", start, length)


def ofd_write_lock(fd: int, start: int, length: int) -> None:
    """An exclusive (F_WRLCK) lock of `fd`'s open file description on `length` bytes at
    `start` (F_OFD_SETLK), which `fd` must be open for writing to take; OSError as
    ofd_read_lock says (EAGAIN or EACCES: another holds a lock there)."""
    _ofd_setlk(fd, "F_WRLCK", start, length)


def ofd_unlock(fd: int, start: int, length: int) -> None:
    """Drop `fd`'s description's locks on `length` bytes at `start` (F_OFD_SETLK, F_UNLCK)."""
    _ofd_setlk(fd, "F_UNLCK", start, length)


def _ofd_setlk(fd: int, kind: str, start: int, length: int) -> None:
    """F_OFD_SETLK of lock type `kind` (its fcntl name) on `length` bytes at `start`; OSError
    naming the call."""
    if lib.sv_ofd_setlk(fd, getattr(fcntl, kind), start, length) < 0:
        err = ffi.errno
        raise OSError(err, f"F_OFD_SETLK({kind}, {start}, {length}): {os.strerror(err)}")


def ofd_locked_by_another(fd: int, start: int, length: int) -> bool:
    """Whether another open file description (or a process's F_SETLK lock) holds any lock
    on `length` bytes at `start`: F_OFD_GETLK asked for a write lock there, as QEMU asks.
    `fd`'s own locks do not count. OSError as ofd_read_lock says."""
    held = lib.sv_ofd_getlk(fd, fcntl.F_WRLCK, start, length)
    if held < 0:
        err = ffi.errno
        raise OSError(err, f"F_OFD_GETLK(F_WRLCK, {start}, {length}): {os.strerror(err)}")
    return bool(held != fcntl.F_UNLCK)


def nonblocking_description(fd: int) -> int | None:
    """A new fd, close-on-exec, on a non-blocking write-only description of our own of the
    pipe, terminal or device behind `fd` (reopen_write_only), which stays as it is: for
    writes that never wait, made while this process may open the file (a root launcher, a
    monitor before it confines itself). None for a regular file (written whole; it needs
    none) or what cannot be opened anew (a socket; a terminal of another user's we may not)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    own = os.dup(fd)
    if reopen_write_only(own, os.O_NONBLOCK | os.O_CLOEXEC) is not None:
        os.close(own)
        return None
    os.set_inheritable(own, False)  # reopen_write_only's dup2 made it inheritable
    return own


def reopen_write_only(fd: int, flags: int = 0) -> OSError | None:
    """Replace `fd` by a write-only open of the same pipe, terminal or device (through
    /proc/self/fd), with `flags` and the O_APPEND it had: a description of our own, through
    which nothing can be read. The error where that cannot be done (a socket), `fd` as it was.
    O_NOCTTY: a device leads its own session, and opening a terminal would make it ours.

    Only an fd open for writing already is reopened: the open through /proc/self/fd checks
    the file's permissions against this process, not how `fd` was opened, so an fd its
    sender could open where it may not write would come back writable: O_PATH, and access
    mode 3 (O_WRONLY|O_RDWR: ioctls only, for a terminal or a device node), both of which
    Landlock lets through, and O_RDONLY. EBADF for those, as a write to them would say."""
    now = fcntl.fcntl(fd, fcntl.F_GETFL)
    if now & os.O_PATH or now & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
        return OSError(errno.EBADF, f"fd {fd} is not open for writing")
    want = os.O_WRONLY | os.O_NOCTTY | flags | (now & os.O_APPEND)
    try:
        own = os.open(f"/proc/self/fd/{fd}", want)
    except OSError as e:
        return e
    os.dup2(own, fd)
    os.close(own)
    return None
