"""Where `splitvmm up` spends its start-up: phase marks, printed by `up --timings`.

Marks are always taken (a list append and a clock read each, a few dozen per
run) and printed only when the operator asks, to stderr, after the VM ends. The
clock is time.perf_counter(), which on Linux is CLOCK_MONOTONIC, shared by every
process on the host: a benchmark that notes the clock before it starts
`splitvmm up` learns the interpreter's own start from the first mark
(bench/startup.py). Stdlib only: splitvmm/__main__.py imports it before anything
else, so its first mark is the end of the interpreter's start.

Phases follow one another: each mark ends the phase it names and starts the
next. Spans overlap them (a device process starts while the monitor builds the
VM), so they are kept apart, with their own start and end.
"""

from __future__ import annotations

import sys
import time

_marks: list[tuple[str, float]] = []
_spans: list[tuple[str, float, float]] = []


def mark(phase: str) -> None:
    """`phase` ends now."""
    _marks.append((phase, time.perf_counter()))


def span(what: str, start: float, end: float | None = None) -> None:
    """Something that overlaps the phases, from `start` to `end` (now by default)."""
    _spans.append((what, start, time.perf_counter() if end is None else end))


def report() -> str:
    """The phases in order with how long each took, then the spans, in ms; the first
    line gives the clock at the first mark, for whoever knows when the process began."""
    if not _marks:
        return "splitvmm: timings: no marks taken\n"
    origin = _marks[0][1]
    lines = [f"splitvmm: timings: first mark at monotonic {origin:.6f} s"]
    previous = origin
    for phase, at in _marks[1:]:
        lines.append(f"splitvmm: timings: phase {phase:<24} {(at - previous) * 1e3:8.2f} ms")
        previous = at
    lines.append(f"splitvmm: timings: phase {'total':<24} {(previous - origin) * 1e3:8.2f} ms")
    for what, start, end in _spans:
        lines.append(
            f"splitvmm: timings: span  {what:<24} {(end - start) * 1e3:8.2f} ms "
            f"(from +{(start - origin) * 1e3:.2f} ms)"
        )
    return "\n".join(lines) + "\n"


def print_report() -> None:
    sys.stderr.write(report())
