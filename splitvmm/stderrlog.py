"""The running VM's lines to the operator's stderr, which no thread of the VM waits on: the
monitor's log, and the launcher's lines (sandbox/launcher_server.py).

logging's StreamHandler writes each line under the handler's lock, blocking. With a stderr
nobody reads (a pipe into a reader that stalls, `2>&1 | slow`) or a terminal stopped with
Ctrl-S, the first line a vCPU thread logs (an unclaimed access, a guest's refused BAR, what a
device reports) stops that vCPU in write(2), and every other thread that logs (the supervisor,
the control worker, the coordinator) then waits for the lock. Firecracker's logger drops such
lines and counts them (its missed_log_count); crosvm writes its log from a thread of its own.
Here, as Firecracker does:

* lines go to a non-blocking line on a copy of fd 2 (fdline.py FdLine: a pipe or a
  terminal gets a description of its own, so the operator's shell and our own fd 2 stay
  blocking; a socket, journald's, is sent MSG_DONTWAIT; a regular file never waits);
* a line stderr takes none of now is dropped and counted; the next line that gets through
  says first how many were dropped, and so does close (logging.shutdown, as the monitor
  exits; the launcher's end) if it can;
* each line is a write of its own, which a pipe takes whole or not at all up to PIPE_BUF
  bytes: the launcher and the monitor write the same stderr, and the launcher wrote a batch
  of a device's lines at once, which a nearly full pipe took in part, and a line of the
  monitor's then cut the device's line in two, its tail printed with no device's name;
* the rest of a line stderr took only part of (a terminal's short write, a line longer than
  PIPE_BUF) goes first next time, so that no line of ours is cut by another of ours;
* a stderr whose reader is gone (EPIPE, a terminal hung up) takes nothing more.

The launcher writes there what each device writes to its stderr (sandbox/relay.py) and what it
says itself. A line it waited to write would stop it, and every spawn and restart the monitor
asks of it, every device's end it reports; each device's stderr pipe would fill, and a device
writing to it would stop and miss the monitor's deadline. So its lines go the same way.

What is printed once the VM has ended (its outcome, an error) goes to fd 2 as before, and
waits for room: nothing runs then that a wait could stall. So does, just before it, what the
log left unsaid (finish()): the rest of a line stderr took part of, and how many lines were
dropped; said after it (logging.shutdown), they cut into the outcome's line or came after it.

Two kinds of stderr keep the old way, lines that wait for room: one that cannot have a
description of its own (a terminal of another user's, after `su` in it, refuses the open
through /proc/self/fd), as O_NONBLOCK on the description it shares with the operator's shell
would leave the shell's terminal non-blocking after us; and, after finish(), any. A terminal
gets "\r\n": the console puts it in raw mode for the VM's life (no OPOST), where a newline
returns no carriage and each line began where the one before it ended.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import sys
from collections.abc import Sequence

from splitvmm.fdline import FdLine

log = logging.getLogger("splitvmm.stderrlog")

# Errors after which stderr may take lines again: a full file system or quota, a file at the
# process's size limit. Any other error means the reader has gone.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StderrLines:
    """Whole lines to stderr, which never wait for it (the module docstring): the monitor's log
    (StderrLog) and the launcher's lines, its own and those it relays from the devices
    (sandbox/launcher_server.py)."""

    def __init__(self, fd: int = 2, kind: str = "log", own: int | None = None) -> None:
        """Where a pipe's or terminal's own description may be opened through /proc/self/fd:
        in the monitor before it confines itself (its Landlock domain does not grant it).
        `kind` names these lines where the dropped ones are said. `own`: such a description
        of `fd`'s file, non-blocking, opened earlier by a process that could (ours now)."""
        self._kind = kind
        self._rest = b""  # of lines stderr took part of: what it has not taken yet
        self.dropped = 0  # lines stderr took none of, not yet said
        self._line: FdLine | None = None
        self._newline = "\n"
        # Lines wait for room (the module docstring): why, while they do
        self.waits: str | None = None
        try:  # the description fd 2 has now, blocking: for what waits (fd 2 may be another later)
            self._shared: int | None = os.dup(fd)
        except OSError:  # no stderr (closed): nothing is written
            self._shared = None
            return
        if os.isatty(fd):
            self._newline = "\r\n"
        if own is not None:
            self._line = FdLine(own, reopened=True)
            return
        own = os.dup(fd)
        try:
            self._line = FdLine(own, own_only=True)
        except OSError as e:
            os.close(own)
            self.waits = f"it has no description of its own ({e.strerror})"
        else:
            os.set_inheritable(own, False)  # FdLine's reopen dup2()ed over it: no child's

    def write(self, lines: Sequence[str]) -> None:
        """`lines` (each without its newline), each in a write(2) of its own: another process
        writes the same stderr (the monitor's log and the launcher's lines share it), and a
        pipe takes a write of up to PIPE_BUF bytes whole or not at all (pipe(7)), so no line
        of that size is cut by the other's. One that stderr does not take is dropped and
        counted, and said before the next that it takes."""
        for line in lines:
            self._write_line(line)

    def _write_line(self, line: str) -> None:
        if not self._send_rest():
            self.dropped += 1
            return
        if self.dropped:
            if not self._send(self._encoded(self._dropped_line(self.dropped))):
                self.dropped += 1
                return
            self.dropped = 0
            if self._rest:  # the note went in part: the line waits behind it, dropped
                self.dropped = 1
                return
        if not self._send(self._encoded(f"{line}\n")):
            self.dropped = 1

    def finish(self) -> None:
        """The VM has ended (`up`, before its outcome or error): the rest of a line and how
        many were dropped are said, and every line from now on, waiting for room as the
        outcome does."""
        if self._line is not None:
            self._line.close()
            self._line = None
        self.waits = self.waits or "the VM has ended"
        unsaid, self._rest = self._rest + self._encoded(self._dropped_line(self.dropped)), b""
        self.dropped = 0
        self._write(unsaid)

    def close(self) -> None:
        """What was dropped is said, if it can be (the process is ending)."""
        if self._send_rest() and self.dropped:
            self._send(self._encoded(self._dropped_line(self.dropped)))
        if self._line is not None:
            self._line.close()
            self._line = None
        if self._shared is not None:
            os.close(self._shared)
            self._shared = None

    def _encoded(self, text: str) -> bytes:
        return text.replace("\n", self._newline).encode(errors="replace")

    def _send_rest(self) -> bool:
        """Whether nothing is left of earlier lines (what was left went now)."""
        if self._rest:
            n = self._write(self._rest)
            self._rest = self._rest[n:]
        return not self._rest

    def _send(self, data: bytes) -> bool:
        """Whether stderr took `data`, or a part of it (the rest goes first next time)."""
        n = self._write(data)
        self._rest = data[n:] if n else b""
        return n > 0

    def _write(self, data: bytes) -> int:
        """The bytes stderr took now, without waiting (unless lines wait); 0 when it took
        none or is gone."""
        if self.waits is not None:
            return self._write_waiting(data)
        if self._line is None:
            return 0
        try:
            return self._line.send(memoryview(data))
        except OSError as e:
            if e.errno not in _FULL:
                self._line.close()
                self._line = None  # the reader has gone: nothing reaches it again
            return 0

    def _write_waiting(self, data: bytes) -> int:
        """All of `data`, however long stderr takes; a reader gone loses it. The description
        may be non-blocking all the same: a device's output on stdio that could not be
        reopened either (FdLine's fallback) made it so, and EAGAIN is waited out, not lost."""
        done = 0
        with contextlib.suppress(OSError):
            while self._shared is not None and done < len(data):
                try:
                    done += os.write(self._shared, data[done:])
                except BlockingIOError:
                    room = select.poll()
                    room.register(self._shared, select.POLLOUT)
                    room.poll()
        return len(data)

    def _dropped_line(self, dropped: int) -> str:
        if not dropped:
            return ""
        lines = "line" if dropped == 1 else "lines"
        return f"splitvmm: {dropped} {self._kind} {lines} dropped: stderr was not taking them\n"


class StderrLog(logging.Handler):
    """A logging handler whose emit never blocks (the module docstring)."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.lines = StderrLines(fd)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's contract: a record that cannot be formatted is reported
            self.handleError(record)
            return
        self.lines.write([line])

    def finish(self) -> None:
        """StderrLines.finish, between other threads' lines."""
        self.acquire()
        try:
            self.lines.finish()
        finally:
            self.release()

    def close(self) -> None:
        """As the monitor exits (logging.shutdown): what was dropped is said, if it can be."""
        self.acquire()
        try:
            self.lines.close()
        finally:
            self.release()
        super().close()


def install(fd: int = 2) -> StderrLog | None:
    """Put a StderrLog, with the same format and level, in place of the root logger's handler
    on sys.stderr (cli/root.py); None where there is none (a test's logging, in process)."""
    root = logging.getLogger()
    for old in root.handlers:
        if type(old) is logging.StreamHandler and old.stream is sys.stderr:
            new = StderrLog(fd)
            new.setFormatter(old.formatter)
            new.setLevel(old.level)
            root.removeHandler(old)
            root.addHandler(new)
            if new.lines.waits is not None:
                log.warning("stderr: %s: log lines wait for it to take them", new.lines.waits)
            return new
    return None
