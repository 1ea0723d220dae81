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
import signal
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from signal import _HANDLER

log = logging.getLogger("splitvmm.console")

CTRL_A = 0x01
READ_SIZE = 4096  # a read of the operator's input
# Input the device had no room for is offered again this often (it says its room in events
# the monitor reads around its requests: monitor/slot.py input()), OFFER_MAX bytes at a time
# (a device has room for 4 KiB). At most PENDING_MAX bytes of it wait here: past that, input
# from a pipe or file is read no further, and a terminal's is dropped (pump()).
RETRY_S = 0.02
OFFER_MAX = 64 * 1024
PENDING_MAX = 1024 * 1024


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
def raw_terminal(fd: int, ending: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Put a TTY in raw mode for the VM's lifetime; yields whether it is a TTY. `ending`:
    whether the VM is stopping (no raw mode set again on SIGCONT then)."""
    saved = _set_raw(fd) if os.isatty(fd) else None
    if saved is None:
        yield False
        return
    previous = _raw_again_on_continue(fd, ending)
    try:
        yield True
    finally:
        if previous is not None:
            signal.signal(signal.SIGCONT, previous)
        _restore(fd, saved)


def _set_raw(fd: int) -> list[int | list[bytes | int]] | None:
    """Raw mode set on a TTY: its modes before; None where the kernel refuses it (EIO). A
    background job whose parent has gone (orphaned: `(up <&0 &)`, a script that started it
    and exited) may neither set its terminal's modes nor read it: it is not stopped (SIGTTOU)
    until `fg`, as there is no one to `fg` it; its input is at an end (pump()), as a pipe's
    at EOF. So is a terminal's that hung up (SIGHUP ends the VM)."""
    try:
        saved = termios.tcgetattr(fd)
        tty.setraw(fd, termios.TCSANOW)  # what was typed while the VM started is the guest's
    except termios.error as e:
        if e.args[0] != errno.EIO:
            raise
        return None
    return saved


def _raw_again_on_continue(fd: int, ending: Callable[[], bool]) -> _HANDLER:
    """A shell puts its own terminal modes back when its foreground job stops (`kill -STOP`,
    `kill -TSTP`: Ctrl-Z is the guest's key in raw mode) and does not put the job's back on
    `fg`: raw mode is set again on SIGCONT, as QEMU's stdio does, or the console after `fg`
    echoes, waits for Enter, and turns the guest's Ctrl-C into the VM's SIGINT. Input typed
    meanwhile is kept (TCSANOW). The previous handler; None off the main thread (none set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def again(signum: int, frame: object) -> None:
        # Only on `fg`, which gives us the terminal first. Not once the VM is stopping, nor
        # while the shell has the terminal: `bg`, or a stopped job's `kill %1` (SIGTERM, then
        # SIGCONT) whose SIGCONT is handled first (another thread may take the SIGTERM, and
        # its C handler may not have run yet); a tcsetattr() from the background would stop
        # us again (SIGTTOU), and the shell's modes are on the terminal.
        if ending() or _in_background(fd):
            return
        with contextlib.suppress(termios.error):  # a terminal that hung up meanwhile
            tty.setraw(fd, termios.TCSANOW)

    return signal.signal(signal.SIGCONT, again)


def _in_background(fd: int) -> bool:
    """Whether another process group has our controlling terminal: a job-control shell took
    it back, and put its own modes back, when we stopped. False for a terminal that is not
    our controlling one (no job control there), or one that hung up."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


def _restore(fd: int, saved: list[int | list[bytes | int]]) -> None:
    """`saved` is tcgetattr's [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]."""
    if _in_background(fd):  # the shell's modes are on it, and what is typed is the shell's:
        return  # a tcsetattr() would stop the VM's end (SIGTTOU) until the operator's `fg`
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
    fd: int | None,
    wake_fd: int,
    deliver: Callable[[bytes], int | None],
    escape: bool,
    signal_fd: int | None = None,
) -> bool:
    """Forward input from `fd` until `wake_fd` fires. Returns True if the user asked to quit.

    `signal_fd`: the read end of the signal wake-up pipe (signal.set_wakeup_fd). The kernel
    may hand a process-directed signal to any thread (to whichever runs first when a stopped
    process continues: a shell's `kill %1` of a stopped job sends SIGTERM, then SIGCONT), and
    Python runs its handler on this thread only once it runs Python again: watched, it ends
    this wait, so the handler runs now, not when the VM ends.

    `deliver(data)` sends what the console device has room for, from the front of `data`,
    and says how many bytes that was (monitor/slot.py input()): 0 while it has no room,
    None once it will never take input again. What it did not take waits here and is
    offered again every RETRY_S, so a paste larger than the device's buffer waits for the
    guest to read, none of it lost. Past PENDING_MAX bytes waiting, input from a pipe or a
    file (`escape` off) is not read until the guest has taken some: it waits in the pipe.
    A terminal's (`escape` on) is always read, so that Ctrl-A x quits whatever the guest
    does: past PENDING_MAX, what it types is dropped, and said so."""
    parser = EscapeParser()
    pending = bytearray()  # read, not taken by the device yet
    discard = False  # the device takes no input any more: read for the escape alone
    dropped = 0  # typed while PENDING_MAX bytes waited (a terminal's input only)
    reading = fd is not None
    while True:
        watched = [wake_fd] if signal_fd is None else [wake_fd, signal_fd]
        if fd is not None and reading and (escape or discard or len(pending) < PENDING_MAX):
            watched.append(fd)
        ready, _, _ = select.select(watched, [], [], RETRY_S if pending else None)
        if wake_fd in ready:
            _say_dropped(dropped)
            return False
        if signal_fd is not None and signal_fd in ready:
            _drain(signal_fd)  # the handler has run: a stop signal's fires wake_fd
        if fd is not None and fd in ready:
            # A pipe's or a file's input is read up to PENDING_MAX and no further, so that
            # what waits for the guest waits in the pipe, none of it dropped; a terminal's
            # is read whole (the escape), and what passes PENDING_MAX dropped below.
            size = READ_SIZE if escape or discard else min(READ_SIZE, PENDING_MAX - len(pending))
            try:
                if escape and _in_background(fd):
                    # `bg`: the shell has the terminal. A read stops us (SIGTTIN) until `fg`
                    # and then waits for a key: the shell has read what was typed, and the
                    # main thread, in read(2), missed the VM's end and the SIGCONT that sets
                    # raw mode again. A read of nothing stops us the same way (the kernel's
                    # job control; EIO for an orphaned job), then select() looks again.
                    os.read(fd, 0)
                    continue
                data = os.read(fd, size)
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
                kept = data[: max(0, PENDING_MAX - len(pending))]
                pending += kept
                if len(kept) < len(data):
                    if not dropped:
                        log.warning("the guest is not reading its console: input dropped")
                    dropped += len(data) - len(kept)
            if quit_:
                if pending:
                    deliver(bytes(pending[:OFFER_MAX]))  # what it takes now; the VM ends
                _say_dropped(dropped)
                return True
        if pending:
            taken = deliver(bytes(pending[:OFFER_MAX]))
            if taken is None:
                log.warning(
                    "the console device takes no more input: %d byte(s) dropped", len(pending)
                )
                discard = True
                pending.clear()
            else:
                del pending[:taken]
                if not pending:
                    _say_dropped(dropped)
                    dropped = 0


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _say_dropped(dropped: int) -> None:
    """The count of a terminal's input dropped past PENDING_MAX, once it is known."""
    if dropped:
        log.warning("console input dropped while the guest read none: %d byte(s)", dropped)
