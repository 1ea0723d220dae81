"""Supervisor: notices a device process that dies, whenever it dies (pidfd + poll)."""

from __future__ import annotations

import logging
import select
import threading

from splitvmm.monitor.devhost import DeviceHost
from splitvmm.native.eventfd import EventFd

log = logging.getLogger("splitvmm.supervisor")


class Supervisor(threading.Thread):
    def __init__(self, hosts: list[DeviceHost]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self._wake = EventFd()
        self._closing = False
        self._pidfds = {h.pidfd: h for h in hosts}  # the hosts own (and close) them

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._wake.fd, select.POLLIN)
        for fd in self._pidfds:
            poller.register(fd, select.POLLIN)
        while not self._closing:
            for fd, _ in poller.poll():
                if fd == self._wake.fd or self._closing:
                    continue
                poller.unregister(fd)
                host = self._pidfds[fd]
                host.exited(host.proc.wait())

    def close(self) -> None:
        """Stop watching (before the monitor kills the devices on purpose)."""
        self._closing = True
        self._wake.trigger()
        if self.is_alive():
            self.join(timeout=5)
        self._wake.close()
