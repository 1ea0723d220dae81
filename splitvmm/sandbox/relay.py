"""A device's stderr, relayed to the operator's by the launcher: each line named, escaped,
clipped, and no more than the operator can read.

Why. A device process parses guest data, and one a guest has taken over writes what it
likes to its fd 2. That fd was the operator's terminal: a virtio-rng device could clear the
screen, set the terminal's title, write the clipboard (OSC 52) and print lines that read as
the monitor's own. Its warnings and a crashing device's traceback must still reach the
operator. So a device's fd 2 is a pipe (sandbox/launcher_server.py), and each line that
comes out of it is printed as `splitvmm: device NAME: TEXT` by the launcher, which knows
NAME (the device does not choose it): TEXT with every control and invisible character
escaped (errors.escaped), clipped to MAX_LINE characters, and at most BURST_BYTES a
device in any WINDOW_S (what goes past is counted and said once the window allows again).

A serial device whose output is the operator's terminal (output = "stdio") writes the
guest's console there raw, as QEMU's -serial stdio does: that is its `out` fd, not this.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from splitvmm.errors import escaped

MAX_LINE = 1000  # characters of one line shown; a longer line is cut, and says so
MAX_RAW = MAX_LINE * 4  # bytes of a line kept (UTF-8: at most 4 a character)
WINDOW_S = 1.0
BURST_BYTES = 16 * 1024  # a device's stderr shown in any WINDOW_S: a traceback fits
MIN_LINE = 63  # what a line costs at least: its name and prefix are printed whatever it holds
READ_SIZE = 4096

Clock = Callable[[], float]


class StderrRelay:
    """One device's stderr: bytes in (feed), the lines to print out."""

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._partial = bytearray()  # a line not ended yet (at most MAX_RAW bytes kept)
        self._dropping = False  # a line too long was cut: the rest of it is dropped
        self._window_start = clock()
        self._window_bytes = 0
        self.dropped = 0  # bytes not shown, past the rate, not said yet

    def feed(self, data: bytes) -> list[str]:
        """What `data` (the next bytes read) completes, as lines to print."""
        out: list[str] = []
        *lines, rest = data.split(b"\n")
        for line in lines:
            if not self._dropping:
                self._partial += line
                raw = bytes(self._partial[:MAX_RAW])
                out += self._line(raw, cut=len(self._partial) > MAX_RAW)
            self._partial.clear()
            self._dropping = False
        if not self._dropping:
            self._partial += rest
            if len(self._partial) > MAX_RAW:
                out += self._line(bytes(self._partial[:MAX_RAW]), cut=True)
                self._partial.clear()
                self._dropping = True
        return out

    def end(self) -> list[str]:
        """The pipe said EOF: the last line, if it did not end, and what was dropped."""
        out = self._line(bytes(self._partial)) if self._partial else []
        self._partial.clear()
        if self.dropped:
            out.append(self._dropped_note())
        return out

    def _line(self, raw: bytes, cut: bool = False) -> list[str]:
        """The line to print for one line of the device's (none if the rate says drop it).
        A line costs what it shows, escapes included, and at least MIN_LINE + 1 bytes: an
        empty line still prints the device's name (BURST_BYTES / 64 lines a window at most)."""
        now = self._clock()
        if now - self._window_start >= WINDOW_S:
            self._window_start, self._window_bytes = now, 0
        text = ""
        if self._window_bytes + max(len(raw), MIN_LINE) + 1 <= BURST_BYTES:  # escaped only then
            text = escaped(raw.decode("utf-8", "replace"), keep="\t")
            if len(text) > MAX_LINE or cut:
                text = text[:MAX_LINE] + " [cut]"
        cost = max(len(raw), len(text.encode(errors="replace")), MIN_LINE) + 1
        if self._window_bytes + cost > BURST_BYTES:
            self.dropped += len(raw) + 1
            return []
        self._window_bytes += cost
        out = [self._dropped_note()] if self.dropped else []
        out.append(f"splitvmm: device {self.name}: {text}")
        return out

    def _dropped_note(self) -> str:
        dropped, self.dropped = self.dropped, 0
        return (
            f"splitvmm: device {self.name}: [{dropped} bytes of its stderr not shown: "
            f"over {BURST_BYTES} in {WINDOW_S:g} s]"
        )
