"""Supervisor: notices a device process that ends, whenever it ends (pidfd + poll), and one
that hangs (a heartbeat: a ping every HEARTBEAT_INTERVAL_S that it must answer within
HEARTBEAT_TIMEOUT_MS). A hung device is failed like a dead one, and its on_crash policy
applies; without the heartbeat a virtio device stuck in a loop would go unnoticed, since
its guest's I/O reaches it through ioeventfds and never through the monitor.

It watches the process in a slot at the time watch() is called, on its own copy of
that process's pidfd (the slot may close its own when it replaces the process).
watch() may be called at any time from any thread -- a device restarted later is
watched like the first -- and wakes the poll loop through an eventfd. The exit
status comes from whoever reaps the process (the launcher, for the machine's).

It watches a slot's warm spare too (watch_spare()): a spare that ends while it waits is
the slot's to end (DeviceSlot.spare_ended), and `on_spare_lost` has another started, off
this thread (a spawn waits on the launcher).

And the INTx resample fd of a device left dead (watch_resample(), pci/intx.py): the line is
the monitor's to raise again from then on. That fd is the machine's (DeviceFds), open until
after close(): polled as it is, never closed here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from splitvmm.errors import DeviceFailure
from splitvmm.monitor.slot import DeviceSlot
from splitvmm.native.eventfd import EventFd
from splitvmm.sandbox.spawn import DeviceProcess

log = logging.getLogger("splitvmm.supervisor")

HEARTBEAT_INTERVAL_S = 1.0
# A healthy device answers in well under a millisecond, but a virtio device answers only
# between two rounds of requests (its event loop runs one thing at a time; a round is at
# most ~1 ms, devprocs/virtio/pci.py BUDGET_NS): the read deadline's margin covers a
# loaded host.
HEARTBEAT_TIMEOUT_MS = 2000


class Supervisor(threading.Thread):
    def __init__(
        self,
        heartbeat_s: float = HEARTBEAT_INTERVAL_S,
        on_spare_lost: Callable[[DeviceSlot], None] | None = None,
    ) -> None:
        super().__init__(name="supervisor", daemon=True)
        self._heartbeat_s = heartbeat_s
        self._on_spare_lost = on_spare_lost
        self._wake = EventFd()
        self._closing = False
        self._lock = threading.Lock()
        # Our pidfd -> whose process, and whether it is the slot's warm spare
        self._added: list[tuple[int, DeviceSlot, DeviceProcess, bool]] = []  # not polled yet
        self._watched: dict[int, tuple[DeviceSlot, DeviceProcess, bool]] = {}
        self._resamples: dict[int, Callable[[], None]] = {}  # resample fd -> its line's
        self._resamples_added: list[tuple[int, Callable[[], None]]] = []  # not polled yet

    def watch(self, slot: DeviceSlot) -> None:
        """Watch the process now in `slot`; its end fails the slot (if still its process)."""
        process = slot.process
        if process is None:
            raise DeviceFailure(f"device {slot.name}: no process to watch")
        self._add(slot, process, spare=False)
        slot.supervised = True

    def watch_spare(self, slot: DeviceSlot, spare: DeviceProcess) -> None:
        """Watch `slot`'s warm spare `spare`; its end while it waits is the slot's to end."""
        self._add(slot, spare, spare=True)

    def watch_resample(self, fd: int, resampled: Callable[[], None]) -> None:
        """Call `resampled` whenever KVM signals the INTx resample fd `fd` of a device left
        dead. From any thread, a vCPU's among them (no new fd: its policy forbids fcntl)."""
        with self._lock:
            self._resamples_added.append((fd, resampled))
        self._wake.trigger()

    def _add(self, slot: DeviceSlot, process: DeviceProcess, spare: bool) -> None:
        # F_DUPFD_CLOEXEC, not dup(): the one the monitor's seccomp policy allows.
        pidfd = fcntl.fcntl(process.pidfd, fcntl.F_DUPFD_CLOEXEC, 0)
        with self._lock:
            self._added.append((pidfd, slot, process, spare))
        self._wake.trigger()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._wake.fd, select.POLLIN)
        next_beat = time.monotonic() + self._heartbeat_s
        while not self._closing:
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1e3))
            ready = poller.poll(timeout_ms)
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self._heartbeat_s
            for fd, _ in ready:
                if fd == self._wake.fd:
                    self._wake.drain()
                    self._take_added(poller)
                elif fd in self._resamples:
                    self._resamples[fd]()
                elif not self._closing:
                    poller.unregister(fd)
                    os.close(fd)
                    slot, process, spare = self._watched.pop(fd)
                    if not spare:
                        slot.process_ended(process)
                    elif slot.spare_ended(process) and self._on_spare_lost is not None:
                        self._on_spare_lost(slot)

    def _beat(self) -> None:
        """Ping every watched device (each slot skips itself while it is busy or away)."""
        for slot, _, spare in list(self._watched.values()):
            if self._closing:
                return
            if not spare:
                slot.heartbeat(HEARTBEAT_TIMEOUT_MS)

    def _take_added(self, poller: select.poll) -> None:
        with self._lock:
            added, self._added = self._added, []
            resamples, self._resamples_added = self._resamples_added, []
        for pidfd, slot, process, spare in added:
            self._watched[pidfd] = (slot, process, spare)
            poller.register(pidfd, select.POLLIN)
        for fd, resampled in resamples:
            self._resamples[fd] = resampled
            poller.register(fd, select.POLLIN)

    def close(self) -> None:
        """Stop watching (before the monitor ends the devices on purpose). Its slots are
        supervised no more: no process_ended() comes now, so a channel found broken (the
        teardown's syncs) fails its device at once, not after END_TIMEOUT_S waiting for one
        (DeviceSlot._channel_failed_locked)."""
        self._closing = True
        self._wake.trigger()
        if self.is_alive():
            self.join(timeout=5)
        with self._lock:
            watched = [*self._watched.values(), *((s, p, sp) for _, s, p, sp in self._added)]
            pidfds = [*self._watched, *(fd for fd, _, _, _ in self._added)]
            self._watched.clear()
            self._added.clear()
        for slot, _, spare in watched:
            if not spare:
                slot.supervised = False
        for fd in pidfds:
            os.close(fd)
        self._wake.close()
