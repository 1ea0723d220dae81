"""EventFd: the trigger behind irqfd (device -> guest interrupt) and ioeventfd (guest kick)."""

from __future__ import annotations

import os

from splitvmm.native.fd import OwnedFd


class EventFd(OwnedFd):
    def __init__(self, fd: int | None = None) -> None:
        # A fresh eventfd in the monitor; in a device process, adopt the inherited fd.
        super().__init__(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if fd is None else fd)

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        """Consume and return the counter; 0 if nothing was signalled (non-blocking fd)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
