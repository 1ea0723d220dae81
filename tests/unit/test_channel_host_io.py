"""DeviceChannel and a device inside a host I/O call (monitor/channel.py, the module
docstring): past a deadline it is waited for while its flag says so, uncharged; the
heartbeat's ping goes on without it. A real channel, to a libzmq PAIR socket; the device is a thread that
answers late, its flag a variable."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from splitvmm.monitor import channel as channel_module
from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.protocol import control, events, wire, zmtp

LATE_S = 0.6  # the device's answer, past the requests' 200 ms deadlines
DEADLINE_MS = 200


class LateDevice:
    """A device end that answers each ping LATE_S after it came, in order."""

    def __init__(self, zctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.in_host_io = False
        self.sock = zctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            msg = control.decode(self.sock.recv())
            time.sleep(LATE_S)
            self.sock.send(control.encode({"op": "pong", "seq": msg["seq"]}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[DeviceChannel, LateDevice]]:
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    device: list[LateDevice] = []
    ch = DeviceChannel(
        "serial", f"ipc://{path}", listening.detach(), host_io=lambda: device[0].in_host_io
    )
    device.append(LateDevice(zctx, f"ipc://{path}"))
    yield ch, device[0]
    device[0].close()
    ch.close()
    zctx.term()


def test_a_late_answer_from_a_device_not_in_host_io_fails_it(pair):
    ch, _ = pair
    with pytest.raises(ChannelError, match=f"no reply within {DEADLINE_MS} ms"):
        ch.control("ping", DEADLINE_MS)


def test_a_device_in_a_host_io_call_is_waited_for_past_the_deadline(pair):
    ch, device = pair
    device.in_host_io = True
    start = time.monotonic()

    ch.control("ping", DEADLINE_MS)  # answered LATE_S later: no failure

    assert time.monotonic() - start >= LATE_S


def test_a_wait_on_host_io_is_not_charged_to_the_latency_budget(pair, monkeypatch):
    """A vCPU's access (read, sync) charges a slow answer to the device's budget; one that
    waited on the device's disk is not the device's doing."""
    ch, device = pair
    monkeypatch.setattr(channel_module, "READ_TIMEOUT_MS", DEADLINE_MS)
    charged: list[float] = []
    monkeypatch.setattr(ch._budget, "charge", charged.append)
    device.in_host_io = True
    ch._access(control.encode({"op": "ping", "seq": ch._next_seq()}))
    device.in_host_io = False
    monkeypatch.setattr(channel_module, "READ_TIMEOUT_MS", 2000)
    ch._access(control.encode({"op": "ping", "seq": ch._next_seq()}))

    assert len(charged) == 1 and charged[0] >= LATE_S * 1e3  # the second only


def test_a_ping_to_a_device_in_host_io_returns_and_its_late_answer_is_dropped(pair):
    ch, device = pair
    device.in_host_io = True
    start = time.monotonic()

    assert ch.ping(DEADLINE_MS) is False  # the supervisor goes on to the other devices
    assert time.monotonic() - start < LATE_S
    assert ch.ping(DEADLINE_MS) is False  # one ping waits at a time: none sent
    device.in_host_io = False
    assert ch.ping(2000) is True  # the late pong came first, and was dropped


def test_stats_to_a_device_in_host_io_wait_one_at_a_time(pair):
    """`ctl devices` polled through a long stall: one stats request waits, the rest are not
    sent (each used to add a late answer, and the eighth failed the device)."""
    ch, device = pair
    device.in_host_io = True
    for _ in range(channel_module.MAX_LATE_STATS + 2):
        assert ch.stats(DEADLINE_MS) is None
    assert list(ch._late.values()) == ["counters"]


def test_a_posted_write_starts_its_own_host_io_wait(pair):
    """A post that waits on a device in host I/O logs how long it has waited: from its own
    start, not from a request's before it."""
    ch, _ = pair
    ch._waited_on_host_io, ch._host_io_since = True, 0.0  # what an earlier request left

    ch.post(control.encode({"op": "ping", "seq": ch._next_seq()}))

    assert ch._waited_on_host_io is False


def test_a_ping_to_a_device_in_host_io_that_never_drains_its_queue_returns(tmp_path, monkeypatch):
    """The heartbeat pings every device from one thread. A device whose queue is full and
    whose flag says it is in a host I/O call (its disk's, or a compromised device's lie) held
    that thread in the ping's send for as long as the flag stayed set, and with it every
    other device's heartbeat. The ping gives up on it, as on a late answer, and leaves no
    late answer to wait for: it was never sent."""
    monkeypatch.setattr(channel_module, "WRITE_TIMEOUT_MS", 100)
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    in_host_io = [False]
    ch = DeviceChannel("serial", f"ipc://{path}", listening.detach(), host_io=lambda: in_host_io[0])
    device = zctx.socket(zmq.PAIR)  # connected, reading nothing
    device.setsockopt(zmq.LINGER, 0)
    device.setsockopt(zmq.RCVHWM, 1)
    device.connect(f"ipc://{path}")
    alive = subprocess.Popen(["sleep", "60"])  # its process: alive, so its pidfd stays quiet
    pidfd = os.pidfd_open(alive.pid)
    ch.watch_process(SimpleNamespace(pidfd=pidfd))  # type: ignore[arg-type]
    try:
        ping = zmtp.encode(control.encode({"op": "ping", "seq": 0}))
        deadline = time.monotonic() + 10
        while not ch._link.reader.ready and time.monotonic() < deadline:  # its handshake
            ch.drain_events()
            time.sleep(0.01)
        full_since = None  # fill every queue on the way to the device, until it stays full
        while full_since is None or time.monotonic() - full_since < 0.5:
            if ch._link.send(ping) and ch._link.flush():
                full_since = None
            else:  # taken, or not: what follows waits for room now
                full_since = full_since or time.monotonic()
                time.sleep(0.01)
        in_host_io[0] = True
        answered: list[bool] = []
        beat = threading.Thread(target=lambda: answered.append(ch.ping(DEADLINE_MS)))
        beat.start()
        beat.join(5.0)
        assert (beat.is_alive(), answered, ch._late) == (False, [False], {})
    finally:
        alive.kill()
        alive.wait()
        beat.join(5.0)
        os.close(pidfd)
        device.close()
        ch.close()
        zctx.term()


@contextlib.contextmanager
def channel_to_a_device(
    tmp_path: Path, serve: Callable[[zmq.Socket[bytes]], None] | None = None, **options: Any
) -> Iterator[DeviceChannel]:
    """A serial channel whose device end is a PAIR socket the test drives: `serve(socket)`
    on a thread, joined on leaving (None: a device that never answers)."""
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    ch = DeviceChannel("serial", f"ipc://{path}", listening.detach(), **options)
    device = zctx.socket(zmq.PAIR)
    device.setsockopt(zmq.LINGER, 0)
    device.connect(f"ipc://{path}")
    thread = None if serve is None else threading.Thread(target=serve, args=(device,), daemon=True)
    if thread is not None:
        thread.start()
    try:
        yield ch
    finally:
        if thread is not None:
            thread.join(5)
        device.close()
        ch.close()
        zctx.term()


def test_a_stopping_vm_gives_up_waiting_on_a_device_that_says_it_is_in_host_io(tmp_path):
    """The flag is the device's to write: one that set it and never answered held a vCPU's
    read, a snapshot's quiesce and the teardown's sync for ever, and the monitor never
    exited. Once the VM stops (Machine.stop -> DeviceSlot.give_up_host_io), the request
    in progress ends at the end of its slice, failing the device, as any late answer."""
    outcome: list[BaseException] = []
    with channel_to_a_device(tmp_path, host_io=lambda: True) as ch:  # it never answers

        def ask() -> None:
            try:
                ch.control("ping", DEADLINE_MS)
            except ChannelError as e:
                outcome.append(e)

        waiting = threading.Thread(target=ask, daemon=True)
        waiting.start()
        waiting.join(3 * DEADLINE_MS / 1000)
        assert waiting.is_alive()  # waited for past its deadline: the device's disk
        ch.give_up_host_io()
        waiting.join(5)
        assert not waiting.is_alive()
        assert len(outcome) == 1 and f"no reply within {DEADLINE_MS} ms" in str(outcome[0])


def test_answers_to_a_devices_route_requests_do_not_widen_its_allowance_of_events(tmp_path):
    """MAX_EVENTS_PER_REQUEST bounds the events around a request, plus one MIRROR per guest
    frame posted since the last. The slot's answers to route requests were posts too, so a
    device asking for routes grew the next request's allowance by one an answer, without
    bound (the review counted 3060 events accepted around one ping)."""
    holder: list[DeviceChannel] = []

    def on_event(event: events.Event) -> None:  # as DeviceSlot answers a route request
        assert isinstance(event, events.RouteRequest)
        holder[0].answer(events.encode_route_done(event.id, True, ""))

    def serve(device: zmq.Socket[bytes]) -> None:
        for count in (events.MAX_EVENTS_PER_REQUEST - 1, events.MAX_EVENTS_PER_REQUEST + 1):
            msg = control.decode(device.recv())
            while msg["op"] != "ping":  # the answers to its last requests
                msg = control.decode(device.recv())
            for i in range(count):
                device.send(events.encode_route(i, 4))
            device.send(control.encode({"op": "pong", "seq": msg["seq"]}))

    with channel_to_a_device(tmp_path, serve, on_event=on_event) as ch:
        holder.append(ch)
        assert ch.ping(5000) is True  # 255 events, each answered
        with pytest.raises(ChannelError, match="sent more than 256 events around one request"):
            ch.ping(5000)  # 257: over the allowance, which the answers did not widen


def test_a_stats_request_met_with_a_broken_frame_fails_the_device(tmp_path):
    """stats() takes a late answer for no failure, and took every ChannelError for one: a
    frame that breaks the protocol around it (here a MIRROR of registers the model does not
    mirror) was dropped in silence, where around any other request it fails the device."""

    def serve(device: zmq.Socket[bytes]) -> None:
        msg = control.decode(device.recv())
        device.send(wire.FRAME.pack(wire.Op.MIRROR, 0xFF, 0, 0, 0, b"\x01" * 8))
        device.send(control.encode({"op": "counters", "seq": msg["seq"], "counters": {}}))

    with channel_to_a_device(tmp_path, serve) as ch:
        with pytest.raises(ChannelError, match="bad register mirror"):
            ch.stats(5000)


def test_a_stats_request_whose_events_run_past_its_deadline_is_late_not_failed(tmp_path):
    """The device answers stats in time, but an event it sent first takes the monitor past
    the 200 ms deadline to handle (a routing ioctl, a loaded host): late, as before, not a
    device to fail (its on_crash would stop the VM over a `ctl status --json`)."""

    def serve(device: zmq.Socket[bytes]) -> None:
        msg = control.decode(device.recv())
        time.sleep(channel_module.STATS_TIMEOUT_MS / 1000 - 0.03)
        device.send(events.encode_report("busy"))
        device.send(control.encode({"op": "counters", "seq": msg["seq"], "counters": {}}))

    with channel_to_a_device(tmp_path, serve, on_event=lambda e: time.sleep(0.05)) as ch:
        assert ch.stats() is None
