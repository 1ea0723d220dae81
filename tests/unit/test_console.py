"""The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, other bytes pass; the
terminal's mode comes back at exit."""

import os
import pty
import termios

from splitvmm.monitor.console import EscapeParser, raw_terminal


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
