"""The host side of the serial console: stdin (raw when a TTY) -> the serial device.

The device writes guest output straight to its output fd; input comes back
through the monitor so that the escape key (Ctrl-A x quits, Ctrl-A Ctrl-A sends
Ctrl-A) works whatever the device does. Input goes no faster than the device has
room for it (pump()): what the guest has not read yet waits on the host side.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import termios
import tty
from collections.abc import Callable, Iterator

log = logging.getLogger("splitvmm.console")

CTRL_A = 0x01
READ_SIZE = 4096  # a read of the operator's input
# Input the device had no room for is offered again this often (it says its room in events
# the monitor reads around its requests: monitor/slot.py input()); at most PENDING_MAX bytes
# of it wait here before the input is read no further.
RETRY_S = 0.02
PENDING_MAX = 64 * 1024


class EscapeParser:
    """Splits input into bytes for the guest and the quit command (pure, unit-tested)."""

    def __init__(self) -> None:
        self._armed = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        for b in data:
            if self._armed:
                self._armed = False
                if b in (ord("x"), ord("X")):
                    return bytes(out), True
                if b == CTRL_A:
                    out.append(CTRL_A)
                continue  # unknown escape: swallowed, as QEMU's mux does
            if b == CTRL_A:
                self._armed = True
            else:
                out.append(b)
        return bytes(out), False


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Put a TTY in raw mode for the VM's lifetime; yields whether it is a TTY."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield True
    finally:
        _restore(fd, saved)


def _restore(fd: int, saved: list[int | list[bytes | int]]) -> None:
    """`saved` is tcgetattr's [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]."""
    try:
        # TCSAFLUSH: input not read by now (keys typed at the end, a terminal's answer to
        # a query the guest wrote) is dropped, not handed to the shell as commands.
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
    except termios.error as e:
        # A terminal that hung up (closed window, dropped ssh) has no mode left to restore;
        # the SIGHUP that came with it is what ends the VM, with its own message.
        if e.args[0] != errno.EIO:
            raise


def pump(
    fd: int | None, wake_fd: int, deliver: Callable[[bytes], int | None], escape: bool
) -> bool:
    """Forward input from `fd` until `wake_fd` fires. Returns True if the user asked to quit.

    `deliver(data)` sends what the console device has room for, from the front of `data`,
    and says how many bytes that was (monitor/slot.py input()): 0 while it has no room,
    None once it will never take input again. What it did not take waits here and is
    offered again every RETRY_S; past PENDING_MAX bytes waiting, `fd` is not read until the
    guest has taken some, so a paste waits in the terminal or the pipe, not lost. The escape
    (Ctrl-A x) is seen when its bytes are read: at once, unless a paste of more than
    PENDING_MAX bytes sits unread before it, as with QEMU's mux."""
    parser = EscapeParser()
    pending = bytearray()  # read, not taken by the device yet
    discard = False  # the device takes no input any more: read for the escape alone
    reading = fd is not None
    while True:
        watched = [wake_fd]
        if fd is not None and reading and (discard or len(pending) < PENDING_MAX):
            watched.append(fd)
        ready, _, _ = select.select(watched, [], [], RETRY_S if pending else None)
        if wake_fd in ready:
            return False
        if fd is not None and fd in ready:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError as e:  # EBADF (nohup's write-only /dev/null), EIO (a lost terminal)
                log.warning("the console's input failed (%s): no more input to the VM", e.strerror)
                data = b""
            if not data:  # EOF on input: keep the VM running, stop reading
                reading = False
                continue
            quit_ = False
            if escape:
                data, quit_ = parser.feed(data)
            if not discard:
                pending += data
            if quit_:
                if pending:
                    deliver(bytes(pending))  # what it takes now; the VM ends with the rest
                return True
        if pending:
            taken = deliver(bytes(pending))
            if taken is None:
                log.warning(
                    "the console device takes no more input: %d byte(s) dropped", len(pending)
                )
                discard = True
                pending.clear()
            else:
                del pending[:taken]
