"""virtio-console (devprocs/virtio_console.py, virtio 1.2 5.3): one port over receiveq0 and
transmitq0, against guest RAM memfds, a driver written from the spec (tests/virtio) and an
output line that takes what a test lets it."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from splitvmm.cli.policy import stand_in_fds, stand_in_transport
from splitvmm.devprocs import runtime
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.eventloop import EventLoop
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.progress import Progress
from splitvmm.devprocs.virtio.pci import ISR_QUEUE
from splitvmm.devprocs.virtio_console import RX_BUFFER_MAX, VirtioConsole, VirtioConsoleState
from splitvmm.errors import StateError
from splitvmm.fdline import FdLine
from splitvmm.protocol import codec, wire
from splitvmm.protocol.models import MODELS, FdKind
from tests.fakes import channel_pair
from tests.virtio.support import (
    ACK,
    COMMAND,
    COMMAND_MASTER,
    DEVICE_CFG,
    DRIVER,
    DRIVER_OK,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    NEEDS_RESET,
    Channel,
    Driver,
    Ring,
    close_fds,
    nothing_waits,
    queue_at,
    replaying,
    signalled,
)

TX_BASE, TX_HEAP = 0x8000, 0x80000  # transmitq0's rings and buffers, clear of receiveq0's


class Line:
    """An output line that takes at most `budget` more bytes (None: any amount)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.taken = bytearray()

    def send(self, data: memoryview) -> int:
        n = len(data) if self.budget is None else min(len(data), self.budget)
        if self.budget is not None:
            self.budget -= n
        self.taken += data[:n]
        return n

    def fileno(self) -> int:
        return -1


class Host:
    """The host resources of one virtio-console process: fds, and the output behind them."""

    def __init__(self, out_fd: int | None = None, output: str = "unix:/stand-in") -> None:
        """`out_fd`, the output the config's `output` option named (a socket's is `unix:`)."""
        self.pipe = os.pipe() if out_fd is None else None  # a stand-in `out` when none given
        fd = self.pipe[1] if self.pipe is not None else out_fd
        assert fd is not None
        model = MODELS["virtio-console"]
        self.fds = stand_in_fds(model, Path("/nonexistent"), {FdKind.OUTPUT: fd})
        self.options = {"output": output if out_fd is not None else "stdio"}

    def context(self, line: object, restarted: bool = False) -> DeviceContext:
        ctx = DeviceContext(
            fds=self.fds,
            transport=stand_in_transport(),
            options=self.options,
            restarted=restarted,
            waiting=nothing_waits,
        )
        ctx.out = BoundedOutput(line)  # type: ignore[arg-type]
        VirtioConsole.setup(ctx)
        return ctx

    def close(self) -> None:
        out = self.fds.pop("out")
        close_fds(self.fds)
        os.close(out)
        if self.pipe is not None:
            os.close(self.pipe[0])


def socket_line(h: Host) -> FdLine:
    """The output line on a socket `out`, as a device process builds it, but on a dup: the
    line's socket object owns its fd and closes it when the device is collected, which for a
    device (its sources hold its methods: a cycle) is whenever the garbage collector runs --
    maybe in a later test, after h.close() let `out`'s number go to another fd."""
    return FdLine(os.dup(h.fds["out"]))


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    yield h
    h.close()


def started(dev: VirtioConsole) -> tuple[Driver, Ring, Ring]:
    """The driver's initialisation (3.1.1) with both queues."""
    rx, tx = Ring(dev.ram), Ring(dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    return set_up(dev, rx, tx), rx, tx


def set_up(
    dev: VirtioConsole, rx: Ring, tx: Ring, bus_master: bool = True, driver_ok: bool = True
) -> Driver:
    """The driver's initialisation (3.1.1) with receiveq0 on `rx` and transmitq0 on `tx`;
    without `bus_master`, its queues are enabled with Bus Master Enable clear; without
    `driver_ok`, it stops before DRIVER_OK."""
    driver = Driver(dev)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    if not bus_master:
        driver.wr(COMMAND, driver.rd(COMMAND, 2) & ~COMMAND_MASTER, 2)
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    if driver_ok:
        driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return driver


def transmit(tx: Ring, *parts: bytes) -> int:
    return tx.add([(*tx.buffer(p), False) for p in parts])


def post(rx: Ring, size: int) -> tuple[int, int]:
    """A receive buffer of `size` bytes made available: (head, its gpa)."""
    gpa, _ = rx.buffer(size)
    return rx.add([(gpa, size, True)]), gpa


def flushed(dev: VirtioConsole) -> None:
    """What the event loop does when the line polls writable."""
    if dev.ctx.out.flush():
        dev.output_room()


# -- transmit ---------------------------------------------------------------------------------
def test_virtio_console_transmit_chain_reaches_output_and_completes(host):
    line = Line()
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    head = transmit(tx, b"hello, ", b"world\n")

    driver.kick(1)

    assert bytes(line.taken) == b"hello, world\n" and tx.take_used() == [(head, 0)]


def test_virtio_console_stdio_that_is_a_socket_takes_input_from_the_monitor_not_the_socket():
    """`output = "stdio"` where the monitor's stdout is a socket (socat, inetd, systemd):
    its peer is no input; the input is the monitor's, whose room the device reports. It
    took the socket for a `unix:` peer, reported no room, and got no input at all."""
    peer, ours = socket.socketpair()
    h = Host(ours.detach(), output="stdio")
    dev = VirtioConsole(h.context(socket_line(h)))
    watched = [source.fd for source in dev.event_sources()]
    assert (dev.input_buffer(), h.fds["out"] in watched) == ((0, RX_BUFFER_MAX), False)
    peer.close()
    h.close()


def test_virtio_console_transmit_to_socket_reaches_peer(host):
    peer, ours = socket.socketpair()
    h = Host(ours.detach())
    dev = VirtioConsole(h.context(socket_line(h)))
    driver, _, tx = started(dev)
    transmit(tx, b"over a unix: socket\n")

    driver.kick(1)

    assert peer.recv(100) == b"over a unix: socket\n"
    peer.close()
    h.close()


def test_virtio_console_unix_peer_slower_than_the_guest_still_gets_every_byte():
    """A `unix:` output's socket is the line and the input's source at once: the event loop
    watched it for input only (an fd registered again replaced its events), so once the
    peer's buffer had filled, output stopped for good unless the peer wrote."""
    peer, ours = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setblocking(False)
    h = Host(ours.detach())
    monitor, device = channel_pair()
    line = FdLine(h.fds["out"])  # on `out` itself, as a device process builds it
    try:
        dev = VirtioConsole(h.context(line))
        driver, _, tx = started(dev)
        data = b"".join(bytes([65 + i]) * 4000 for i in range(8))
        for i in range(8):
            transmit(tx, data[4000 * i : 4000 * (i + 1)])
        driver.kick(1)
        loop = EventLoop(dev, device, lambda frame: None)
        got = bytearray()
        for _ in range(200):  # the peer reads after the guest filled its buffer, slowly
            with contextlib.suppress(BlockingIOError):
                got += peer.recv(2000)
            if len(got) == len(data):
                break
            if loop.waiting():  # no waiting on an empty poll: the test ends, not hangs
                loop.step()
        assert bytes(got) == data
        assert len(tx.take_used()) == 8
    finally:
        monitor.close()
        device.close()
        peer.close()
        if line._sock is not None:  # `out` is h's to close, not the line's (socket_line)
            line._sock.detach()
        h.close()


def test_virtio_console_transmit_hands_the_loop_back_within_its_budget(host, monkeypatch):
    """A line that takes all at once (a file) let one chain of up to 4 GiB, or a ring of
    them, hold the event loop for seconds, past the heartbeat: after BUDGET_NS the rest
    waits for a later call if anything else waits, as process() does."""
    dev = VirtioConsole(host.context(Line()))
    driver, _, tx = started(dev)
    now = [0]

    def clock_ns() -> int:
        now[0] += 100_000  # 0.1 ms each look
        return now[0]

    monkeypatch.setattr(dev, "clock_ns", clock_ns)
    dev.ctx.waiting = lambda: True
    head = transmit(tx, bytes(1 << 20))  # 1 MiB: 256 pieces of the output buffer
    driver.kick(1)

    assert tx.take_used() == [] and signalled(host.fds["notify1"]) == 1
    assert dev.budget_yields == 1
    dev.ctx.waiting = lambda: False  # nothing else waits: one call sends the rest
    dev.process(1)
    assert tx.take_used() == [(head, 0)] and dev.budget_renewals > 0


def test_virtio_console_driver_reset_after_a_restore_drops_none_of_the_new_sessions_bytes(host):
    """A restore skips the bytes of the chains in flight the line took already, as they
    run again; a driver that resets first (the device needed a reset when saved) never runs
    them again, and the skip ate the first bytes of its new session's output."""
    line = Line(budget=30)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    transmit(tx, bytes(range(100)))
    driver.kick(1)  # the line took 30 bytes of the chain
    state = saved(dev)

    line2 = Line()
    restored = VirtioConsole.restore(host.context(line2), state)
    driver = Driver(restored)
    driver.set_status(0)
    rx, tx = Ring(restored.ram, base=0x20000), Ring(restored.ram, base=0x28000)  # new rings
    tx.heap = 0x90000
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    transmit(tx, b"login: the new session's first line\n")
    driver.kick(1)

    assert bytes(line2.taken) == b"login: the new session's first line\n"


def test_virtio_console_output_full_chain_not_completed_until_line_takes_it(host):
    line = Line(budget=0)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    head = transmit(tx, b"x" * 100)
    driver.kick(1)
    assert tx.take_used() == [] and dev.ctx.out.pending() == 100

    line.budget = None
    flushed(dev)

    assert tx.take_used() == [(head, 0)] and bytes(line.taken) == b"x" * 100


def test_virtio_console_output_full_takes_no_more_chains(host):
    line = Line(budget=0)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    big = bytes(range(256)) * 20  # 5120 bytes: more than the output buffer holds
    transmit(tx, big)
    transmit(tx, b"next")

    driver.kick(1)

    assert dev.ctx.out.pending() == dev.ctx.out.capacity and dev.stats()["tx_in_flight"] == 1


def test_virtio_console_output_room_again_sends_every_byte_in_order(host):
    line = Line(budget=0)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    big = bytes(range(256)) * 20
    first, second = transmit(tx, big), transmit(tx, b"next")
    driver.kick(1)

    line.budget = None
    for _ in range(3):
        flushed(dev)

    assert bytes(line.taken) == big + b"next" and tx.take_used() == [(first, 0), (second, 0)]


def test_virtio_console_completion_interrupts_driver(host):
    dev = VirtioConsole(host.context(Line()))
    driver, _, tx = started(dev)
    transmit(tx, b"x")

    driver.kick(1)

    assert os.eventfd_read(dev.ctx.fds["intx"]) >= 1 and driver.rd(ISR, 1) & 1


# -- receive ----------------------------------------------------------------------------------
def test_virtio_console_input_fills_posted_buffer(host):
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    head, gpa = post(rx, 64)
    driver.kick(0)

    dev.host_input(b"ls -l\r")

    assert rx.take_used() == [(head, 6)] and dev.ram.read(gpa, 6) == b"ls -l\r"


def test_virtio_console_input_before_buffers_delivered_when_posted(host):
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    dev.host_input(b"early")
    assert rx.take_used() == []
    head, gpa = post(rx, 3)
    head2, gpa2 = post(rx, 3)

    driver.kick(0)

    assert rx.take_used() == [(head, 3), (head2, 2)]
    assert dev.ram.read(gpa, 3) + dev.ram.read(gpa2, 2) == b"early"


def test_virtio_console_input_before_driver_ok_delivered_after(host):
    dev = VirtioConsole(host.context(Line()))
    dev.host_input(b"typed during boot")
    _, rx, _ = started(dev)
    head, gpa = post(rx, 64)

    Driver(dev).kick(0)

    assert rx.take_used() == [(head, 17)] and dev.ram.read(gpa, 17) == b"typed during boot"


def test_virtio_console_receive_hands_the_loop_back_after_a_queue_of_chains(host):
    """A driver that makes each receive chain available again as soon as it is used (zero
    bytes long here, so pending input never runs out; another vCPU stands in) kept the
    device in one call for as long as it went on: no frame, no heartbeat served. One call
    takes a queue's worth of chains, then rings its own notify to come back after the rest
    of the event loop, as process() does when its budget runs out."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    rx.add([(0x10000, 0, True)])
    driver.kick(0)
    signalled(host.fds["notify0"])
    ring, push, pushed = dev.rings[0], dev.rings[0].push, []

    def push_and_make_available_again(head: int, written: int) -> None:
        push(head, written)
        pushed.append(head)
        if len(pushed) < 1000:
            rx.publish(head)

    ring.push = push_and_make_available_again  # type: ignore[method-assign]
    dev.host_input(b"x")

    assert (len(pushed), signalled(host.fds["notify0"])) == (rx.size, 1)


def test_virtio_console_input_before_a_broken_chain_is_notified(host):
    """2.7.7.2: the chain input filled is used, the next is outside guest RAM: NEEDS_RESET,
    and the used buffer notification for the first (it was skipped)."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    head, _ = post(rx, 4)
    rx.add([(0xFFFF_0000_0000, 64, True)])

    dev.host_input(b"abcdefgh")

    assert (rx.take_used(), driver.status() & NEEDS_RESET, dev.isr & ISR_QUEUE) == (
        [(head, 4)],
        NEEDS_RESET,
        ISR_QUEUE,
    )


def test_virtio_console_input_overflow_counted(host):
    dev = VirtioConsole(host.context(Line()))
    started(dev)

    dev.host_input(b"a" * (RX_BUFFER_MAX + 10))

    assert dev.stats()["rx_dropped"] == 10 and dev.stats()["rx_pending"] == RX_BUFFER_MAX


def test_virtio_console_socket_peer_input_reaches_guest(host):
    peer, ours = socket.socketpair()
    h = Host(ours.detach())
    dev = VirtioConsole(h.context(socket_line(h)))
    driver, rx, _ = started(dev)
    head, gpa = post(rx, 16)
    driver.kick(0)
    peer.sendall(b"echo hi\n")

    (source,) = [s for s in dev.event_sources() if s.fd == h.fds["out"]]
    source.on_readable()

    assert rx.take_used() == [(head, 8)] and dev.ram.read(gpa, 8) == b"echo hi\n"
    peer.close()
    h.close()


def test_virtio_console_socket_input_not_read_while_buffer_full(host):
    peer, ours = socket.socketpair()
    h = Host(ours.detach())
    dev = VirtioConsole(h.context(socket_line(h)))
    dev.host_input(b"z" * RX_BUFFER_MAX)

    assert all(s.fd != h.fds["out"] for s in dev.event_sources())
    peer.close()
    h.close()


# -- what the driver sees ---------------------------------------------------------------------
def test_virtio_console_offers_no_size_or_multiport(host):
    dev = VirtioConsole(host.context(Line()))
    assert Driver(dev).device_features() == F_VERSION_1 | 1 << 29 | 1 << 28


def test_virtio_console_driver_taking_multiport_it_was_not_offered_is_refused(host):
    """5.3.3: MULTIPORT (bit 1) is not offered; a driver that accepts it anyway gets no
    FEATURES_OK (2.2.1: a device refuses features it did not offer), so it never waits for
    control-queue messages the device does not send."""
    dev = VirtioConsole(host.context(Line()))

    assert not Driver(dev).negotiate(F_VERSION_1 | 1 << 1) & FEATURES_OK


def test_virtio_console_emerg_wr_without_the_feature_writes_nothing_and_counts_it(host):
    """5.3.5.1 requires an emerg_wr write to be taken only where F_EMERG_WRITE (bit 2) is
    offered, which it is not here: a driver writing it anyway gets nothing out, and the
    operator sees it counted."""
    line = Line()
    dev = VirtioConsole(host.context(line))
    started(dev)

    dev.write(DEVICE_CFG + 8, b"!\0\0\0")
    flushed(dev)

    assert (bytes(line.taken), dev.stats()["bad_access"]) == (b"", 1)


def test_virtio_console_config_has_one_port(host):
    dev = VirtioConsole(host.context(Line()))
    cols, rows, ports = struct.unpack("<HHI", dev.read(DEVICE_CFG, 8))
    assert (cols, rows, ports) == (0, 0, 1)


def test_virtio_console_stats_count_bytes_each_way(host):
    dev = VirtioConsole(host.context(Line()))
    driver, rx, tx = started(dev)
    post(rx, 64)
    driver.kick(0)
    dev.host_input(b"abc")
    transmit(tx, b"hello")
    driver.kick(1)

    stats = dev.stats()

    assert (stats["bytes_in"], stats["bytes_out"], stats["rx_dropped"]) == (3, 5, 0)


# -- snapshot and crash restart -----------------------------------------------------------------
def saved(dev: VirtioConsole) -> VirtioConsoleState:
    """quiesce + save, as the runtime does for a snapshot, through the JSON codec."""
    dev.quiesce()
    dev.ctx.out.held = True
    doc = codec.state_document(dev.NAME, dev.save())
    return codec.state_from_document(dev.NAME, VirtioConsoleState, doc)


def test_virtio_console_snapshot_mid_transmit_restore_sends_rest_once(host):
    line = Line(budget=30)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    data = bytes(range(100))
    head = transmit(tx, data)
    driver.kick(1)
    state = saved(dev)

    line2 = Line()
    restored = VirtioConsole.restore(host.context(line2), state)
    Driver(restored).kick(1)

    assert bytes(line.taken) + bytes(line2.taken) == data and tx.take_used() == [(head, 0)]


def snapshot_of_a_chain_half_sent(host: Host) -> tuple[bytes, Line, VirtioConsoleState]:
    """A 64 KiB chain whose line took 40 KiB, snapshotted: the bytes, that line, the state."""
    data = bytes(i & 0xFF for i in range(64 * 1024))
    line = Line(budget=40 * 1024)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    transmit(tx, data)
    driver.kick(1)
    return data, line, saved(dev)


def test_virtio_console_snapshot_taken_while_a_restore_drops_sent_bytes_sends_none_twice(host):
    """A restore drops the bytes of in-flight chains the old line took (out.skip), as the
    chains run again. Its loop handed the event loop back every BUDGET_NS when a frame
    waited, and that frame may be the next snapshot's quiesce: the skip not yet dropped is
    in no saved field, and a restore of that snapshot sent those bytes again (8 KiB of 64
    here)."""
    data, line, first = snapshot_of_a_chain_half_sent(host)
    line2 = Line(budget=0)
    restored = VirtioConsole.restore(host.context(line2), first)
    now = [0]

    def clock_ns() -> int:
        now[0] += 100_000  # 0.1 ms a look: the budget ends while the skip is being dropped
        return now[0]

    restored.clock_ns = clock_ns  # type: ignore[method-assign]
    restored.ctx.waiting = lambda: True  # the next snapshot's quiesce waits
    Driver(restored).kick(1)
    second = saved(restored)
    line3 = Line()
    Driver(VirtioConsole.restore(host.context(line3), second)).kick(1)

    assert bytes(line.taken) + bytes(line2.taken) + bytes(line3.taken) == data


def test_virtio_console_snapshot_right_after_a_restore_sends_no_byte_twice(host):
    """Snapshotted again before the restored transmit queue ran at all, the bytes its
    first line took were still to drop (out.skip), counted in no field, and that
    snapshot's restore sent them again (40 KiB of 64 here). The quiesce drops them."""
    data, line, first = snapshot_of_a_chain_half_sent(host)
    restored = VirtioConsole.restore(host.context(Line(budget=0)), first)
    again = saved(restored)  # no transmit in between
    line3 = Line()
    Driver(VirtioConsole.restore(host.context(line3), again)).kick(1)
    assert (again.tx_sent, bytes(line.taken) + bytes(line3.taken)) == (40 * 1024, data)


def test_virtio_console_snapshot_keeps_pending_input(host):
    dev = VirtioConsole(host.context(Line()))
    _, rx, _ = started(dev)
    dev.host_input(b"pending")
    state = saved(dev)

    restored = VirtioConsole.restore(host.context(Line()), state)
    head, gpa = post(rx, 16)
    Driver(restored).kick(0)

    assert rx.take_used() == [(head, 7)] and restored.ram.read(gpa, 7) == b"pending"


def test_virtio_console_snapshot_after_reset_keeps_buffered_bytes(host):
    line = Line(budget=0)
    dev = VirtioConsole(host.context(line))
    driver, _, tx = started(dev)
    transmit(tx, b"said before the reset")
    driver.kick(1)
    driver.set_status(0)
    state = saved(dev)

    line2 = Line()
    VirtioConsole.restore(host.context(line2), state)

    assert state.tx_held == b"said before the reset" and bytes(line2.taken) == state.tx_held


def test_virtio_console_restore_rejects_held_bytes_past_buffer(host):
    state = VirtioConsoleState(tx_held=b"x" * 4096)
    ctx = host.context(Line(budget=0))
    ctx.out.put(b"y")
    with pytest.raises(StateError, match="tx_held 4096 > 4095 bytes"):
        VirtioConsole.restore(ctx, state)


def published(channel: Channel) -> VirtioConsoleState:
    last = channel.ops("publish")[-1]
    doc = {k: last[k] for k in ("model", "version", "fields")}
    return codec.state_from_document("virtio-console", VirtioConsoleState, doc)


def test_virtio_console_crash_restart_to_file_sends_each_byte_once(host):
    line, channel = Line(), Channel()
    ctx = host.context(line)
    ctx.events.connect(channel.send)
    dev = VirtioConsole(ctx)
    driver, _, tx = started(dev)
    transmit(tx, b"first\n")
    driver.kick(1)  # completed: a checkpoint after it
    checkpoint, emitted_then = published(channel), ctx.out.emitted
    line.budget = 4
    second = transmit(tx, b"second\n")
    driver.kick(1)  # the line took "seco", then the process died

    line2 = Line()
    new = host.context(line2, restarted=True)
    new.out.emitted = emitted_then  # what the monitor hands over (runtime.prepare_resume)
    new.out.skip = len(line.taken) - emitted_then  # the file grew by this since
    restarted = VirtioConsole.restore(new, checkpoint)
    restarted.after_restart()
    Driver(restarted).kick(1)

    assert bytes(line.taken) + bytes(line2.taken) == b"first\nsecond\n"
    assert tx.take_used()[-1] == (second, 0)


def test_virtio_console_crash_restart_input_delivered_since_checkpoint_not_repeated(host):
    channel = Channel()
    ctx = host.context(Line())
    ctx.events.connect(channel.send)
    dev = VirtioConsole(ctx)
    driver, rx, tx = started(dev)
    dev.host_input(b"abc")
    transmit(tx, b"!")
    driver.kick(1)  # a checkpoint, with "abc" pending
    checkpoint = published(channel)
    post(rx, 16)
    driver.kick(0)  # "abc" delivered, then the process died
    replayed = b"de"  # the input frames after the checkpoint, re-applied by the runtime

    restarted = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(restarted):
        restarted.host_input(replayed)
    head, gpa = post(rx, 16)
    Driver(restarted).kick(0)

    assert rx.take_used()[-1] == (head, 2) and restarted.ram.read(gpa, 2) == b"de"


def console_at(host: Host, ctx: Any, start: int) -> tuple[VirtioConsole, Driver, Ring, Ring]:
    """A started console whose receive ring's indices are at `start` (a VM restored there)."""
    if not start:
        dev = VirtioConsole(ctx)
        return (dev, *started(dev))
    fresh = VirtioConsole(host.context(Line()))
    _, rx, _ = started(fresh)
    fresh.quiesce()
    rx.skip_to(start)
    dev = VirtioConsole.restore(ctx, queue_at(fresh.save(), 0, start))
    tx = Ring(dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    return dev, Driver(dev), rx, tx


@pytest.mark.parametrize("start", [0, 0xFFD0], ids=["", "across-the-used-idx-wrap"])
def test_virtio_console_restart_drops_input_delivered_in_more_completions_than_the_ring_holds(
    host, caplog, start
):
    """Bulk input through the monitor comes as 8-byte frames and completes hundreds of
    receive chains between two checkpoints the monitor reads: past a ring's worth the used
    entries no longer say what was delivered. The progress page does, so the successor
    drops exactly that from what it replays, whatever the count; it repeated it all. Also
    with the used idx passing 65535 meanwhile: the page's record is for the used idx modulo
    2^16, the one the successor finds in the used ring (a record of 65536 would match none,
    and the input would be delivered twice)."""
    channel = Channel()
    ctx = host.context(Line())
    ctx.events.connect(channel.send)
    dev, driver, rx, tx = console_at(host, ctx, start)
    data = bytes(range(64))
    dev.host_input(data[:10])  # pending at the checkpoint
    transmit(tx, b"!")
    driver.kick(1)  # a checkpoint after the completion: the last one the monitor read
    checkpoint = published(channel)
    dev.host_input(data[10:])  # the input frames after it: the journal
    for _ in range(3 * rx.size):  # one byte a chain, three rings' worth
        post(rx, 1)
        driver.kick(0)
        rx.take_used()

    restarted = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(restarted):
        restarted.host_input(data[10:])
    head, gpa = post(rx, 64)
    Driver(restarted).kick(0)

    left = len(data) - 3 * rx.size
    assert rx.take_used()[-1] == (head, left)
    assert restarted.ram.read(gpa, left) == data[3 * rx.size :]
    assert restarted.stats()["bytes_in"] == len(data)
    assert "input may repeat" not in caplog.text


def checkpointed(host: Host) -> tuple[VirtioConsole, Driver, Ring, Any]:
    """A started console, its driver, its receive ring and the checkpoint the monitor last
    read (published after a transmit completed)."""
    channel = Channel()
    ctx = host.context(Line())
    ctx.events.connect(channel.send)
    dev = VirtioConsole(ctx)
    driver, rx, tx = started(dev)
    transmit(tx, b"!")
    driver.kick(1)
    return dev, driver, rx, published(channel)


@pytest.mark.parametrize("set_up_again", [False, True])
def test_virtio_console_restart_after_a_reset_before_the_rx_enable_repeats_no_input(
    host, set_up_again
):
    """A driver that reset (a guest's reboot, a module reload) after the checkpoint, and a
    crash before it enabled receiveq0 again: no ring says what the old session got, but the
    progress page kept the count at the reset, so none of it is delivered again. So too where
    the driver set receiveq0 up again with Bus Master Enable clear and the process died
    before it applied that enable: the ring the restart starts at 0 completed nothing."""
    dev, driver, rx, checkpoint = checkpointed(host)
    dev.host_input(b"AAAAA")
    for _ in range(5):
        post(rx, 1)
        driver.kick(0)
    driver.set_status(0)  # the reset, then the process died

    restarted = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(restarted):  # the journal: the input frame, the reset (, the set-up)
        restarted.host_input(b"AAAAA")
        Driver(restarted).set_status(0)
        if set_up_again:
            rx2, tx2 = Ring(dev.ram, base=0x20000), Ring(dev.ram, base=0x28000)
            restarted.ctx.replay_unconfirmed = True  # past what the monitor knows it applied
            set_up(restarted, rx2, tx2, bus_master=False)
            restarted.ctx.replay_unconfirmed = False

    assert (restarted.stats()["rx_pending"], restarted.stats()["bytes_in"]) == (0, 5)


def test_virtio_console_input_frame_from_monitor_reaches_guest(host):
    """The monitor's INPUT frames (slot.input) as the device runtime applies them."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    head, gpa = post(rx, 16)
    driver.kick(0)

    runtime._apply(dev, wire.decode_access(wire.encode_input(b"keys"), dev.WINDOW))

    assert rx.take_used() == [(head, 4)] and dev.ram.read(gpa, 4) == b"keys"


# -- crash restarts to a regular file, from a checkpoint older than the last completion -------
@pytest.fixture
def file_host(tmp_path: Path) -> Iterator[Host]:
    """A host whose `out` is a regular file (the monitor then counts what the line took)."""
    h = Host(os.open(tmp_path / "hvc.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    yield h
    h.close()


class Process:
    """One process of the device (fresh, or restored from `state`): its line, and the
    checkpoints it published."""

    def __init__(self, ctx: DeviceContext, state: VirtioConsoleState | None = None) -> None:
        assert isinstance(ctx.out.line, Line)
        self.line, self.channel = ctx.out.line, Channel()
        self.published: tuple[VirtioConsoleState, int] | None = None
        ctx.events.connect(lambda frame: self._sent(frame, ctx))
        self.dev = VirtioConsole(ctx) if state is None else VirtioConsole.restore(ctx, state)
        if ctx.restarted:
            self.dev.after_restart()  # runtime.run's, once the (here empty) journal is replayed

    def _sent(self, frame: bytes, ctx: DeviceContext) -> bool:
        """A checkpoint comes with the output count when it was taken (runtime.Checkpoints
        gives the publish its progress)."""
        self.channel.send(frame)
        if self.channel.frames[-1]["op"] == "publish":
            self.published = published(self.channel), ctx.out.emitted
        return True

    def checkpoint(self) -> tuple[VirtioConsoleState, int]:
        """The last checkpoint it published, and its output count then."""
        assert self.published is not None, "no checkpoint published"
        return self.published


def after_crash(
    host: Host,
    checkpoint: tuple[VirtioConsoleState, int],
    lines: list[Line],
    reopened: Line | None = None,
) -> Process:
    """The next process, from `checkpoint` as the monitor hands it over (slot._resume_locked,
    runtime.prepare_resume): the file grew by what every line so far took. Its own line:
    `reopened` (the last one, the same file again), or a new one that takes everything."""
    state, emitted = checkpoint
    ctx = host.context(reopened or Line(), restarted=True)
    ctx.out.emitted = emitted
    ctx.out.skip = max(0, sum(len(line.taken) for line in lines) - emitted)
    return Process(ctx, state)


def test_virtio_console_restart_from_checkpoint_older_than_last_completion_sends_each_byte_once(
    file_host,
):
    first = Process(file_host.context(Line()))
    driver, _, tx = started(first.dev)
    transmit(tx, b"first\n")
    driver.kick(1)
    stale = first.checkpoint()  # the last one the monitor read before the crash
    transmit(tx, b"second\n")
    driver.kick(1)  # completed: its checkpoint died with the process
    first.line.budget = 4
    third = transmit(tx, b"third\n")
    driver.kick(1)  # the line took "thir", then the process died

    second = after_crash(file_host, stale, [first.line])
    Driver(second.dev).kick(1)

    assert bytes(first.line.taken + second.line.taken) == b"first\nsecond\nthird\n"
    assert tx.take_used()[-1] == (third, 0)


def test_virtio_console_restart_across_the_used_idx_wrap_sends_each_byte_once(file_host):
    """The progress page's record is for the chain at the next used idx, modulo 2^16: the
    chain in flight at used idx 0 (just past the wrap), whose start a record of "65536"
    would not give, is sent from where the line stopped, not again whole."""
    fresh = Process(file_host.context(Line()))
    _, _, tx = started(fresh.dev)
    fresh.dev.quiesce()
    tx.skip_to(0xFFFE)
    first = Process(file_host.context(Line()), queue_at(fresh.dev.save(), 1, 0xFFFE))  # restored
    driver = Driver(first.dev)
    transmit(tx, b"first\n")
    driver.kick(1)  # used idx 0xFFFF
    stale = first.checkpoint()
    transmit(tx, b"second\n")
    driver.kick(1)  # used idx 0: its checkpoint died with the process
    first.line.budget = 4
    third = transmit(tx, b"third\n")
    driver.kick(1)  # the line took "thir", then the process died

    second = after_crash(file_host, stale, [fresh.line, first.line])
    Driver(second.dev).kick(1)

    assert bytes(first.line.taken + second.line.taken) == b"first\nsecond\nthird\n"
    assert tx.take_used()[-1] == (third, 0)


def test_virtio_console_restart_after_restart_from_old_checkpoint_loses_no_byte(file_host):
    """The first restart starts from a checkpoint older than the last completion and, with
    no progress page to go by, sends the chain in flight again whole: the output's count it
    carries on with must still be the file's, or the next restart drops bytes never sent."""
    progress = file_host.fds["progress"]
    first = Process(file_host.context(Line()))
    driver, _, tx = started(first.dev)
    transmit(tx, b"first\n")
    driver.kick(1)
    stale = first.checkpoint()
    transmit(tx, b"second\n")
    driver.kick(1)  # completed after the checkpoint the monitor holds; then the crash
    os.pwrite(progress, bytes(64), 0)  # no record to go by

    second = after_crash(file_host, stale, [first.line])
    Driver(second.dev).kick(1)
    transmit(tx, b"third\n")
    Driver(second.dev).kick(1)
    fresh = second.checkpoint()
    second.line.budget = 3
    transmit(tx, b"fourth\n")
    Driver(second.dev).kick(1)  # the line took "fou", then the process died
    os.pwrite(progress, bytes(64), 0)

    third = after_crash(file_host, fresh, [first.line, second.line])
    Driver(third.dev).kick(1)

    out = bytes(first.line.taken + second.line.taken + third.line.taken)
    assert out == b"first\nsecond\nthird\nfourth\n"


def test_virtio_console_progress_record_scribbled_on_leaves_the_other(file_host):
    progress = Progress(file_host.fds["progress"])
    progress.write(7, 100)  # slot 1
    progress.write(8, 150)  # slot 0...
    os.pwrite(file_host.fds["progress"], b"\xff", 3)  # ...scribbled on

    assert progress.records() == {7: 100}


def test_virtio_console_restart_input_replayed_after_a_checkpoint_before_the_enable_is_not_repeated(
    host,
):
    """The checkpoint predates receiveq0's enable: the input the dead process delivered
    since counts from used idx 0 (it used to count nothing, and the replayed INPUT frame
    was delivered a second time)."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx = Driver(dev), Ring(dev.ram)
    tx = Ring(dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = dev.save()
    journal = [
        lambda d: Driver(d).setup_queue(0, rx),
        lambda d: Driver(d).setup_queue(1, tx),
        lambda d: Driver(d).set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
    ]
    for frame in journal:
        frame(dev)
    for _ in range(4):
        post(rx, 64)
    driver.kick(0)
    journal.append(lambda d: d.host_input(b"secret\n"))
    journal[-1](dev)  # delivered: then the process dies
    assert [n for _, n in rx.take_used()] == [7]

    new = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(new):
        for frame in journal:
            frame(new)
    Driver(new).kick(0)

    assert (rx.take_used(), new.stats()["rx_pending"]) == ([], 0)


def test_virtio_console_restart_to_file_with_checkpoint_before_the_tx_enable_sends_once(
    file_host,
):
    """The checkpoint predates transmitq0's enable; the dead process wrote a chain to the
    file and died before completing it. The progress page's record for the used idx says
    the line took it: it used to be overwritten by the replayed enable, and the chain's
    bytes went to the file twice."""
    first = Process(file_host.context(Line()))
    driver, rx = Driver(first.dev), Ring(first.dev.ram)
    tx = Ring(first.dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = (first.dev.save(), first.dev.ctx.out.emitted)
    journal = [
        lambda d: Driver(d).setup_queue(0, rx),
        lambda d: Driver(d).setup_queue(1, tx),
        lambda d: Driver(d).set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
    ]
    for frame in journal:
        frame(first.dev)
    first.dev._complete_sent = lambda ring: 0  # the line took it; died before the push
    transmit(tx, b"hello\n")
    driver.kick(1)

    state, emitted = checkpoint
    ctx = file_host.context(Line(), restarted=True)
    ctx.out.emitted, ctx.out.skip = emitted, len(first.line.taken) - emitted
    second = VirtioConsole.restore(ctx, state)
    with replaying(second):
        for frame in journal:
            frame(second)
    Driver(second).kick(1)

    assert bytes(first.line.taken) + bytes(ctx.out.line.taken) == b"hello\n"
    assert [n for _, n in tx.take_used()] == [0]


def test_virtio_console_restart_to_socket_takes_the_peers_next_bytes_whole():
    """The dead process read input from its `unix:` peer and delivered it after its last
    checkpoint (those bytes were never frames). The count delivered since used to linger
    as a skip and ate as many of the next bytes the peer sent."""
    peer, ours = socket.socketpair()
    host = Host(ours.detach())
    try:
        ctx = host.context(socket_line(host))
        channel = Channel()
        ctx.events.connect(channel.send)
        dev = VirtioConsole(ctx)
        driver, rx, tx = started(dev)
        transmit(tx, b"login: ")
        driver.kick(1)  # a transmit completion: a checkpoint
        checkpoint = published(channel)
        posted = dict(post(rx, 64) for _ in range(4))  # head -> its buffer
        driver.kick(0)
        peer.sendall(b"hello\n")
        peer_readable(dev, host)  # read and delivered, no checkpoint since: then the crash
        assert [n for _, n in rx.take_used()] == [6]

        new = VirtioConsole.restore(host.context(socket_line(host), restarted=True), checkpoint)
        new.after_restart()
        peer.sendall(b"world\n")
        peer_readable(new, host)

        (head, n), *_ = rx.take_used()
        assert (n, new.ram.read(posted[head], n)) == (6, b"world\n")
    finally:
        peer.close()
        host.close()


def peer_readable(dev: VirtioConsole, host: Host) -> None:
    (source,) = [s for s in dev.event_sources() if s.fd == host.fds["out"]]
    source.on_readable()


def test_virtio_console_restart_keeps_input_pending_past_a_journal_of_over_4_kib(host):
    """The journal's INPUT frames (8 bytes each) hold the bytes the dead process delivered
    as well as those it held: capped at RX_BUFFER_MAX while replayed, then cut by what was
    delivered, most of what was still pending was lost."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = started(dev)
    checkpoint = dev.save()
    data = bytes(i % 251 for i in range(7000))
    journal = [data[i : i + 8] for i in range(0, len(data), 8)]
    for chunk in journal[:500]:
        dev.host_input(chunk)  # 4000 bytes wait for a buffer...
    post(rx, 4000)
    driver.kick(0)  # ...and go into the one posted
    for chunk in journal[500:]:
        dev.host_input(chunk)  # 3000 more wait: then the crash
    assert (rx.take_used()[0][1], dev.stats()["rx_pending"]) == (4000, 3000)

    new = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(new):
        for chunk in journal:
            new.host_input(chunk)

    assert (new.stats()["rx_pending"], new.stats()["rx_dropped"]) == (3000, 0)
    head, gpa = post(rx, 3000)
    Driver(new).kick(0)
    assert rx.take_used() == [(head, 3000)] and new.ram.read(gpa, 3000) == data[4000:]


def test_virtio_console_restart_after_a_driver_reset_loses_none_of_the_new_sessions_output():
    """A slow line took part of a chain; the driver resets and sets the queues up again (a
    module reload), its new first chain at used idx 0 as the old one; the process dies
    before the next checkpoint. The checkpoint's tx_sent is the old session's: the new
    process sends the new chain whole (it dropped "wor" of it)."""
    host = Host()  # `out` a pipe: the monitor cannot count what the line took
    line = Line(budget=3)
    ctx = host.context(line)
    dev = VirtioConsole(ctx)
    driver, _, tx = started(dev)
    transmit(tx, b"hello\n")
    driver.kick(1)  # the slow line took "hel"
    checkpoint, emitted = dev.save(), ctx.out.emitted
    rx2, tx2 = Ring(dev.ram, base=0x20000), Ring(dev.ram, base=0x28000)
    tx2.heap = 0x90000

    def set_up_again(device: VirtioConsole) -> None:
        Driver(device).set_status(0)  # the reset
        set_up(device, rx2, tx2)

    set_up_again(dev)
    transmit(tx2, b"world\n")
    driver.kick(1)  # the line takes nothing more: then the process dies
    line2 = Line()
    ctx2 = host.context(line2, restarted=True)
    ctx2.out.emitted, ctx2.out.skip = emitted, 0  # as runtime.prepare_resume sets them
    try:
        new = VirtioConsole.restore(ctx2, checkpoint)
        with replaying(new):
            set_up_again(new)  # the journal's frames since the checkpoint
        Driver(new).kick(1)
        taken = bytes(line2.taken)
    finally:
        host.close()
    assert taken.endswith(b"world\n"), taken
    assert tx2.take_used() == [(0, 0)]


# -- crash restarts anywhere, to a file: every byte once (hypothesis) -------------------------
CONSOLE_STEP = st.one_of(
    st.tuples(
        st.just("transmit"), st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=3)
    ),
    st.tuples(st.just("line"), st.integers(0, 600)),  # the line takes that many more bytes
    st.tuples(st.just("kick"), st.just(None)),
    st.tuples(st.just("crash"), st.just(None)),
)


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(CONSOLE_STEP, max_size=30))
@example([("line", 1), ("transmit", [b"a", b"b"]), ("crash", None)])  # a chain half sent
def test_virtio_console_crash_restarts_anywhere_send_each_byte_once_to_a_file(steps):
    """What the guest transmits reaches a regular file once and in order, however many times
    the device dies and at whatever moment: its successor starts from the last checkpoint the
    monitor read (published at most once each CHECKPOINT_INTERVAL_S, so mostly older than the
    last completion), takes the transmit queue up at its used ring, and drops what the file's
    growth says went out already, going by the progress page (the module docstring)."""
    with tempfile.TemporaryDirectory() as where:
        out = os.open(Path(where) / "hvc.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        host = Host(out)  # a regular file: the device goes by its progress page
        try:
            console_crashes(host, steps)
        finally:
            host.close()


def console_crashes(host: Host, steps: list[tuple[str, Any]]) -> None:
    """The steps on the device, crashing where they say; then the file takes the rest."""
    line = Line(budget=0)  # the file: everything it took, across processes
    process = Process(host.context(line))
    _, _, tx = started(process.dev)
    checkpoint = process.dev.save(), process.dev.ctx.out.emitted  # none published yet
    sent, descriptors = bytearray(), {}  # head -> descriptors, of each chain in flight
    for kind, arg in steps:
        dev = process.dev
        if kind == "transmit" and sum(descriptors.values()) + len(arg) <= tx.size:
            descriptors[transmit(tx, *arg)] = len(arg)  # a driver reuses none in flight
            sent += b"".join(arg)
            Driver(dev).kick(1)
        elif kind == "line":
            line.budget = (line.budget or 0) + arg
            dev.ctx.out.flush()
            dev.output_room()
        elif kind == "kick":
            Driver(dev).kick(1)
        elif kind == "crash":  # the journal is empty: only kicks came since the checkpoint
            process = after_crash(host, checkpoint, [line], line)
            Driver(process.dev).kick(1)
        checkpoint = process.published or checkpoint  # the last one the monitor read
        for head, _ in tx.take_used():
            del descriptors[head]
        assert bytes(line.taken) == bytes(sent[: len(line.taken)])  # in order, none twice
    line.budget = None  # the file takes the rest
    process.dev.ctx.out.flush()
    process.dev.output_room()
    Driver(process.dev).kick(1)
    assert bytes(line.taken) == bytes(sent)


def test_virtio_console_second_crash_before_the_skip_is_dropped_sends_no_byte_twice(host):
    """A restarted process publishes a checkpoint before READY (runtime._serve_sandboxed),
    while the bytes of the chain in flight that the line took wait to be dropped (as the
    chains run again): saved then, tx_sent was 0, and a second crash on a line the monitor
    cannot count (a pipe) sent them again. tx_sent counts them whether dropped or not."""
    first = Process(host.context(Line(budget=30)))
    driver, _, tx = started(first.dev)
    data = bytes(range(100))
    transmit(tx, data)
    driver.kick(1)
    runtime.Checkpoints(first.dev).publish()
    second = after_crash(host, first.checkpoint(), [])
    runtime.Checkpoints(second.dev).publish()  # before READY
    third = after_crash(host, second.checkpoint(), [])
    Driver(third.dev).kick(1)
    assert bytes(first.line.taken + third.line.taken) == data


def test_virtio_console_restored_onto_a_file_crash_before_a_completion_sends_no_byte_twice(
    file_host,
):
    """Restored with a chain whose first 40 KiB the old line took, onto a regular file,
    then a crash before that chain completes: the restart drops what this file took of it
    and the 40 KiB the old line took, not only the file's part (which repeated 40 KiB)."""
    data, line, state = snapshot_of_a_chain_half_sent(file_host)
    restored = Process(file_host.context(Line(budget=10 * 1024)), state)
    Driver(restored.dev).kick(1)  # the file took 10 KiB more of the chain; then the crash
    assert restored.published is None  # the monitor holds the restore's state, emitted 0

    after = after_crash(file_host, (state, 0), [restored.line])
    Driver(after.dev).kick(1)

    assert bytes(line.taken + restored.line.taken + after.line.taken) == data


@pytest.mark.parametrize("bus_master", [True, False])
def test_virtio_console_restored_then_reset_crash_before_the_enable_loses_no_new_output(
    file_host, bus_master
):
    """Restored with a chain at used idx 0 whose first 40 KiB the old line took: the restore
    records that chain as starting at -40 KiB. The guest resets the device and sets its
    queues up again; the process dies after the reset, before it applied the new
    transmitq0's enable (the monitor replays that one as unconfirmed: a fresh ring, used idx
    0, from which the dead process took nothing). The record of idx 0 is the restore's, of
    the old ring, and the restart dropped 40 KiB of the new session's output. So too with
    the queues enabled while Bus Master Enable is clear (7d38e21): the ring is as fresh."""
    _, _, state = snapshot_of_a_chain_half_sent(file_host)
    restored = Process(file_host.context(Line(budget=0)), state)
    rx2, tx2 = Ring(restored.dev.ram, base=0x20000), Ring(restored.dev.ram, base=0x28000)
    tx2.heap = 0x90000
    Driver(restored.dev).set_status(0)  # the reset: applied; then the process dies

    line = Line()
    ctx = file_host.context(line, restarted=True)
    ctx.out.emitted, ctx.out.skip = 0, 0  # the restore's state; the file did not grow
    new = VirtioConsole.restore(ctx, state)
    ctx.replaying = True
    try:
        Driver(new).set_status(0)  # confirmed: the dead process applied it
        ctx.replay_unconfirmed = True  # past what the monitor knows it applied
        set_up(new, rx2, tx2, bus_master)
    finally:
        ctx.replaying = ctx.replay_unconfirmed = False
    new.after_restart()
    if not bus_master:
        Driver(new).enable_bus_master()
    transmit(tx2, b"login: the new session's first line\n")
    Driver(new).kick(1)

    assert bytes(line.taken) == b"login: the new session's first line\n"


def test_virtio_console_crash_after_an_unanswered_bus_master_set_keeps_its_used_idx(file_host):
    """Queues enabled and DRIVER_OK before Bus Master Enable; the process applied the set of
    the bit, sent a line and completed its chain, and died before it answered the set's
    sync. The restart took the ring for one the dead process may never have written: it
    moved the used idx back to 0 under the driver and ran the chain again (its bytes dropped
    only because the file's growth said the line took them)."""
    first = Process(file_host.context(Line()))
    rx, tx = Ring(first.dev.ram), Ring(first.dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    set_up(first.dev, rx, tx, bus_master=False)
    state = first.dev.save()  # the checkpoint: nothing sent yet
    transmit(tx, b"login: \n")
    Driver(first.dev).enable_bus_master()  # applied, and the chain it kicked served:
    Driver(first.dev).kick(1)
    assert (bytes(first.line.taken), tx.take_used()) == (b"login: \n", [(0, 0)])

    line = Line()
    ctx = file_host.context(line, restarted=True)
    ctx.out.skip = len(first.line.taken)  # the file's growth since the checkpoint
    second = VirtioConsole.restore(ctx, state)
    ctx.replaying = ctx.replay_unconfirmed = True  # past what the monitor knows it applied
    try:
        Driver(second).enable_bus_master()
    finally:
        ctx.replaying = ctx.replay_unconfirmed = False
    second.after_restart()
    seen = tx.used_idx()  # what another vCPU reads meanwhile
    Driver(second).kick(1)

    assert (seen, bytes(first.line.taken + line.taken)) == (1, b"login: \n")


@pytest.mark.parametrize(
    "chains",
    [[b"login: "], [b"login: ", b"root\n"]],
    ids=["one-chain-its-record-left", "two-chains-no-record-of-idx-0"],
)
def test_virtio_console_restart_before_a_new_rings_enable_sends_held_bytes_once(file_host, chains):
    """A snapshot's held bytes (a reset left them in the buffer of a slow line) are restored
    onto a regular file, which takes them at once; the guest sets its queues up, sends, resets
    again, and the process dies before it applied the new transmitq0's enable. Its successor
    must send the new session's output whole, and the held bytes not again: the file's growth
    since the checkpoint says it took them. With one chain completed, the progress page still
    holds a record of idx 0 (the old ring's, not to be taken for the new one's: it lost the new
    session's bytes); with two, it holds none, and the successor goes by the checkpoint, whose
    held bytes it sent again."""
    dev = VirtioConsole(file_host.context(Line(budget=0)))
    driver, _, tx = started(dev)
    transmit(tx, b"said before the reset\n")
    driver.kick(1)
    driver.set_status(0)
    state = saved(dev)  # tx_held: the 22 bytes
    assert state.tx_held == b"said before the reset\n"

    file = Line()  # the regular file the VM is restored onto
    dev = Process(file_host.context(file), state).dev
    sessions = []
    for n in range(2):
        sessions.append(Ring(dev.ram, base=0x24000 + 0x8000 * n))
        sessions[n].heap = 0x100000 + 0x30000 * n

    def session(device: VirtioConsole, n: int) -> None:
        set_up(device, Ring(device.ram, base=0x20000 + 0x8000 * n), sessions[n])

    session(dev, 0)
    for chain in chains:
        transmit(sessions[0], chain)
    Driver(dev).kick(1)
    Driver(dev).set_status(0)  # the next reset: applied; then the process dies
    before = b"said before the reset\n" + b"".join(chains)
    assert bytes(file.taken) == before

    ctx = file_host.context(file, restarted=True)
    ctx.out.emitted, ctx.out.skip = 0, len(file.taken)  # the restore's state; the growth
    new = VirtioConsole.restore(ctx, state)
    ctx.replaying = True
    try:
        Driver(new).set_status(0)
        ctx.replay_unconfirmed = True  # the rest: past what the dead process applied
        session(new, 1)
    finally:
        ctx.replaying = ctx.replay_unconfirmed = False
    new.after_restart()
    transmit(sessions[1], b"login: again\n")
    Driver(new).kick(1)

    assert bytes(file.taken) == before + b"login: again\n"


# -- crashes, snapshots and driver resets anywhere (hypothesis) -------------------------------
SMALL_BUFFER = 64  # the output buffer: held bytes and a full buffer come often
WORLD_STEP = st.one_of(
    st.tuples(st.just("transmit"), st.lists(st.integers(1, 90), min_size=1, max_size=3)),
    st.tuples(st.just("line"), st.integers(0, 200)),  # the line takes that many more bytes
    st.tuples(st.just("kick"), st.just(None)),
    st.tuples(st.just("crash"), st.just(None)),
    st.tuples(st.just("publish"), st.just(None)),  # a runtime checkpoint, drop pending or not
    st.tuples(st.just("suspend"), st.just(None)),  # snapshot, the VM ends, restored on the line
    st.tuples(st.just("snap"), st.just(None)),  # snapshot, and the VM goes on
    # a driver reset and new rings; the process dies with 0, 1 (the reset) or all applied
    st.tuples(st.just("reset"), st.sampled_from([3, 3, 0, 1])),
    st.tuples(st.just("slow"), st.integers(1, 6)),  # a kick whose budget ends after n looks
)


class ReplayingProcess(Process):
    """A Process that, restarted, re-applies the journal since its checkpoint first (each
    frame confirmed or not, as the monitor says) and then takes up (runtime.replay)."""

    def __init__(
        self, ctx: DeviceContext, state: VirtioConsoleState | None = None, journal: Any = ()
    ) -> None:
        self.line, self.channel = ctx.out.line, Channel()
        self.published = None
        ctx.events.connect(lambda frame: self._sent(frame, ctx))
        self.dev = VirtioConsole(ctx) if state is None else VirtioConsole.restore(ctx, state)
        if ctx.restarted:
            with replaying(self.dev):  # then after_restart()
                for frame, unconfirmed in journal:
                    ctx.replay_unconfirmed = unconfirmed
                    frame(self.dev)
                ctx.replay_unconfirmed = False


class ConsoleWorld:
    """A guest transmitting through one console across crashes, snapshots and resets: what
    each driver session sent (its bytes tell the sessions apart), and the one line."""

    def __init__(self, host: Host, file: bool) -> None:
        self.host, self.file = host, file
        self.line = Line(budget=0)  # everything the line took, across processes and VM runs
        self.base = 0  # the file's size when this VM run began (slot's _out_base)
        self.sessions: list[bytearray] = [bytearray()]
        self.journal: list[Any] = []  # (frame, unconfirmed) since the checkpoint
        self.inflight: dict[int, int] = {}  # head -> descriptors, of the chains in flight
        self.process = ReplayingProcess(self.context(False))
        self.rings(0)
        self.checkpoint = (self.process.dev.save(), 0)
        self.journal = []  # the first set-up came before that checkpoint
        self._seen: object = None

    def context(self, restarted: bool) -> DeviceContext:
        ctx = self.host.context(self.line, restarted=restarted)
        ctx.out = BoundedOutput(self.line, SMALL_BUFFER)  # type: ignore[arg-type]
        return ctx

    def rings(self, n: int, reset: bool = False, applied: int = 3) -> None:
        dev = self.process.dev
        rx = Ring(dev.ram, base=0x20000 + 0x8000 * n)
        tx = Ring(dev.ram, base=0x24000 + 0x8000 * n)
        tx.heap = 0x100000 + 0x30000 * n

        def do_reset(device: VirtioConsole) -> None:
            if reset:
                Driver(device).set_status(0)

        def set_up_both(device: VirtioConsole) -> None:
            set_up(device, rx, tx)

        self.tx = tx
        if applied == 3:
            do_reset(dev)
            set_up_both(dev)
            self.journal += [(do_reset, False), (set_up_both, False)]
            return
        # The process dies with `applied` of them applied: the rest reach only its successor,
        # past what the monitor knows was applied
        if applied:
            do_reset(dev)
        self.journal += [(do_reset, not applied), (set_up_both, True)]
        self.crash()

    def crash(self) -> None:
        """The successor, as the monitor hands it over (slot._resume_locked)."""
        state, emitted = self.checkpoint
        ctx = self.context(True)
        ctx.out.emitted = emitted
        grown = len(self.line.taken) - self.base
        ctx.out.skip = max(0, grown - emitted) if self.file else 0
        self.process = ReplayingProcess(ctx, state, self.journal)
        self.journal = [(frame, False) for frame, _ in self.journal]  # the successor's

    def data(self, n: int) -> bytes:
        """The session's next n bytes: each in [64 * session, 64 * session + 61)."""
        session, start = len(self.sessions) - 1, len(self.sessions[-1])
        return bytes(64 * session + ((start + i) * 2654435761 >> 7) % 61 for i in range(n))

    def step(self, kind: str, arg: Any) -> None:
        dev = self.process.dev
        if kind == "transmit" and sum(self.inflight.values()) + len(arg) <= self.tx.size:
            parts = []
            for n in arg:
                part = self.data(n)
                self.sessions[-1] += part
                parts.append(part)
            self.inflight[transmit(self.tx, *parts)] = len(parts)
            Driver(dev).kick(1)
        elif kind == "line":
            self.line.budget = (self.line.budget or 0) + arg
            if dev.ctx.out.flush():
                dev.output_room()
        elif kind == "kick":
            Driver(dev).kick(1)
        elif kind == "slow":
            self._slow_kick(dev, arg)
        elif kind == "crash":
            self.crash()
        elif kind == "publish":
            dev.ctx.events._state_sent = None  # a whole document each time (Process reads it)
            runtime.Checkpoints(dev).publish()
        elif kind == "suspend":
            state = saved(dev)
            self.base = len(self.line.taken)
            self.process = ReplayingProcess(self.context(False), state)
            self.checkpoint, self.journal = (state, 0), []
            return
        elif kind == "snap":
            saved(dev)
            dev.ctx.out.held = False
            dev.resume()
            Driver(dev).kick(1)
        elif kind == "reset" and len(self.sessions) < 4:
            self.sessions.append(bytearray())
            self.inflight = {}
            self.rings(len(self.sessions) - 1, reset=True, applied=arg)
        if self.process.published is not None and self.process.published is not self._seen:
            self.checkpoint = self._seen = self.process.published  # the monitor read it
            self.journal = []
        for head, _ in self.tx.take_used():
            self.inflight.pop(head, None)

    @staticmethod
    def _slow_kick(dev: VirtioConsole, looks: int) -> None:
        """A kick whose budget ends after `looks` looks at the clock, a frame waiting."""
        seen = [0]

        def clock_ns() -> int:
            seen[0] += 1
            return 0 if seen[0] <= looks else 10**15

        dev.clock_ns = clock_ns  # type: ignore[method-assign]
        dev.ctx.waiting = lambda: True
        try:
            dev.process(1)
        finally:
            del dev.clock_ns
            dev.ctx.waiting = lambda: False

    def finish(self) -> None:
        self.line.budget = None
        dev = self.process.dev
        dev.ctx.out.flush()
        dev.output_room()
        Driver(dev).kick(1)

    def per_session(self, ordered: bool = True) -> list[bytes]:
        got = [bytearray() for _ in self.sessions]
        last = 0
        for b in bytes(self.line.taken):
            assert b // 64 >= last or not ordered, f"session {b // 64} after {last}"
            last = b // 64
            got[last].append(b)
        return [bytes(g) for g in got]

    def check_file(self, final: bool) -> None:
        """Each session's output is a prefix of what it sent, in order; the last one whole
        at the end: every byte once."""
        got = self.per_session()
        for i, (g, sent) in enumerate(zip(got, self.sessions, strict=True)):
            assert g == bytes(sent[: len(g)]), f"session {i}: {g!r} is no prefix of {sent!r}"
        if final:
            assert got[-1] == bytes(self.sessions[-1])

    def check_pipe(self, final: bool) -> None:
        """No byte lost: each session's output is runs of what it sent, each starting at or
        before the furthest byte out so far (repeats allowed, gaps not)."""
        got = self.per_session(ordered=False)
        for i, (g, sent) in enumerate(zip(got, map(bytes, self.sessions), strict=True)):
            cursor = furthest = k = 0

            def match(at: int, k: int = 0, g: bytes = g, sent: bytes = sent) -> int:
                n = 0
                while k + n < len(g) and at + n < len(sent) and g[k + n] == sent[at + n]:
                    n += 1
                return n

            while k < len(g):
                here = match(cursor, k)
                if here < min(8, len(g) - k):
                    best = max(range(furthest + 1), key=lambda at: match(at, k))
                    if match(best, k) > here:
                        cursor, here = best, match(best, k)
                assert here, f"session {i}: byte {k} of {g!r} is no byte of {sent!r} <= {furthest}"
                cursor += 1
                furthest = max(furthest, cursor)
                k += 1
            if final and i == len(got) - 1:
                assert furthest == len(sent), f"session {i}: lost from byte {furthest}"


def console_world(steps: list[tuple[str, Any]], file: bool) -> None:
    with tempfile.TemporaryDirectory() as where:
        if file:
            host = Host(os.open(Path(where) / "hvc.log", os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            host = Host()
        try:
            world = ConsoleWorld(host, file)
            check = world.check_file if file else world.check_pipe
            for kind, arg in steps:
                world.step(kind, arg)
                check(False)
            world.finish()
            check(True)
        finally:
            host.close()


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(WORLD_STEP, max_size=25))
# the line took part of a chain; a reset and a crash before the new ring's enable
@example([("line", 1), ("transmit", [1]), ("reset", 0), ("transmit", [2])])
# the same after a restore of a chain the old line took part of
@example([("transmit", [90]), ("line", 40), ("suspend", None), ("reset", 1), ("transmit", [9])])
def test_virtio_console_crashes_snapshots_and_resets_anywhere_send_each_byte_once_to_a_file(
    steps,
):
    """Every byte reaches a regular file once, in order, whatever the sequence of crashes,
    snapshots, restores and driver resets (a reset or set-up the dead process may not have
    applied included). This found a restore's record of an old ring taken for a new one's,
    and held bytes the file had taken sent again."""
    console_world(steps, file=True)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(WORLD_STEP, max_size=25))
def test_virtio_console_crashes_snapshots_and_resets_anywhere_lose_no_byte_to_a_pipe(steps):
    """To a pipe, bytes may repeat after a crash (the monitor cannot count what it took),
    never go missing."""
    console_world(steps, file=False)


def test_virtio_console_restart_before_a_new_rx_rings_enable_is_confirmed_repeats_no_input(host):
    """A process that died before answering receiveq0's enable in a new driver session (a
    sync write): its successor opens that ring fresh, found no progress record of its used
    idx 0 and counted none delivered, so the input the old session got since the checkpoint
    came again, to the new session (the transmit side had the same fix in 490963a)."""
    dev, driver, rx, checkpoint = checkpointed(host)  # bytes_in 0
    dev.host_input(b"secret\n")  # the journal's INPUT frame
    post(rx, 64)
    driver.kick(0)  # delivered to the old session's ring
    assert [n for _, n in rx.take_used()] == [7]
    Driver(dev).set_status(0)  # the driver resets (a module reload): applied, answered
    rx2, tx2 = Ring(dev.ram, base=0x20000), Ring(dev.ram, base=0x28000)
    tx2.heap = 0x90000
    # the new session's set-up: the process dies before it answered receiveq0's enable

    new = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    new.ctx.replaying = True
    try:
        new.host_input(b"secret\n")
        Driver(new).set_status(0)
        new.ctx.replay_unconfirmed = True  # past what the monitor knows was applied
        set_up(new, rx2, tx2)
    finally:
        new.ctx.replaying = new.ctx.replay_unconfirmed = False
    new.after_restart()
    post(rx2, 64)
    Driver(new).kick(0)

    assert (rx2.take_used(), new.stats()["rx_pending"], new.stats()["bytes_in"]) == ([], 0, 7)


RX_STEP = st.one_of(
    st.tuples(st.just("input"), st.integers(1, 40)),
    st.tuples(st.just("post"), st.lists(st.integers(0, 24), min_size=1, max_size=4)),
    st.tuples(st.just("kick"), st.just(None)),
    st.tuples(st.just("crash"), st.just(None)),
    st.tuples(st.just("publish"), st.just(None)),
    st.tuples(st.just("suspend"), st.just(None)),
    st.tuples(st.just("snap"), st.just(None)),
    # a driver reset and new rings; the process dies with 3 (all), 1 (the reset, its reply)
    # of them applied (the set-up unconfirmed, as a queue_enable whose sync write was not
    # answered)
    st.tuples(st.just("reset"), st.sampled_from([3, 3, 1])),
)


class RxWorld:
    """A console whose guest only receives, and the stream it was sent."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.sent = bytearray()  # every input byte the monitor sent, in order
        self.got = bytearray()  # every byte the guest received, in order, all sessions
        self.journal: list[Any] = []
        self.session = 0
        self.process = ReplayingProcess(self.context(False))
        self.rings(0)
        self.checkpoint = self.process.dev.save()
        self.journal = []
        self._seen: object = None

    def context(self, restarted: bool):
        return self.host.context(Line(), restarted=restarted)

    def rings(self, n: int, reset: bool = False, applied: int = 3) -> None:
        dev = self.process.dev
        rx = Ring(dev.ram, base=0x20000 + 0x8000 * n)
        tx = Ring(dev.ram, base=0x24000 + 0x8000 * n)
        self.rx, self.pool, self.inflight = rx, 0x100000 + 0x1000 * n, 0
        self.buffers: dict[int, int] = {}

        def do_reset(device: VirtioConsole) -> None:
            if reset:
                Driver(device).set_status(0)

        def set_up_both(device: VirtioConsole) -> None:
            set_up(device, rx, tx)

        if applied == 3:
            do_reset(dev)
            set_up_both(dev)
            self.journal += [(do_reset, False), (set_up_both, False)]
            return
        do_reset(dev)
        self.journal += [(do_reset, False), (set_up_both, True)]
        self.crash()

    def crash(self) -> None:
        ctx = self.context(True)
        self.process = ReplayingProcess(ctx, self.checkpoint, self.journal)
        self.journal = [(frame, False) for frame, _ in self.journal]

    def step(self, kind: str, arg: Any) -> None:
        dev = self.process.dev
        if kind == "input":
            room = RX_BUFFER_MAX - dev.stats()["rx_pending"]  # what the monitor may send
            chunk = bytes((len(self.sent) + i) % 251 for i in range(min(arg, room)))
            if chunk:
                self.sent += chunk
                frame = lambda d, c=chunk: d.host_input(c)  # noqa: E731
                frame(dev)
                self.journal.append((frame, False))
        elif kind == "post":
            for size in arg:
                if self.inflight == self.rx.size:
                    break
                head = self.rx.next_desc
                gpa = self.pool + 64 * head
                self.rx.add([(gpa, size, True)])
                self.buffers[head] = gpa
                self.inflight += 1
            Driver(dev).kick(0)
        elif kind == "kick":
            Driver(dev).kick(0)
        elif kind == "crash":
            self.crash()
        elif kind == "publish":
            dev.ctx.events._state_sent = None
            runtime.Checkpoints(dev).publish()
        elif kind == "suspend":
            state = saved(dev)
            self.process = ReplayingProcess(self.context(False), state)
            self.checkpoint, self.journal = state, []
            return self.collect()
        elif kind == "snap":
            saved(dev)
            dev.ctx.out.held = False
            dev.resume()
            Driver(dev).kick(0)
        elif kind == "reset" and self.session < 3:
            self.collect()
            self.session += 1
            self.rings(self.session, reset=True, applied=arg)
        if self.process.published is not None and self.process.published is not self._seen:
            self._seen = self.process.published
            self.checkpoint = self.process.published[0]
            self.journal = []
        self.collect()

    def collect(self) -> None:
        for head, n in self.rx.take_used():
            self.got += self.process.dev.ram.read(self.buffers[head], n)
            self.inflight -= 1

    def finish(self) -> None:
        dev = self.process.dev
        while dev.stats()["rx_pending"]:
            head = self.rx.next_desc
            if self.inflight == self.rx.size:
                break
            self.rx.add([(self.pool + 64 * head, 64, True)])
            self.buffers[head] = self.pool + 64 * head
            self.inflight += 1
            Driver(dev).kick(0)
            self.collect()


def rx_world(steps: list[tuple[str, Any]]) -> None:
    host = Host()
    try:
        world = RxWorld(host)
        for kind, arg in steps:
            world.step(kind, arg)
            assert bytes(world.got) == bytes(world.sent[: len(world.got)]), (
                bytes(world.got),
                bytes(world.sent),
            )
        world.finish()
        assert bytes(world.got) == bytes(world.sent)
    finally:
        host.close()


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(RX_STEP, max_size=30))
@example([("publish", None), ("input", 7), ("post", [16]), ("reset", 1)])
def test_virtio_console_rx_crashes_snapshots_and_resets_anywhere_deliver_each_byte_once(steps):
    """Receive's property (ConsoleWorld is transmit's): host input through the monitor's
    journaled INPUT frames, buffers the guest posts, checkpoints, crashes anywhere,
    snapshots and driver resets, some with their set-up unconfirmed. What the guest
    receives, over all its sessions in order, is the input stream: none lost, none twice."""
    rx_world(steps)


class FillingLine(Line):
    """A regular file's line on a file system that is full while `full` (output.py _FULL)."""

    full = False

    def send(self, data: memoryview) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().send(data)


def test_virtio_console_restart_after_the_disk_was_full_for_a_while_sends_no_byte_twice(
    file_host,
):
    """The checkpoint counts what the file took (BoundedOutput.taken: emitted less what a
    full file system lost), and the restart measures the file's growth against it; the
    progress page's records must count the same, or after a full-disk episode the chain in
    flight at the crash came out again from its start ("thi" twice)."""
    line = FillingLine()
    first = Process(file_host.context(line))
    driver, _, tx = started(first.dev)
    transmit(tx, b"boot\n")
    driver.kick(1)
    line.full = True  # the disk fills up: this chain's bytes are lost
    transmit(tx, b"lost\n")
    driver.kick(1)
    line.full = False  # the operator made room
    out = first.dev.ctx.out
    checkpoint = first.dev.save(), out.taken()  # what runtime.Checkpoints publishes
    transmit(tx, b"second\n")
    driver.kick(1)  # completed after the checkpoint the monitor holds
    line.budget = 3
    transmit(tx, b"third\n")
    driver.kick(1)  # the file took "thi", then the process died

    after = after_crash(file_host, checkpoint, [line])
    Driver(after.dev).kick(1)

    assert bytes(line.taken + after.line.taken) == b"boot\nsecond\nthird\n"


# -- mutation audit: guest-facing checks no test caught when broken -------------------------------
def enabled_not_running(dev: VirtioConsole, bus_master: bool) -> tuple[Driver, Ring, Ring]:
    """Both queues enabled, but the device may not run them yet: DRIVER_OK not set (with
    Bus Master Enable), or set with Bus Master Enable clear."""
    rx, tx = Ring(dev.ram), Ring(dev.ram, base=TX_BASE)
    tx.heap = TX_HEAP
    return set_up(dev, rx, tx, bus_master=bus_master, driver_ok=not bus_master), rx, tx


def run_now(driver: Driver, bus_master: bool) -> None:
    if bus_master:
        driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    else:
        driver.enable_bus_master()


@pytest.mark.parametrize("bus_master", [True, False], ids=["before-driver-ok", "bus-master-off"])
def test_virtio_console_input_waits_until_the_device_may_use_the_ring(host, bus_master):
    """3.1.1 (no buffer used before DRIVER_OK) and PCI 3.0 6.2.2 (no DMA without Bus Master
    Enable): input with a receive buffer posted waits, then goes in once the device may."""
    dev = VirtioConsole(host.context(Line()))
    driver, rx, _ = enabled_not_running(dev, bus_master)
    head, gpa = post(rx, 64)

    dev.host_input(b"early")

    assert (rx.take_used(), dev.ram.read(gpa, 5)) == ([], bytes(5))
    run_now(driver, bus_master)
    driver.kick(0)
    assert rx.take_used() == [(head, 5)] and dev.ram.read(gpa, 5) == b"early"


@pytest.mark.parametrize("bus_master", [True, False], ids=["before-driver-ok", "bus-master-off"])
def test_virtio_console_transmit_waits_until_the_device_may_use_the_ring(host, bus_master):
    """As for input: a transmit chain made available (and kicked) before the device may run
    its queues is neither read nor completed until it may."""
    line = Line()
    dev = VirtioConsole(host.context(line))
    driver, _, tx = enabled_not_running(dev, bus_master)
    head = transmit(tx, b"too soon")

    driver.kick(1)

    assert (bytes(line.taken), tx.take_used()) == (b"", [])
    run_now(driver, bus_master)
    driver.kick(1)
    assert bytes(line.taken) == b"too soon" and tx.take_used() == [(head, 0)]


def test_virtio_console_restart_without_records_past_a_ring_of_completions_drops_no_input(
    host, caplog
):
    """Without the progress page's receive records (a page scribbled on), the used entries
    since the checkpoint say what was delivered only while fewer than a ring's worth
    completed: past that their slots were reused (and their lens are the driver's to
    rewrite), so nothing is dropped from the replayed input: it may repeat, never be lost."""
    from splitvmm.devprocs import progress

    channel = Channel()
    ctx = host.context(Line())
    ctx.events.connect(channel.send)
    dev = VirtioConsole(ctx)
    driver, rx, tx = started(dev)
    data = bytes(range(64))
    transmit(tx, b"!")
    driver.kick(1)  # the checkpoint the monitor last read
    checkpoint = published(channel)
    dev.host_input(data)  # the journal's input frame
    for _ in range(3 * rx.size):  # one byte a chain, three rings' worth
        post(rx, 1)
        driver.kick(0)
        rx.take_used()
    at = progress.STREAM_AT[progress.RECEIVE]
    os.pwrite(host.fds["progress"], b"\xff" * 2 * progress.SLOT, at)

    restarted = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(restarted):
        restarted.host_input(data)

    assert restarted.stats()["rx_pending"] == len(data)
    assert "input may repeat" in caplog.text


def test_virtio_console_restart_holds_no_more_replayed_input_than_a_live_process(host):
    """A journal of input frames past what the buffer holds (none delivered, the rest was
    the monitor's to drop): replayed, what is pending is capped at RX_BUFFER_MAX as in the
    live process, the excess counted as dropped, never held past the bound."""
    dev = VirtioConsole(host.context(Line()))
    started(dev)
    checkpoint = dev.save()
    journal = [bytes([i % 251]) * 8 for i in range(RX_BUFFER_MAX // 8 + 100)]

    new = VirtioConsole.restore(host.context(Line(), restarted=True), checkpoint)
    with replaying(new):
        for chunk in journal:
            new.host_input(chunk)

    assert (new.stats()["rx_pending"], new.stats()["rx_dropped"]) == (RX_BUFFER_MAX, 800)
