"""The device process's event loop (devprocs/eventloop.py) with a real ZeroMQ channel and
real eventfds, and a model that watches fds and has timed events. No device process, no KVM."""

from __future__ import annotations

import os

import pytest
import zmq

from splitvmm.devprocs.base import DeviceContext, Source
from splitvmm.devprocs.eventloop import EventLoop
from splitvmm.record import Struct, field
from tests.fakes import FakeIrq


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
    ctx = zmq.Context()
    monitor, device = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    monitor.bind("inproc://loop")
    device.connect("inproc://loop")
    yield monitor, device
    monitor.close(linger=0)
    device.close(linger=0)
    ctx.term()


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
