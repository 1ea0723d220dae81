"""The device process's event loop (devprocs/eventloop.py) with a real channel (a socketpair) and
real eventfds, and a model that watches fds and has timed events, or a virtio device whose
driver never lets its ring run dry. No device process, no KVM."""

from __future__ import annotations

import os

import pytest

from splitvmm.devprocs.base import DeviceContext, Source
from splitvmm.devprocs.eventloop import EventLoop
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.runtime import Checkpoints, _serve_frame
from splitvmm.devprocs.virtio_rng import VirtioRng
from splitvmm.protocol import control
from splitvmm.record import Struct, field
from tests.fakes import FakeIrq, channel_pair
from tests.virtio.support import Driver, Ring, close_fds, host_fds, prepared


class Recorder(Struct):
    """A model with an fd it watches while `watching`, and a deadline."""

    ctx: DeviceContext
    kick: int
    watching: bool = True
    deadline: float | None = None
    events: list[str] = field(default_factory=list)

    def event_sources(self) -> list[Source]:
        return [Source(self.kick, self.on_kick)] if self.watching else []

    def on_kick(self) -> None:
        os.eventfd_read(self.kick)
        self.events.append("kick")

    def next_deadline(self) -> float | None:
        return self.deadline

    def tick(self, now: float) -> None:
        self.events.append(f"tick@{now:g}")
        self.deadline = None


@pytest.fixture
def channel():
    monitor, device = channel_pair()
    yield monitor, device
    monitor.close()
    device.close()


@pytest.fixture
def model():
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield Recorder(DeviceContext(irq=FakeIrq()), kick)
    os.close(kick)


def loop_for(model, device_sock, frames, clock=None):
    if clock is None:
        return EventLoop(model, device_sock, frames.append)
    return EventLoop(model, device_sock, frames.append, clock=clock)


def test_eventloop_kicked_source_runs_its_callback_then_a_frame(channel, model):
    monitor, device = channel
    frames: list[bytes] = []
    loop = loop_for(model, device, frames)
    os.eventfd_write(model.kick, 1)
    monitor.send(b"frame")

    loop.step()

    assert (model.events, frames) == (["kick"], [b"frame"])


def test_eventloop_source_no_longer_watched_is_left_alone(channel, model):
    monitor, device = channel
    frames: list[bytes] = []
    model.watching = False
    os.eventfd_write(model.kick, 1)
    monitor.send(b"frame")

    loop_for(model, device, frames).step()

    assert (model.events, frames) == ([], [b"frame"])
    assert os.eventfd_read(model.kick) == 1  # still pending: back-pressure holds it


def test_eventloop_past_deadline_ticks_without_a_frame(channel, model):
    _, device = channel
    model.deadline = 99.5

    def clock() -> float:
        return 100.0

    model.watching = False
    frames: list[bytes] = []

    loop_for(model, device, frames, clock=clock).step()

    assert (model.events, frames) == (["tick@100"], [])


def test_eventloop_lends_the_model_its_waiting(channel, model):
    _, device = channel
    loop = loop_for(model, device, [])

    assert model.ctx.waiting == loop.waiting


def test_eventloop_waiting_sees_a_frame_without_taking_it(channel, model):
    """Asked in the middle of a model's callback: nothing ready, then a frame, which the
    next step still serves."""
    monitor, device = channel
    frames: list[bytes] = []
    loop = loop_for(model, device, frames)
    assert not loop.waiting()

    monitor.send(b"frame")

    assert loop.waiting()
    loop.step()
    assert frames == [b"frame"] and not loop.waiting()


def test_eventloop_waiting_sees_a_readable_fd_only_while_the_model_watches_it(channel, model):
    _, device = channel
    loop = loop_for(model, device, [])
    os.eventfd_write(model.kick, 1)

    assert loop.waiting()
    model.watching = False  # back-pressure: the fd stays pending, and nobody waits on it
    assert not loop.waiting()
    assert os.eventfd_read(model.kick) == 1


def test_eventloop_waiting_sees_a_deadline_passed(channel, model):
    _, device = channel
    now = [99.0]
    loop = loop_for(model, device, [], clock=lambda: now[0])
    model.watching, model.deadline = False, 99.5

    assert not loop.waiting()
    now[0] = 99.5
    assert loop.waiting()


# -- a virtio device's long drain under the loop ----------------------------------------------
@pytest.fixture
def rng_under_loop(channel):
    """virtio-rng (the transport's budget, no state of its own) under a real loop, with a
    driver that refills its ring from inside each request: the ring never runs dry until
    the driver stops, after `chains` requests."""
    _, device_sock = channel
    fds = host_fds("virtio-rng")
    rng = VirtioRng(prepared("virtio-rng", fds))
    frames: list[bytes] = []
    loop = EventLoop(rng, device_sock, frames.append)
    yield rng, fds, loop, frames
    close_fds(fds)


def keep_busy(rng, chains: int, on_chain=None) -> list[str]:
    """Start the driver, set a zero budget (spent after every chain), and make each served
    chain add the next until `chains` were served; returns the log of what ran, in order."""
    ring = Ring(rng.ram)
    Driver(rng).start(ring)
    rng.BUDGET_NS = 0
    log: list[str] = []
    served = rng.handle

    def handle(q, chain):
        log.append("chain")
        if on_chain is not None:
            on_chain(log.count("chain"))
        if log.count("chain") < chains:
            ring.add([(*ring.buffer(8), True)])
        return served(q, chain)

    rng.handle = handle
    ring.add([(*ring.buffer(8), True)])
    return log


def test_eventloop_lets_a_drain_run_on_while_nothing_else_waits(rng_under_loop):
    rng, fds, loop, _ = rng_under_loop
    log = keep_busy(rng, chains=20)
    os.eventfd_write(fds["notify0"], 1)  # the guest's kick

    loop.step()

    assert log.count("chain") == 20  # all in the one step the kick started
    assert (rng.stats()["budget_renewals"], rng.stats()["budget_yields"]) == (20, 0)


def test_eventloop_serves_a_frame_that_comes_mid_drain_at_the_end_of_that_budget(
    rng_under_loop, channel
):
    """The drain yields at its next spent budget (waiting() has read the frame), and the
    step serves the frame before it ends; the notify the drain signalled for itself runs
    the next budget, in the next step."""
    monitor, _ = channel
    rng, fds, loop, _ = rng_under_loop

    def frame_after_chain_5(served: int) -> None:
        if served == 5:
            monitor.send(b"frame")

    log = keep_busy(rng, chains=20, on_chain=frame_after_chain_5)
    loop.serve_frame = lambda buf: log.append("frame")
    os.eventfd_write(fds["notify0"], 1)

    loop.step()
    assert log.count("chain") == 5 and rng.stats()["budget_yields"] == 1
    assert log[-1] == "frame"
    loop.step()
    assert log.count("chain") > 5 and log.count("frame") == 1


def test_eventloop_resume_replies_before_the_quiesced_queue_is_served(rng_under_loop, channel):
    """The monitor's resume waits for its reply (its vCPUs too): the reply goes first, and the
    chain made available while quiesced is served by the loop's next step."""
    monitor, device_sock = channel
    rng, fds, loop, _ = rng_under_loop
    checkpoints, injector = Checkpoints(rng), FaultInjector()
    loop.serve_frame = lambda buf: _serve_frame(rng, device_sock, buf, checkpoints, injector)
    ring = Ring(rng.ram)
    Driver(rng).start(ring)
    monitor.send(control.encode({"op": "quiesce", "seq": 1}))
    loop.step()
    assert control.decode(monitor.recv())["seq"] == 1
    ring.add([(*ring.buffer(8), True)])
    os.eventfd_write(fds["notify0"], 1)  # the guest's kick, not watched while quiesced

    monitor.send(control.encode({"op": "resume", "seq": 2}))
    loop.step()

    assert control.decode(monitor.recv(0))["seq"] == 2
    assert ring.take_used() == []
    loop.step()
    assert len(ring.take_used()) == 1


@pytest.mark.parametrize(
    ("left_us", "polled_ms", "waited_us"), [(300, 0, 300), (976.5625, 0, 976.5625), (2500, 2, None)]
)
def test_eventloop_deadline_is_waited_for_to_the_microsecond_never_a_millisecond_late(
    channel, model, left_us, polled_ms, waited_us
):
    """The rtc's periodic interrupt at the PC's 1024 Hz (register A = 0x26) is due every
    976.5625 us: poll(2)'s timeout rounded up to whole milliseconds ticked it up to a
    millisecond late, and a guest got about two interrupts for every three periods (~700 a
    second, measured). The whole milliseconds go to poll(2), rounded down, and what is left
    under one to pselect6(2)'s microseconds; the tick still waits for clock() >= deadline."""
    _, device = channel
    now = 1000.0
    model.watching, model.deadline = False, now + left_us * 1e-6
    loop = loop_for(model, device, [], clock=lambda: now)
    polled: list[int | None] = []
    waited: list[float] = []
    loop._poll = lambda line, sources, timeout_ms: polled.append(timeout_ms) or {}  # type: ignore[method-assign]
    loop._wait = lambda line, sources, seconds: waited.append(seconds)  # type: ignore[method-assign]

    loop.step()

    assert polled == [polled_ms]
    assert waited == ([] if waited_us is None else [pytest.approx(waited_us * 1e-6)])
    assert model.events == []  # not due yet: no tick
