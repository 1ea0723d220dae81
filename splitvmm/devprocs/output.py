"""A device's output: a bounded transmit buffer in front of a line that may be slow.

Back-pressure, not death. A device that produces output (the 8250's transmitter
today, any console tomorrow) must never block on its output fd: a `unix:`
listener that stops reading, a full pipe or a terminal stopped with Ctrl-S would
stop the device's one event loop, the device would miss the monitor's read
deadline and the VM would end. So:

* the line never blocks (FdLine, fdline.py): a socket is written with MSG_DONTWAIT; a
  pipe, terminal or character device gets a file description of its own, opened
  non-blocking through /proc/self/fd, because O_NONBLOCK on the description we
  were handed would make the monitor's stdout non-blocking too (and the
  operator's shell, after us); a regular file never blocks;
* what the line does not take waits in a buffer of CAPACITY bytes
  (BoundedOutput); the runtime flushes it when the fd polls writable, and tells
  the device that there is room again (Device.output_room);
* the device sees the buffer the way a UART sees a slow line: room() is what
  its status register reports, and put() takes only what fits. A driver that
  waits for room loses nothing; the device counts what a driver that does not
  wait loses.

Across a crash restart (monitor/slot.py) the buffer counts what left it, `emitted`
(carried over from the dead process's checkpoint), and drops the first `skip` bytes
it would send: the bytes the dead process had written already, which the new one
produces again when it re-applies the frames after its checkpoint.

While the device is quiesced for a snapshot the buffer is `held`: nothing
leaves, since the buffered bytes are part of the state being saved, and a VM
suspended to disk sends them once, after its restore.
"""

from __future__ import annotations

import errno
import logging
import select
import time
from typing import Protocol

from splitvmm.fdline import FdLine

log = logging.getLogger("splitvmm.dev.output")

# A write that found the file's file system (or quota, or size limit) full: the bytes are
# lost, the line is not; it takes output again once the operator makes room.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CAPACITY = 4096  # a few KiB: a burst of console output, not a log file's worth
# On the last SYNC (wire.DRAIN: the monitor's request before it ends a device) the device
# waits this long at most for a slow line to take its buffered bytes: below the monitor's read
# deadline (monitor/channel.py READ_TIMEOUT_MS), which a device must never miss.
FLUSH_TIMEOUT_MS = 1000


class Line(Protocol):
    def send(self, data: memoryview) -> int:
        """Bytes the line took now, 0 when it is full; OSError when it is gone."""
        ...

    def fileno(self) -> int: ...


class BoundedOutput:
    """CAPACITY bytes waiting for a line; no line: the bytes go nowhere, at once."""

    def __init__(self, line: Line | None = None, capacity: int = CAPACITY) -> None:
        self.line = line
        self.capacity = capacity
        self.held = False  # quiesced: keep every byte (see the module docstring)
        self.emitted = 0  # bytes that left the buffer, over the device's life (restarts too)
        self.skip = 0  # bytes to drop unsent: a dead process of the device sent them already
        self.lost = 0  # of `emitted`, bytes a full file system did not take (_FULL)
        self._buf = bytearray()
        self._full = False  # the line's file system was full at the last write (_FULL)

    def room(self) -> int:
        return self.capacity - len(self._buf)

    def pending(self) -> int:
        return len(self._buf)

    def buffered(self) -> bytes:
        return bytes(self._buf)

    def immediate(self) -> bool:
        """Whether a byte put() while nothing is buffered leaves at once, whole: there is no
        line, or it is a regular file (FdLine.whole_writes), and the buffer is not held."""
        whole = self.line is None or isinstance(self.line, FdLine) and self.line.whole_writes
        return not self.held and whole

    def counted(self) -> bool:
        """Whether the monitor can count what the line took: there is no line, or it is a
        regular file, whose growth the monitor reads (monitor/slot.py). A restart then sends
        no byte twice, however far back its checkpoint is."""
        return self.line is None or (isinstance(self.line, FdLine) and self.line.counted)

    def put(self, data: bytes) -> int:
        """Take as much of `data` as fits; the number of bytes taken."""
        taken = data[: self.room()]
        was_empty = not self._buf
        self._buf += taken
        if was_empty:  # otherwise the line was full: the runtime flushes when it is writable
            self.flush()
        return len(taken)

    def wants_flush(self) -> bool:
        return bool(self._buf) and self.line is not None and not self.held

    def flush(self) -> int:
        """Give the line what it takes now; the bytes that left the buffer."""
        if self.line is None:
            return self._discard()
        if self.held:
            return 0
        sent = self._skip()
        while self._buf:
            try:
                with memoryview(self._buf) as view:
                    n = self.line.send(view)
            except OSError as e:
                if e.errno in _FULL:  # no room on the file's file system now: not gone
                    if not self._full:
                        log.warning("output file: %s; discarding output until it has room",
                                    e.strerror)  # fmt: skip
                    self._full = True
                    self.lost += len(self._buf)
                    return sent + self._discard()
                # the reader went away: output goes nowhere from now on
                log.warning("output line closed (%s); discarding output", e.strerror)
                self.line = None
                return sent + self._discard()
            self._full = False
            if n == 0:
                break
            del self._buf[:n]
            sent += n
            self.emitted += n
        return sent

    def taken(self) -> int:
        """The bytes the line took (a counted file's growth, what a restart's skip is measured
        against: monitor/slot.py): `emitted` less what a full file system lost."""
        return self.emitted - self.lost

    def _skip(self) -> int:
        n = min(self.skip, len(self._buf))
        if n:
            del self._buf[:n]
            self.skip -= n
            self.emitted += n
        return n

    def drain(self, timeout_ms: int = FLUSH_TIMEOUT_MS) -> int:
        """flush(), waiting up to timeout_ms for a slow line; the bytes that left."""
        deadline = time.monotonic() + timeout_ms / 1000
        sent = self.flush()
        poller = select.poll()
        while self.wants_flush() and self.line is not None:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            poller.register(self.line.fileno(), select.POLLOUT)
            if poller.poll(left_ms):
                sent += self.flush()
        return sent

    def _discard(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        self.emitted += n
        return n
