"""A device's stderr as the launcher relays it (sandbox/relay.py): named, escaped, clipped,
and at most BURST_BYTES a window."""

from __future__ import annotations

import select
import subprocess
import sys

from splitvmm.sandbox.relay import BURST_BYTES, MAX_LINE, MAX_RAW, WINDOW_S, StderrRelay
from tests.sandbox.harness import REPO


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


def test_relay_line_at_its_longest_fits_in_one_atomic_pipe_write():
    """The launcher writes each relayed line in a write of its own, which a pipe takes whole
    or not at all only up to PIPE_BUF bytes (stderrlog.py): the longest name, MAX_LINE
    characters of four bytes each, the cut mark and a terminal's CR LF stay within it."""
    name = "n" * 63  # protocol/spec.py NAME_RE: 63 characters at most
    relay = StderrRelay(name)
    (line,) = relay.feed("\U0001f600".encode() * (MAX_LINE + 10) + b"\n")
    assert line.endswith(" [cut]")
    assert len(f"{line}\r\n".encode()) <= select.PIPE_BUF


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


# What one window may print: BURST_BYTES of the device's text, and the "splitvmm: device
# NAME: " before each line (at most 85 bytes), of lines that cost at least 64 bytes each.
BOUND = BURST_BYTES + BURST_BYTES // 64 * 85


def printed(lines: list[str]) -> int:
    """Bytes the launcher writes for `lines` (launcher_server.py _relay)."""
    return len("".join(f"{line}\n" for line in lines).encode(errors="replace"))


def test_relay_of_empty_lines_prints_within_its_rate():
    """1 byte a line (b"\\n") costs the device 1 byte of its BURST_BYTES, and the operator a
    whole "splitvmm: device NAME: " line: 16384 lines in one window."""
    relay = StderrRelay("n" * 63, Clock())  # the longest name NAME_RE takes
    out = relay.feed(b"\n" * BURST_BYTES)
    assert printed(out) <= BOUND, f"{len(out)} lines, {printed(out)} bytes in one window"


def test_relay_of_control_characters_prints_within_its_rate():
    """Each escaped control byte prints as 4 characters (\\x01)."""
    relay = StderrRelay("x", Clock())
    out = relay.feed((b"\x01" * 249 + b"\n") * (BURST_BYTES // 250))
    assert printed(out) <= BOUND, f"{len(out)} lines, {printed(out)} bytes in one window"


# The launcher's server with one device's stderr pipe, as _spawn registers it; the "device"
# writes 64 KiB of newlines; what the launcher writes to its fd 2 (a file here) is counted.
FLOOD = """
import json, os, socket, sys
from splitvmm.sandbox import launcher_server
from splitvmm.sandbox.relay import StderrRelay
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
server = launcher_server._Server(theirs, None)
r, w = os.pipe2(os.O_CLOEXEC)
os.set_blocking(r, False)
server.relays[r] = StderrRelay("serial0")
server.poller.register(r)
os.write(w, b"\\n" * 65536)
os.close(w)
while r in server.relays:  # the launcher's loop, for this pipe: to its EOF
    server._relay(r)
"""


def test_launcher_relays_a_device_writing_newlines_within_its_rate(tmp_path):
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        subprocess.run([sys.executable, "-c", FLOOD], cwd=REPO, stderr=err, timeout=30,
                       check=True)  # fmt: skip
    lines = log.read_bytes().splitlines()
    # One window (the script takes well under WINDOW_S): at most BOUND shown, and a line
    # saying what was not.
    assert len(log.read_bytes()) <= BOUND + 200, f"{len(lines)} lines printed"
