"""OnThread: one call run on a thread of its own while the monitor goes on, its error kept
for whoever waits for it (a thread's exception would otherwise only reach stderr)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class OnThread:
    """`call()` on a thread of its own, started at once."""

    def __init__(self, name: str, call: Callable[[], object]) -> None:
        self._error: BaseException | None = None
        # A daemon: one waited for a bounded time and given up (the teardown's write-back on
        # hung storage) must not keep the process from exiting, which joins every other thread.
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as e:  # handed over by wait() or result()
            self._error = e

    def ended_within(self, timeout_s: float) -> bool:
        """Whether the call ended within `timeout_s` (what it raised is left for wait())."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def wait(self) -> BaseException | None:
        """Wait for the call; what it raised (once), or None."""
        self._thread.join()
        error, self._error = self._error, None
        return error

    def result(self) -> None:
        """Wait for the call; raise what it raised."""
        error = self.wait()
        if error is not None:
            raise error
