"""The device process's event loop: one poll over the channel and every fd the model watches.

What it waits on, each only while it matters:
- the channel (channel.py): frames from the monitor, served one at a time in the order
  they were sent, so a posted write is applied before a later read; and room in it while
  an event sent unasked is still going out;
- the output line, while the model's output buffer holds bytes (POLLOUT): a slow reader
  slows the guest's output, never the channel (output.py);
- the model's own fds (base.EventSources: an ioeventfd the guest kicks, a disk or TAP
  backend): readable -> the model's callback;
- the model's next deadline (base.TimedEvents: a clock's interrupts): the poll's timeout in
  whole milliseconds, the last one in pselect6's microseconds, so the wake-up is never early
  and never a millisecond late.

A model busy for long in one callback (a virtio queue the driver never lets run dry) asks
waiting() -- its context's `waiting` -- whether any of these is ready, and hands the loop back
only then: the same poll, without the wait.

With only the channel to watch (most of a register device's life), the loop blocks in
its read: no poll, and no extra system call, per frame. Everything runs on one thread: the
sandbox allows no new one, and a model never needs a lock.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Callable, Iterable

from splitvmm.devprocs.base import Device, EventSources, OutputProducer, Source, TimedEvents
from splitvmm.devprocs.channel import Channel

# What a poll result means for the line and for a source: an fd that is both (a `unix:`
# console's socket) is flushed only when writable, read only when readable; an error or a
# hang-up goes to both, whose own calls then find it.
_ERROR = select.POLLERR | select.POLLHUP | select.POLLNVAL
WRITABLE = select.POLLOUT | _ERROR
READABLE = select.POLLIN | _ERROR


class EventLoop:
    def __init__(
        self,
        device: Device,
        channel: Channel,
        serve_frame: Callable[[bytes], None],
        clock: Callable[[], float] = time.monotonic,
        after_host_event: Callable[[], None] | None = None,
    ) -> None:
        """`after_host_event` runs after a step in which something other than a frame moved
        the model (its line drained, an fd of its, a deadline): the runtime publishes what
        that changed (its register mirror). The loop lends the model its waiting()
        (device.ctx.waiting): one loop per device, for the process's life."""
        self.device = device
        self.channel = channel
        self.serve_frame = serve_frame
        self.after_host_event = after_host_event
        self.clock = clock
        self._timed = device if isinstance(device, TimedEvents) else None
        self._sources = device if isinstance(device, EventSources) else None
        self._room = device.output_room if isinstance(device, OutputProducer) else None
        device.ctx.waiting = self.waiting

    def run(self) -> None:
        """Serve until the channel fails (the monitor went away, or sent garbage: the
        caller's serve_frame raises, and the process ends)."""
        while True:
            self.step()

    def step(self) -> None:
        """One wait and whatever became ready."""
        deadline, line, sources = self._watched()
        channel = self.channel
        if deadline is None and line is None and not sources and not channel.sending:
            self.serve_frame(channel.recv())
            self.device.ctx.events.flush()
            return
        if channel.buffered():  # read already: look at the rest without waiting
            timeout: int | None = 0
        elif deadline is None:
            timeout = None
        else:
            left = deadline - self.clock()
            timeout = max(0, math.floor(left * 1e3))
            if timeout == 0 and left > 0:
                # under a millisecond: poll(2) counts whole ones, so wait in pselect6(2)'s
                # microseconds (a 1024 Hz clock's interrupt is due every 976.5625 us)
                self._wait(line, sources, left)
        ready = self._poll(line, sources, timeout)
        host_event = False
        # the line polled writable (or in error): flush what waits for it
        if line is not None and ready.get(line, 0) & WRITABLE and self.device.ctx.out.flush():
            host_event = True
            if self._room is not None:
                self._room()
        for fd, source in sources.items():
            if ready.get(fd, 0) & READABLE:
                host_event = True
                source.on_readable()
        if self._timed is not None and deadline is not None and self.clock() >= deadline:
            host_event = True
            self._timed.tick(self.clock())
        if host_event and self.after_host_event is not None:
            self.after_host_event()
        if channel.sending:
            channel.flush()  # the rest of an event, as far as there is room
        if (
            channel.buffered()
            or ready.get(channel.fileno(), 0) & READABLE
            and channel.frame_ready()
        ):
            self.serve_frame(channel.recv())
        self.device.ctx.events.flush()  # what the channel could not take before

    def waiting(self) -> bool:
        """Whether a step now would find something ready: a frame, an fd of the model's, the
        line writable while output waits, a deadline passed. Asked by a model in the middle
        of a callback: a kick it has just taken counts only if the guest kicked again."""
        deadline, line, sources = self._watched()
        if deadline is not None and self.clock() >= deadline:
            return True
        channel = self.channel
        if channel.buffered():
            return True
        ready = self._poll(line, sources, 0)
        # readable: a frame, or only the start of one (or the monitor's greeting), which the
        # read takes; writable (room for an event's rest) is not work that waits
        polled = ready.pop(channel.fileno(), 0)
        return bool(ready) or bool(polled & READABLE) and channel.frame_ready()

    def _watched(self) -> tuple[float | None, int | None, dict[int, Source]]:
        """What a step waits on now: the model's deadline, its output line while it holds
        output, and its fds (the channel always)."""
        deadline = self._timed.next_deadline() if self._timed is not None else None
        out = self.device.ctx.out
        line = out.line.fileno() if out.wants_flush() and out.line is not None else None
        sources = {s.fd: s for s in self._sources.event_sources()} if self._sources else {}
        return deadline, line, sources

    def _wait(self, line: int | None, sources: Iterable[int], seconds: float) -> None:
        """Until one of the fds _poll watches is ready or `seconds` pass, whichever is first."""
        channel = self.channel
        writers = [line] if line is not None else []
        if channel.sending:
            writers.append(channel.fileno())
        select.select([channel.fileno(), *sources], writers, [], seconds)

    def _poll(
        self, line: int | None, sources: Iterable[int], timeout_ms: int | None
    ) -> dict[int, int]:
        """What is ready among the channel, `sources` and the line: {fd: poll events}."""
        poller = select.poll()
        channel = self.channel
        poller.register(channel, select.POLLIN | (select.POLLOUT if channel.sending else 0))
        for fd in sources:
            poller.register(fd, select.POLLIN)
        if line is not None:  # last: registering an fd again replaces its events, and the
            # line may be a source too (a `unix:` peer writes the console's input on it)
            poller.register(line, select.POLLOUT | (select.POLLIN if line in sources else 0))
        return dict(poller.poll(timeout_ms))
