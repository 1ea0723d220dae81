"""A non-blocking writer on an inherited fd that leaves the description it was handed as it
was: a device's output line (devprocs/output.py) and the monitor's log on stderr
(stderrlog.py), neither of which may wait for a reader.

A socket is written with MSG_DONTWAIT; a pipe, terminal or character device gets a file
description of its own, opened non-blocking through /proc/self/fd, because O_NONBLOCK on
the description we were handed would make the monitor's stdout or stderr non-blocking too
(and the operator's shell, after us); a regular file never blocks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat

from splitvmm.native import files

log = logging.getLogger("splitvmm.fdline")


class FdLine:
    """A non-blocking writer on an inherited fd. Built before the sandbox: it may reopen."""

    def __init__(
        self, fd: int, shared: bool = False, own_only: bool = False, reopened: bool = False
    ) -> None:
        """`shared`: a regular file another device writes too, whose growth the monitor
        does not count (protocol/models.py OUTPUT_SHARED). `own_only`: a pipe, terminal or
        device that cannot be reopened is an OSError, not made non-blocking as shared.
        `reopened`: `fd` is such a description of our own already, opened non-blocking while
        we could (sandbox/launcher_start.py)."""
        self.fd = fd
        self._sock: socket.socket | None = None
        mode = os.fstat(fd).st_mode
        # A regular file takes each write whole, at once (BoundedOutput.immediate): a device
        # may promise what its status registers read after a write (monitor/mirror.py).
        self.whole_writes = stat.S_ISREG(mode)
        self.counted = self.whole_writes and not shared  # BoundedOutput.counted
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=fd)  # for send(MSG_DONTWAIT); kept for our life
        elif not stat.S_ISREG(mode) and not reopened:
            _own_nonblocking_description(fd, own_only)

    def send(self, data: memoryview) -> int:
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            n = os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            # The reader went away, and BoundedOutput drops this line. A socket object that
            # is finalized unclosed warns, naming itself through getsockname, which a
            # device's filter forbids (SIGSYS): the fd stays open, as a pipe's does, and no
            # object is left to finalize.
            if self._sock is not None:
                self._sock.detach()
                self._sock = None
            raise
        # A short write to a regular file (full, or at its size limit): the bytes it took are in
        # the file and counted so (BoundedOutput.lost); the next write, at once, fails
        # (ENOSPC, EFBIG), and nothing stays buffered.
        return n

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the object owns the fd
            self._sock = None
        else:
            os.close(self.fd)


def _own_nonblocking_description(fd: int, own_only: bool) -> None:
    """Replace `fd` by a non-blocking open of the same pipe, terminal or device."""
    error = files.reopen_write_only(fd, os.O_NONBLOCK | os.O_CLOEXEC)
    if error is not None and own_only:
        raise error
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if error is None or flags & os.O_NONBLOCK:
        return  # ours; or non-blocking already: the monitor's own of its stdout (devicefds.py)
    log.warning(
        "fd %d: cannot reopen it (%s); making it non-blocking as shared", fd, error.strerror
    )
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
