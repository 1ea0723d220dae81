"""Time a device may cost the monitor: a budget over a sliding window, and a shared deadline.

A deadline on each request alone lets a device answer just under it every time: a rogue
replying to every read in 1.9 s (the deadline is 2 s) was never flagged, and answering each
control request late kept a snapshot's VM paused for 31 s. So:
- LatencyBudget adds up one device's slow replies over a sliding window; past the budget the
  device has failed, whatever each reply's own deadline said;
- Deadline is one limit shared by every request of an operation (a snapshot's quiesce, save
  and resume of all devices): each request may wait only for what is left of it.
Both keep a fixed amount of state, however many requests there are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Clock = Callable[[], float]  # seconds, monotonic


class LatencyBudget:
    """The slow waits of one device over the last `window_s` seconds.

    The window is kept as `slots` fixed buckets, so it slides in steps of window_s / slots:
    a wait is forgotten between window_s - window_s / slots and window_s after it ended.
    Only waits of at least `slow_ms` count, so a healthy device that is merely busy (a guest
    polling a register back to back) never adds up to anything.
    """

    def __init__(
        self,
        budget_ms: float,
        window_s: float,
        slow_ms: float,
        slots: int = 10,
        clock: Clock = time.monotonic,
    ) -> None:
        if budget_ms <= 0 or window_s <= 0 or slots <= 0:
            raise ValueError("a latency budget needs a positive budget, window and slot count")
        self.budget_ms, self.window_s, self.slow_ms = budget_ms, window_s, slow_ms
        self._width = window_s / slots
        self._clock = clock
        self._spent = [0.0] * slots  # ms of slow waits ended in each bucket
        self._bucket = [-slots] * slots  # which bucket (time // width) each slot holds

    def charge(self, waited_ms: float) -> float | None:
        """Count one wait that just ended; the window's total in ms once it is over budget."""
        if waited_ms < self.slow_ms:
            return None  # the common case costs one comparison on the vCPU's path
        now = int(self._clock() // self._width)
        slot = now % len(self._spent)
        if self._bucket[slot] != now:
            self._bucket[slot], self._spent[slot] = now, 0.0
        self._spent[slot] += waited_ms
        live = now - len(self._spent)
        total = sum(ms for ms, b in zip(self._spent, self._bucket, strict=True) if b > live)
        return total if total > self.budget_ms else None


class Deadline:
    """One limit on the time spent inside `with deadline.counting():`, all blocks together."""

    def __init__(self, limit_s: float, clock: Clock = time.monotonic) -> None:
        self.limit_s = limit_s
        self._clock = clock
        self._spent_s = 0.0

    def remaining_ms(self) -> int:
        return max(0, int((self.limit_s - self._spent_s) * 1000))

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._spent_s += self._clock() - start
