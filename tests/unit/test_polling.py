"""How an end of a device channel waits (protocol/polling.py): the adaptive window against a
clock driven by hand, then each end's use of it, the device's (devprocs/channel.py) and the
vCPU's wait for a reply (monitor/channel.py), over real sockets."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from splitvmm.devprocs.channel import Channel, ChannelClosed
from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.protocol import wire
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
