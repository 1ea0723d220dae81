"""How an end of a device channel waits (protocol/polling.py): the adaptive window against a
clock driven by hand, then each end's use of it, the device's (devprocs/channel.py) and the
vCPU's wait for a reply (monitor/channel.py), over real sockets."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from splitvmm.devprocs import runtime
from splitvmm.devprocs.channel import Channel, ChannelClosed
from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.protocol import events, wire
from splitvmm.protocol.polling import GROW_START_NS, MAX_POLL_NS, PollWindow
from tests.fakes import MonitorEnd
from tests.unit.test_channel_multipart import (
    _Alive,
    _channel,
    _raw_peer,
    _recv_exact,
    _recv_frame,
)

MAX = 100_000
LONG_S = 30  # a window no test waits out: a wait that ends sooner ended by itself


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def _grown(window: PollWindow, clock: Clock, waits_ns: list[int]) -> list[int]:
    """The window after each of `waits_ns`, each a sleep after a poll() that gave up (the
    whole wait: the window looked through, then the sleep)."""
    seen = []

    def nothing() -> bool:  # a look takes 1 us, and finds nothing
        clock.ns += 1_000
        return False

    for wait in waits_ns:
        assert not window.poll(nothing)
        clock.ns += wait
        window.woke()
        seen.append(window.ns)
    return seen


def test_a_new_window_looks_at_nothing_and_grows_from_the_start_value_doubling() -> None:
    clock = Clock()
    window = PollWindow(MAX, clock)
    asked = 0

    def ready() -> bool:
        nonlocal asked
        asked += 1
        return True

    assert not window.poll(ready)
    assert asked == 0 and window.polls == 0  # a window of 0: straight to sleep
    clock.ns += 5_000
    window.woke()
    assert window.ns == GROW_START_NS
    assert _grown(window, clock, [0, 0, 0, 0, 0]) == [20_000, 40_000, 80_000, MAX, MAX]


def test_a_wait_past_the_maximum_halves_the_window_down_to_nothing() -> None:
    clock = Clock()
    window = PollWindow(MAX, clock)
    window.ns = MAX
    assert _grown(window, clock, [10 * MAX] * 5) == [50_000, 25_000, 12_500, 0, 0]


def test_a_frame_within_the_window_is_caught_and_leaves_the_window_as_it_was() -> None:
    clock = Clock()
    window = PollWindow(MAX, clock)
    window.ns = 40_000
    looks = 0

    def ready() -> bool:  # comes on the fourth look, 3 us apart
        nonlocal looks
        looks += 1
        clock.ns += 1_000
        return looks == 4

    assert window.poll(ready)
    assert (looks, window.polls, window.caught) == (4, 1, 1)
    window.woke()  # nothing slept: nothing to adapt
    assert window.ns == 40_000


def test_a_window_that_passes_gives_up_at_its_end() -> None:
    clock = Clock()
    window = PollWindow(MAX, clock)
    window.ns = 40_000
    looks = 0

    def never() -> bool:
        nonlocal looks
        looks += 1
        clock.ns += 1_000
        return False

    assert not window.poll(never)
    assert looks == 40 and window.caught == 0


def test_a_wait_that_goes_on_looks_only_through_what_is_left_of_its_window() -> None:
    """Frames that come before the one waited for (a device's events before its reply) do
    not each open a window: one wait looks through one window at most, and woke() measures
    the whole wait, so a device that paces its events shrinks the window too."""
    clock = Clock()
    window = PollWindow(MAX, clock)
    window.ns = 40_000

    def event_after(ns: int) -> Callable[[], bool]:
        def ready() -> bool:
            clock.ns += 1_000
            return clock.ns >= due

        due = clock.ns + ns
        return ready

    assert window.poll(event_after(25_000))  # an event, 25 us into the wait
    assert window.poll(event_after(10_000), again=True)  # another, 35 us in
    start = clock.ns
    assert not window.poll(event_after(50_000), again=True)  # the reply: past the window
    assert clock.ns - start <= 6_000  # it looked through the 5 us left, no more
    clock.ns += 500_000  # asleep until the reply, past MAX
    window.woke()
    assert window.ns == 20_000  # a wait that long shrinks the window


def test_a_window_of_no_maximum_never_looks_and_a_negative_one_is_refused() -> None:
    clock = Clock()
    window = PollWindow(0, clock)
    for _ in range(3):
        assert not window.poll(lambda: True)
        window.woke()
    assert (window.ns, window.polls) == (0, 0)
    with pytest.raises(ValueError, match="a poll window of -1 ns"):
        PollWindow(-1)


def test_one_wait_never_lasts_the_maximum_twice() -> None:
    """The longest a window gets is max_ns: the default is KVM's halt_poll_ns on x86."""
    assert MAX_POLL_NS == 200_000
    clock = Clock()
    window = PollWindow(MAX_POLL_NS, clock)
    assert max(_grown(window, clock, [1_000] * 20)) == MAX_POLL_NS


# -- the device's end ----------------------------------------------------------------------------
def _device_pair(poll_ns: int) -> tuple[MonitorEnd, Channel]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return MonitorEnd(ours), Channel(theirs, 1 << 20, poll_ns=poll_ns)


def _later(seconds: float, call: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        call()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_device_catches_a_frame_that_comes_while_it_looks() -> None:
    monitor, channel = _device_pair(LONG_S * 10**9)
    channel.window.ns = LONG_S * 10**9
    try:
        sender = _later(0.02, lambda: monitor.send(b"read"))
        assert channel.recv() == b"read"
        sender.join()
        assert (channel.window.polls, channel.window.caught) == (1, 1)
    finally:
        monitor.close()
        channel.close()


def test_the_device_sleeps_through_a_window_of_nothing_and_learns_from_the_wait() -> None:
    monitor, channel = _device_pair(LONG_S * 10**9)
    try:
        assert channel.window.ns == 0
        sender = _later(0.02, lambda: monitor.send(b"read"))
        assert channel.recv() == b"read"  # asleep in its read: a window of 0
        sender.join()
        assert channel.window.ns == GROW_START_NS  # a 20 ms wait: under the maximum
    finally:
        monitor.close()
        channel.close()


def test_a_monitor_that_hangs_up_while_the_device_looks_ends_the_look_at_once() -> None:
    monitor, channel = _device_pair(LONG_S * 10**9)
    channel.window.ns = LONG_S * 10**9
    try:
        closer = _later(0.02, monitor.close)
        start = time.monotonic()
        with pytest.raises(ChannelClosed):
            channel.recv()
        assert time.monotonic() - start < LONG_S / 3
        closer.join()
    finally:
        channel.close()


# -- the vCPU's wait for its reply ------------------------------------------------------------------
def _ready_device(tmp_path: Path) -> tuple[DeviceChannel, socket.socket]:
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    ready = wire.encode_ready()
    peer.sendall(bytes((0, len(ready))) + ready)
    ch.wait_ready(_Alive(), timeout_ms=2000)  # type: ignore[arg-type]
    ours = _recv_exact(peer, 64 + 2)  # the monitor's greeting, its READY's header
    _recv_exact(peer, ours[-1])
    ch.access_poll = PollWindow(LONG_S * 10**9)
    ch.access_poll.ns = LONG_S * 10**9
    return ch, peer


def test_a_reply_that_comes_while_the_vcpu_looks_is_caught(tmp_path: Path) -> None:
    ch, peer = _ready_device(tmp_path)

    def answer() -> None:
        seq = wire.FRAME.unpack(_recv_frame(peer))[3]
        time.sleep(0.02)
        reply = wire.encode_read_done(seq, b"\x5a", None)
        peer.sendall(bytes((0, len(reply))) + reply)

    try:
        thread = threading.Thread(target=answer)
        thread.start()
        assert ch.read(5, 1) == b"\x5a"
        thread.join()
        assert (ch.access_poll.polls, ch.access_poll.caught) == (1, 1)
    finally:
        peer.close()
        ch.close()


@pytest.mark.parametrize(
    ("last_bytes", "error"),
    [(b"", "closed its end of the channel"), (b"\x01\x00", "sent a multipart message")],
)
def test_a_device_that_hangs_up_or_breaks_zmtp_while_the_vcpu_looks_fails_at_once(
    tmp_path: Path, last_bytes: bytes, error: str
) -> None:
    """The look ends with the connection, or with bytes the channel refuses: a dead or
    hostile device costs the vCPU no window, whatever its length."""
    ch, peer = _ready_device(tmp_path)

    def end() -> None:
        _recv_frame(peer)
        time.sleep(0.02)
        if last_bytes:
            peer.sendall(last_bytes)
        else:
            peer.close()

    try:
        thread = threading.Thread(target=end)
        thread.start()
        start = time.monotonic()
        with pytest.raises(ChannelError, match=error):
            ch.read(5, 1)
        assert time.monotonic() - start < LONG_S / 3
        thread.join()
    finally:
        peer.close()
        ch.close()


def test_one_wait_with_events_before_its_reply_adapts_the_window_once(tmp_path: Path) -> None:
    """Frames read after the one the wait slept for were each taken for a wait of their own:
    three events in front of a reply took the window from 0 to 80 us in one wait (and a slow
    one halved it once per event). KVM adapts halt_poll_ns once per halt."""
    ch, peer = _ready_device(tmp_path)
    ch._on_event = lambda e: None
    now = [0]

    def clock() -> int:  # each reading 15 us on: the whole wait well inside MAX_POLL_NS
        now[0] += 15_000
        return now[0]

    ch.access_poll = PollWindow(MAX_POLL_NS, clock_ns=clock)  # ns = 0: straight to sleep

    def answer() -> None:
        seq = wire.FRAME.unpack(_recv_frame(peer))[3]
        time.sleep(0.00002)
        report = events.encode_report("x")
        reply = wire.encode_read_done(seq, b"\x5a", None)
        data = b"".join(bytes((0, len(f))) + f for f in [report, report, report, reply])
        peer.sendall(data)  # all at once: the vCPU sleeps once, for the first of them

    try:
        thread = threading.Thread(target=answer)
        thread.start()
        assert ch.read(5, 1) == b"\x5a"
        thread.join()
        # one wait that a window of MAX would have caught: one step up, as KVM grows
        assert ch.access_poll.ns == GROW_START_NS, ch.access_poll.ns
    finally:
        peer.close()
        ch.close()


# -- a device that paces its events before its reply -----------------------------------------------
EVENTS = 200  # under MAX_EVENTS_PER_REQUEST
GAP_S = 150e-6  # each event a little inside a full window of MAX_POLL_NS


def _paced_device(path: str) -> None:
    """Its own process (no GIL shared with the vCPU): READY, then for each of two reads,
    EVENTS reports GAP_S apart, then the reply."""
    peer = _raw_peer(Path(path))
    ready = wire.encode_ready()
    peer.sendall(bytes((0, len(ready))) + ready)
    ours = _recv_exact(peer, 64 + 2)
    _recv_exact(peer, ours[-1])
    report = events.encode_report("busy")
    for _ in range(2):
        seq = wire.FRAME.unpack(_recv_frame(peer))[3]
        for _ in range(EVENTS):
            until = time.perf_counter() + GAP_S
            while time.perf_counter() < until:
                pass
            peer.sendall(bytes((0, len(report))) + report)
        reply = wire.encode_read_done(seq, b"\x5a", None)
        peer.sendall(bytes((0, len(reply))) + reply)
    time.sleep(1)
    peer.close()


def test_a_device_pacing_events_inside_the_window_costs_the_vcpu_one_window(
    tmp_path: Path,
) -> None:
    """Each event before the reply opened a new window: a device that spaced 200 of them just
    inside one kept the vCPU spinning ~25 ms of one access (events.py's MAX_EVENTS_PER_REQUEST
    bounds the events' checking, ~20 us each, not windows of 200 us), under SLOW_REPLY_MS, so
    never charged."""
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    ch = DeviceChannel("serial", f"ipc://{path}", listening.detach(), on_event=lambda e: None)
    device = multiprocessing.get_context("fork").Process(target=_paced_device, args=(str(path),))
    device.start()
    try:
        ch.wait_ready(_Alive(), timeout_ms=5000)  # type: ignore[arg-type]
        ch.access_poll.ns = MAX_POLL_NS  # grown by the back-to-back reads before
        looking_ns = 0
        poll = ch.access_poll.poll

        def timed(*args: object, **kwargs: object) -> bool:
            nonlocal looking_ns
            start = time.monotonic_ns()
            try:
                return poll(*args, **kwargs)  # type: ignore[arg-type]
            finally:
                looking_ns += time.monotonic_ns() - start

        ch.access_poll.poll = timed  # type: ignore[method-assign]
        assert ch.read(5, 1) == b"\x5a"  # warm-up
        looking_ns = 0
        assert ch.read(5, 1) == b"\x5a"
        assert looking_ns < 10 * MAX_POLL_NS, (
            f"one access looked for {looking_ns / 1e6:.1f} ms, {EVENTS} events"
            f" {GAP_S * 1e6:.0f} us apart: a window each"
        )
    finally:
        device.join(5)
        ch.close()


# -- a process confined to one CPU -----------------------------------------------------------------
def _window_max_ns(tmp_path: Path, cpus: set[int]) -> int:
    path = tmp_path / f"dev{len(cpus)}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # the backlog takes the connection
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        channel = runtime._connect(f"ipc://{path}")
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        return channel.window.max_ns
    finally:
        channel.close()
        listener.close()


def test_a_device_confined_to_one_cpu_never_looks_for_the_next_access(tmp_path: Path) -> None:
    """A device process confined to one CPU (a one-CPU host, a VM run under taskset or in a
    cpuset) shares it with the vCPU thread whose next access it looks for: its look holds the
    CPU the guest needs to make that access. Measured (bench/exit_rtt.py's forwarded IIR read,
    pio-loop at CPL3, taskset -c 1, 3000 reads): 169-173 us before 120f214, 248-257 us after;
    the device's window alone (the vCPU's off) 228-249, the vCPU's alone (the device's off)
    167-172. The window does not adapt it away: each wait is the window plus the guest's time,
    so it swings between 100 and 200 us and never reaches 0. KVM polls only while no other task
    is runnable on its CPU (single_task_running()); a process confined to one CPU never knows
    that, so it must not look at all."""
    one = {min(os.sched_getaffinity(0))}
    assert _window_max_ns(tmp_path, one) == 0


def test_a_device_with_cpus_to_spare_looks_through_the_window(tmp_path: Path) -> None:
    allowed = os.sched_getaffinity(0)
    assert _window_max_ns(tmp_path, allowed) == (MAX_POLL_NS if len(allowed) > 1 else 0)
