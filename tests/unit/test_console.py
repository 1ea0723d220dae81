"""The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, other bytes pass."""

from splitvmm.monitor.console import EscapeParser


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
