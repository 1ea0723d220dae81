"""How an end of a device channel waits for its peer: a while looking, then asleep.

A forwarded access is a chain of wake-ups: the vCPU thread's request wakes the device, the
device's reply wakes the vCPU thread. On this project's hosts a wake-up of another CPU costs
as much as the rest of the round trip (bench/floors.py's pipe floors: ~7 us on one CPU, ~55
across two): an idle CPU halts into the hypervisor below, and the peer's send must bring it
back. So an end that expects its peer within microseconds looks for the frame first, and
sleeps only when it has not come: the vCPU thread for the reply it waits on, the device for
the guest's next access. KVM does the same before it halts a vCPU (halt polling), and QEMU's
iothreads before they sleep (poll-max-ns). The figures are in bench/exit_rtt.py.

Looking costs a CPU, so the window adapts as KVM's halt_poll_ns does (virt/kvm/kvm_main.c):
it grows (from GROW_START_NS, doubling) while the waits that slept ended soon enough for a
window of MAX to have caught them, and shrinks (halving, to 0 below GROW_START_NS) after a
wait that outlasted it. A peer that answers late, or a guest that touches the device seldom,
costs one window's looking at most, then none: an idle VM's devices sleep. One wait looks
through one window, however many frames come before the one it waits for (a device's events
before its reply). And a process that may run on one CPU only never looks (max_poll_ns()):
its peer needs the CPU a look would hold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# The longest window, at either end: KVM's default halt_poll_ns on x86, and here about
# one forwarded access's whole round trip (bench/exit_rtt.py), so that a device looks for
# the next of a guest's accesses back to back, and no longer.
MAX_POLL_NS = 200_000
GROW_START_NS = 10_000  # the first window after one that was 0 (KVM's halt_poll_ns_grow_start)


def max_poll_ns() -> int:
    """The longest window for an end in this process: MAX_POLL_NS, or 0 where the process
    may run on one CPU only (a one-CPU host, a VM under taskset or in a cpuset). There its
    peer needs the CPU that a look holds: KVM polls only while no other task is runnable on
    its CPU (single_task_running()), which a process confined to one never knows."""
    return MAX_POLL_NS if len(os.sched_getaffinity(0)) > 1 else 0


class PollWindow:
    """The adaptive window of one waiting end; not thread-safe (one waiter at a time)."""

    def __init__(self, max_ns: int, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        """`max_ns`: the longest window, and the longest wait a window is grown to catch
        (0: never look)."""
        if max_ns < 0:
            raise ValueError(f"a poll window of {max_ns} ns")
        self.max_ns = max_ns
        self.ns = 0  # the window now: it grows once a wait shows that looking would pay
        self._clock_ns = clock_ns
        self._since: int | None = None  # when the wait that poll() gave up on started
        self._began = 0  # when the wait the last poll() looked for started
        self._adapted = False  # woke() has adapted the window to that wait already
        self.polls = self.caught = 0  # counters: windows looked through, frames they caught

    def poll(self, ready: Callable[[], bool], again: bool = False) -> bool:
        """Call `ready` until it says yes or the window has passed: whether it did. After a
        False, the caller sleeps until its frame comes, then calls woke(), which adapts the
        window to how long the whole wait took. `again`: the wait of the last poll() goes on
        (the frame it ended with was not the one waited for: a device's event before its
        reply), so the window counts from that wait's start: one wait looks through one
        window at most, however many frames come first."""
        start = self._clock_ns()
        if not again:
            self._began, self._adapted = start, False
        # one wait adapts the window once (woke()), whatever frames come before the last one
        self._since = None if self._adapted else self._began
        deadline = self._began + self.ns
        if start < deadline:
            self.polls += 1
            while True:
                if ready():
                    self.caught += 1
                    self._since = None
                    return True
                if self._clock_ns() >= deadline:
                    break
        return False

    def woke(self) -> None:
        """The sleep after a poll() that gave up has ended with the frame: a wait that a
        window of max_ns would have caught grows the window, a longer one shrinks it."""
        if self._since is None:
            return
        waited = self._clock_ns() - self._since
        self._since, self._adapted = None, True
        if waited <= self.max_ns:
            self.ns = min(self.max_ns, max(self.ns * 2, GROW_START_NS))
        elif self.ns:
            self.ns //= 2
            if self.ns < GROW_START_NS:
                self.ns = 0
