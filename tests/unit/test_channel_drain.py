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
from splitvmm.protocol import control, wire

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
    ch._checked_ms = 0.0
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


def test_a_device_pacing_costly_events_under_the_threshold_spends_its_budget():
    """One event a drain, each costing a little under SLOW_REPLY_MS: no drain was ever
    charged, however many came (they run on vCPU threads, with the GIL held)."""
    under_s = 0.8 * channel.SLOW_REPLY_MS / 1000
    ch = drained_channel(lambda buf: burn(under_s) or True)
    drains = 0
    with pytest.raises(channel.ChannelError, match="over the budget"):
        while drains < 300:
            drains += 1
            ch._link.queue[:] = [b"e"]  # type: ignore[attr-defined]
            ch.drain_events()
    assert drains * under_s * 1e3 <= 2 * channel.LATENCY_BUDGET_MS


def test_cheap_events_and_empty_drains_add_up_to_nothing_to_speak_of():
    """What an honest device's drains cost: most find nothing; an event's check is cheap."""
    ch = drained_channel(lambda buf: True)
    for i in range(20000):
        ch._link.queue[:] = [b"e"] if i % 30 == 0 else []  # type: ignore[attr-defined]
        ch.drain_events()
    assert sum(ch._budget._spent) == 0  # nothing charged


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


@pytest.mark.parametrize("request_kind", ["ping", "stats", "control"])
@pytest.mark.parametrize("cost_s", [2 * EVENT_S, 0.04], ids=["slow", "paced-under-threshold"])
def test_a_device_sending_costly_events_before_each_answer_spends_its_budget(request_kind, cost_s):
    """The events around a ping, a stats or a control request were never charged: a device
    that sent ~1 s of costly-to-check publishes before each pong held the supervisor (and
    the GIL) that long every heartbeat, for ever, where the same CPU in a drain fails it.
    Paced to just under SLOW_REPLY_MS a request (~40 ms: 256 route requests, each a whole
    KVM_SET_GSI_ROUTING), they were not charged either, where a drain's add up."""
    ch = drained_channel(lambda buf: True)
    ch._seq, ch._late, ch._host_io, ch._model = 0, {}, None, "serial"
    ch._pidfd = None

    def answer(frame: bytes, timeout_ms: int, wait_host_io: bool = True) -> bytes:
        burn(cost_s)  # checking the events it sent before its answer
        msg = control.decode(frame)
        reply = {"ping": {"op": "pong"}, "stats": {"op": "counters", "counters": {}}}
        return control.encode({"seq": msg["seq"], **reply.get(msg["op"], {"op": "quiesced"})})

    ch._request = answer  # type: ignore[method-assign]
    ask = {
        "ping": lambda: ch.ping(2000),
        "stats": lambda: ch.stats(2000),
        "control": lambda: ch.control("quiesce", 2000),
    }[request_kind]
    answered = 0
    with pytest.raises(channel.ChannelError, match="over the budget"):
        while answered < 200:
            ask()
            answered += 1
    assert answered * cost_s * 1e3 <= 2 * channel.LATENCY_BUDGET_MS


def test_a_ping_the_host_stalled_is_not_the_devices_doing():
    ch = drained_channel(lambda buf: True)
    ch._seq, ch._late, ch._host_io, ch._model = 0, {}, None, "serial"

    def answer(frame: bytes, timeout_ms: int, wait_host_io: bool = True) -> bytes:
        time.sleep(2 * EVENT_S)
        return control.encode({"op": "pong", "seq": control.decode(frame)["seq"]})

    ch._request = answer  # type: ignore[method-assign]
    for _ in range(channel.LATENCY_BUDGET_MS // int(2 * EVENT_S * 1e3) + 5):  # over, if charged
        assert ch.ping(2000)


def access_channel(event_s: float, events: int = 1) -> tuple[channel.DeviceChannel, list[int]]:
    """A channel whose device answers each access with `events` events costing `event_s` of
    the monitor's CPU each (burned by the stand-in check), then the reply; and how many
    accesses it was sent."""
    sent: list[int] = []
    ch = drained_channel(lambda buf: buf == b"e" and (burn(event_s) or True))
    ch._seq, ch._late, ch._host_io, ch._model = 0, {}, None, "virtio-blk"
    ch._pidfd, ch.access_poll, ch._posted, ch._events_ms = None, None, 0, 0.0
    frames: list[bytes | None] = []

    def send(data: bytes, what: str, wait_host_io: bool = True) -> None:
        frames[:] = [*[b"e"] * events, None]  # the events, then the reply to this request
        sent.append(1)

    def recv(deadline: float, poll: object = None, again: bool = False) -> bytes:
        frame = frames.pop(0)
        return frame if frame is not None else wire.encode_read_done(ch._seq, bytes(4))

    ch._send = send  # type: ignore[method-assign]
    ch._recv = recv  # type: ignore[method-assign,assignment]
    return ch, sent


def test_a_device_sending_costly_events_before_each_access_reply_spends_its_budget():
    """A vCPU's read or sync is where a device's route requests come (the sync after an
    MSI-X table write), each a whole KVM_SET_GSI_ROUTING with the GIL held: ~255 of them
    before each reply cost the vCPU ~10-50 ms an access, and an access under SLOW_REPLY_MS
    was never charged. Their CPU past the first event adds up now, as a drain's checking
    does."""
    each_s = 0.3 * channel.SLOW_REPLY_MS / 1000
    ch, sent = access_channel(each_s, events=3)
    with pytest.raises(channel.ChannelError, match="over the budget"):
        while len(sent) < 300:
            ch.read(0, 4)
    assert len(sent) * 2 * each_s * 1e3 <= 2 * channel.LATENCY_BUDGET_MS


def test_one_costly_event_an_access_is_an_honest_devices_and_never_charged(monkeypatch):
    """An honest virtio device asks for a route each time the guest rewrites an unmasked
    MSI-X entry (devprocs/virtio/msix.py): a guest doing so in a loop must not get its
    device failed for the KVM_SET_GSI_ROUTING each write costs.

    The channel times each access's wait on this thread's CPU clock here: the stand-in
    device burns that thread's CPU, and the host's other work (a loaded CI host once held
    one access past SLOW_REPLY_MS, charging it whole) is no part of what it took."""
    monkeypatch.setattr(
        channel, "time", SimpleNamespace(monotonic=time.thread_time, thread_time=time.thread_time)
    )
    budget_ms = 4 * channel.SLOW_REPLY_MS  # a small one: spent within ~20 accesses if charged
    ch, sent = access_channel(0.3 * channel.SLOW_REPLY_MS / 1000)
    ch._budget = LatencyBudget(budget_ms, channel.LATENCY_WINDOW_S, channel.SLOW_REPLY_MS)
    for _ in range(2 * budget_ms // 15 + 5):  # over, if charged
        ch.read(0, 4)
    assert sum(ch._budget._spent) == 0


def test_cheap_events_around_accesses_add_up_to_nothing_to_speak_of():
    ch, sent = access_channel(0.0, events=2)
    for _ in range(5000):
        ch.read(0, 4)
    assert sum(ch._budget._spent) == 0
