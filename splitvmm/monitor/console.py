"""The host side of the serial console: stdin (raw when a TTY) -> the serial device.

The device writes guest output straight to its output fd; input comes back
through the monitor so that the escape key (Ctrl-A x quits, Ctrl-A Ctrl-A sends
Ctrl-A) works whatever the device does.
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


def pump(fd: int | None, wake_fd: int, deliver: Callable[[bytes], None], escape: bool) -> bool:
    """Forward input from `fd` until `wake_fd` fires. Returns True if the user asked to quit."""
    parser = EscapeParser()
    watched = [wake_fd] + ([fd] if fd is not None else [])
    while True:
        ready, _, _ = select.select(watched, [], [])
        if wake_fd in ready or fd is None:  # without input, only wake_fd is watched
            return False
        try:
            data = os.read(fd, 4096)
        except OSError as e:  # EBADF (nohup's write-only /dev/null), EIO (a lost terminal)
            log.warning("the console's input failed (%s): no more input to the VM", e.strerror)
            data = b""
        if not data:  # EOF on input: keep the VM running, stop reading
            watched.remove(fd)
            continue
        if escape:
            data, quit_ = parser.feed(data)
            if quit_:
                if data:
                    deliver(data)
                return True
        if data:
            deliver(data)
