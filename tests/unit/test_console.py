"""The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, other bytes pass; the
terminal's mode comes back at exit."""

import os
import pty
import select
import signal
import termios

from splitvmm.monitor.console import EscapeParser, pump, raw_terminal


def test_escape_plain_bytes_pass_through():
    assert EscapeParser().feed(b"ls\r") == (b"ls\r", False)


def test_escape_ctrl_a_x_quits_after_delivering_preceding_bytes():
    assert EscapeParser().feed(b"ab\x01x") == (b"ab", True)


def test_escape_double_ctrl_a_sends_one_ctrl_a():
    assert EscapeParser().feed(b"\x01\x01z") == (b"\x01z", False)


def test_escape_split_across_reads_still_quits():
    parser = EscapeParser()
    parser.feed(b"\x01")
    assert parser.feed(b"x") == (b"", True)


def test_raw_terminal_restores_the_saved_mode_on_exit():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with raw_terminal(slave) as is_tty:
            assert termios.tcgetattr(slave) != before
        assert is_tty and termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_that_hung_up_exits_without_error():
    master, slave = pty.openpty()
    try:
        with raw_terminal(slave):
            os.close(master)  # the window closes or ssh drops under the VM: EIO from now on
    finally:
        os.close(slave)


def test_pump_whose_input_fails_stops_reading_it_and_serves_on(caplog):
    """GNU nohup reopens stdin as /dev/null write-only: it polls readable and read() fails
    (EBADF). That ended `up` with a traceback; it is the end of input, as EOF is."""
    stdin = os.open(os.devnull, os.O_WRONLY)
    wake_r, wake_w = os.pipe()
    delivered: list[bytes] = []
    # The VM ends a moment later: an alarm's handler wakes the pump (on this thread: select
    # is retried after the handler runs, PEP 475), once it has read its failing input.
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: os.write(wake_w, b"x"))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        assert pump(stdin, wake_r, delivered.append, escape=False) is False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        for fd in (stdin, wake_r, wake_w):
            os.close(fd)
    assert delivered == [] and "the console's input failed (Bad file descriptor)" in caplog.text


def test_raw_terminal_drops_input_left_unread_at_exit():
    """Keys typed at the end, or a terminal's answer to a query the guest wrote, must not
    reach the shell as commands once the VM is gone (TCSAFLUSH)."""
    master, slave = pty.openpty()
    try:
        with raw_terminal(slave):
            os.write(master, b"rm -rf ~\r")  # unread by the time the VM ends
            assert select.select([slave], [], [], 5)[0]  # the pty has passed it on
        assert not select.select([slave], [], [], 0.2)[0]
    finally:
        os.close(master)
        os.close(slave)
