"""DeviceChannel.drain_events' charge (monitor/channel.py): the CPU a device's events cost the
monitor is charged to its latency budget; the host's stalls are not the device's doing.

A channel without a socket: its link (monitor/zmtp.py ZmtpLink) a queue of frames, its event handling a stand-in that either
burns CPU (checking a hostile 64 KiB publish whole takes ~25-30 ms) or sleeps (standing in
for a monitor thread the host preempted)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from splitvmm.monitor import channel
from splitvmm.monitor.budget import LatencyBudget

EVENT_S = 0.030


class QueueLink:
    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def frame_ready(self, chunks: int = 4) -> bool:
        return bool(self.queue)

    def take(self) -> bytes:
        return self.queue.pop(0)


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def drained_channel(handle) -> channel.DeviceChannel:
    ch = channel.DeviceChannel.__new__(channel.DeviceChannel)
    ch._link = QueueLink()  # type: ignore[assignment]
    ch.mirror = SimpleNamespace(news_taken=lambda: None)  # type: ignore[assignment]
    ch._budget = LatencyBudget(
        channel.LATENCY_BUDGET_MS, channel.LATENCY_WINDOW_S, channel.SLOW_REPLY_MS
    )
    ch._handled_event = handle  # type: ignore[method-assign]
    return ch


def test_a_device_pacing_costly_events_to_each_drain_spends_its_budget():
    """Two events a drain, the queue empty right after the limit: every drain is charged
    (a drain charged only when its limit cut it short let this go on for ever)."""
    ch = drained_channel(lambda buf: burn(EVENT_S) or True)
    drains = 0
    with pytest.raises(channel.ChannelError, match="over the budget"):
        while drains < 200:
            drains += 1
            ch._link.queue[:] = [b"e", b"e"]  # type: ignore[attr-defined]
            ch.drain_events()
    assert drains * 2 * EVENT_S * 1e3 <= 2 * channel.LATENCY_BUDGET_MS


def test_a_drain_the_host_stalled_is_not_the_devices_doing():
    ch = drained_channel(lambda buf: time.sleep(EVENT_S) or True)
    for _ in range(channel.LATENCY_BUDGET_MS // int(2 * EVENT_S * 1e3) + 5):  # over, if charged
        ch._link.queue[:] = [b"e", b"e"]  # type: ignore[attr-defined]
        ch.drain_events()


def test_a_drain_stops_at_its_cpu_limit_and_leaves_the_rest_for_the_next():
    ch = drained_channel(lambda buf: burn(EVENT_S) or True)
    ch._link.queue[:] = [b"e"] * 10  # type: ignore[attr-defined]
    ch.drain_events()
    left = len(ch._link.queue)  # type: ignore[attr-defined]
    assert 10 - left == int(channel.DRAIN_LIMIT_S / EVENT_S) + 1  # one more past the limit
