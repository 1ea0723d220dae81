"""A device's stderr as the launcher relays it (sandbox/relay.py): named, escaped, clipped,
and at most BURST_BYTES a window."""

from __future__ import annotations

from splitvmm.sandbox.relay import BURST_BYTES, MAX_LINE, MAX_RAW, WINDOW_S, StderrRelay


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_relay_names_each_line_by_the_device_the_launcher_started():
    relay = StderrRelay("blk0")
    assert relay.feed(b"WARNING virtio-blk: a\nb\n") == [
        "splitvmm: device blk0: WARNING virtio-blk: a",
        "splitvmm: device blk0: b",
    ]


def test_relay_escapes_terminal_controls_and_invisible_characters():
    osc52_and_clear = b"\x1b]52;c;cHduZWQ=\x07\x1b[2J"
    bidi = "\u202egnp.exe\u202c\u200b".encode()
    [line] = StderrRelay("rng0").feed(osc52_and_clear + bidi + b"\tx\r\n")
    assert line == (
        "splitvmm: device rng0: \\x1b]52;c;cHduZWQ=\\x07\\x1b[2J\\u202egnp.exe\\u202c\\u200b\tx\\r"
    )


def test_relay_joins_a_line_written_in_pieces_and_gives_an_unended_one_at_eof():
    relay = StderrRelay("serial0")
    assert relay.feed(b"Trace") == []
    assert relay.feed(b"back (most\n recent") == ["splitvmm: device serial0: Traceback (most"]
    assert relay.end() == ["splitvmm: device serial0:  recent"]


def test_relay_shows_invalid_utf8_replaced():
    assert StderrRelay("x").feed(b"\xff\xfe ok\n") == ["splitvmm: device x: \ufffd\ufffd ok"]


def test_relay_cuts_a_long_line_and_drops_the_rest_of_it():
    relay = StderrRelay("x")
    out = relay.feed(b"a" * (MAX_RAW + 10))
    out += relay.feed(b"b" * 10_000 + b"\nnext\n")
    assert out == [f"splitvmm: device x: {'a' * MAX_LINE} [cut]", "splitvmm: device x: next"]


def test_relay_drops_past_its_rate_and_says_how_much_once_it_shows_again():
    clock = Clock()
    relay = StderrRelay("x", clock)
    line = b"y" * 99 + b"\n"  # 100 bytes a line
    fits = BURST_BYTES // 100
    out = relay.feed(line * (fits + 5))
    assert len(out) == fits
    clock.now += WINDOW_S
    assert relay.feed(b"back\n") == [
        f"splitvmm: device x: [500 bytes of its stderr not shown: over {BURST_BYTES} in 1 s]",
        "splitvmm: device x: back",
    ]


def test_relay_cuts_a_long_line_read_whole_as_one_read_in_pieces():
    relay = StderrRelay("x")
    assert relay.feed(b"a" * 50_000 + b"\n") == [f"splitvmm: device x: {'a' * MAX_LINE} [cut]"]


def test_relay_says_what_it_dropped_at_eof():
    relay = StderrRelay("x", Clock())
    assert len(relay.feed((b"w" * 3999 + b"\n") * 4)) == 4  # 16000 bytes of the window's
    assert relay.feed(b"v" * 499 + b"\n") == []  # 500 more: over BURST_BYTES
    assert relay.end() == [
        f"splitvmm: device x: [500 bytes of its stderr not shown: over {BURST_BYTES} in 1 s]"
    ]
