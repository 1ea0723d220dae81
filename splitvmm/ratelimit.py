"""Logging that a guest or a device cannot turn into a flood of lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """A guest mistake, or what a device reports, is logged at most once a second per kind
    (STYLE 7): a guest or a device that repeats it cannot flood the operator's terminal."""

    INTERVAL_S = 1.0

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -self.INTERVAL_S) >= self.INTERVAL_S:
            self._last[kind] = now
            self._log.warning(msg, *args)
