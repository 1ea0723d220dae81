"""What a hostile device can make the monitor's end of its channel buffer (monitor/channel.py,
monitor/zmtp.py, protocol/zmtp.py).

A compromised device holds its channel's socket and may write any bytes to it (its seccomp
policy allows write() on any fd), so the device end here is a raw ZMTP 3.0 peer, not a
ZeroMQ socket. A libzmq PAIR socket kept every part of a multipart message until its last
part came, without limit (96 MiB in this test, ~450 MiB/s in a scratch run); the monitor's
end now reads ZMTP itself from its socket, refuses a multipart message on its first part's
header, ends the connection, and holds at most one frame and one read's chunk meanwhile.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import zmq

from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.protocol import control, events, wire, zmtp

PART = 60 << 10  # under MAX_DEVICE_FRAME, so a per-frame limit alone lets it through
SENT = 96 << 20  # of parts of one message that never ends
# What a device can make the channel hold: one frame and a read's chunk in the parser, and
# slack for the allocator (the rest waits in the kernel's socket buffer).
BOUND = zmtp.CHUNK + control.MAX_DEVICE_FRAME + (16 << 20)
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
READY = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 4) + b"PAIR"
PEER_HANDSHAKE = GREETING + b"\x04" + bytes([len(READY)]) + READY  # what a raw peer sends first


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _raw_peer(path: Path) -> socket.socket:
    """A ZMTP 3.0 PAIR peer with the NULL mechanism (RFC 23), its greeting and READY sent; it
    never reads ours (the kernel's buffer takes it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(PEER_HANDSHAKE)
    return s


def _channel(tmp_path: Path) -> tuple[DeviceChannel, Path]:
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    return DeviceChannel("serial", f"ipc://{path}", listening.detach()), path


def _flood(peer: socket.socket, data: bytes, count: int) -> threading.Thread:
    def send() -> None:
        peer.settimeout(5)
        for _ in range(count):
            try:
                peer.sendall(data)
            except OSError:  # the monitor hung up on it
                return

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_device_cannot_make_the_monitor_buffer_an_endless_multipart_message(
    tmp_path: Path,
) -> None:
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        before = _rss()
        part = b"\x03" + struct.pack(">Q", PART) + bytes(PART)  # MORE | LONG
        sender = _flood(peer, part, SENT // PART)
        time.sleep(0.3)  # the kernel takes what it may of it meanwhile
        with pytest.raises(ChannelError, match="sent a multipart message"):
            ch.drain_events()
        sender.join(10)
        assert not sender.is_alive(), "the monitor did not hang up on the device"
        grown = _rss() - before
    finally:
        peer.close()
        ch.close()
    assert grown < BOUND, f"the monitor grew by {grown >> 20} MiB for one unfinished message"


def test_a_device_that_sends_nothing_whole_is_held_to_its_chunks(tmp_path: Path) -> None:
    """No frame ends and nobody reads: the kernel stops taking the device's bytes once its
    socket buffer is full, so the device's sends block rather than grow us."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        before = _rss()
        sender = _flood(peer, bytes(64 << 10), SENT // (64 << 10))  # zeros: short frames
        sender.join(1.5)
        grown = _rss() - before
        assert sender.is_alive(), "the device wrote 96 MiB that nobody read"
    finally:
        peer.close()
        ch.close()
    assert grown < BOUND, f"the monitor grew by {grown >> 20} MiB for unread bytes"


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"\x02" + struct.pack(">Q", 1 << 40), "a frame of 1099511627776 bytes, over the 65536"),
        (b"\x04\x05\x04PING", "a command after its handshake"),
        (b"\x10\x00", "frame flags 0x10 after its handshake"),
    ],
)
def test_a_frame_header_the_channel_refuses_ends_the_device(
    tmp_path: Path, frame: bytes, why: str
) -> None:
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        peer.sendall(frame)
        time.sleep(0.1)
        with pytest.raises(ChannelError, match=why):
            ch.drain_events()
    finally:
        peer.close()
        ch.close()


def test_bytes_that_are_not_zmtp_end_the_device(tmp_path: Path) -> None:
    ch, path = _channel(tmp_path)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(path))
    try:
        peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
        time.sleep(0.1)
        with pytest.raises(ChannelError, match="not a ZMTP greeting"):
            ch.drain_events()
    finally:
        peer.close()
        ch.close()


def test_a_libzmq_pair_socket_talks_to_the_channel(tmp_path: Path) -> None:
    """Any ZeroMQ PAIR socket can be a device's end (the wire is ZeroMQ's): READY, a read
    answered, posted writes as messages of one write, a frame over 255 bytes both ways
    (ZMTP's long form)."""
    ch, path = _channel(tmp_path)
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dev = zctx.socket(zmq.PAIR)
    dev.setsockopt(zmq.LINGER, 0)
    dev.setsockopt(zmq.IMMEDIATE, 1)  # as devprocs/runtime.py: POLLOUT once the handshake is done
    dev.connect(f"ipc://{path}")
    try:
        # Its send waits for our greeting, which the channel sends once it reads (wait_ready).
        ready = threading.Thread(target=dev.send, args=(wire.encode_ready(),))
        ready.start()
        ch.wait_ready(_Alive(), timeout_ms=2000)  # type: ignore[arg-type]
        ready.join()
        ch.post_many([b"a" * 300, b"b", b"c" * 70000])
        assert dev.poll(2000)
        assert [dev.recv() for _ in range(3)] == [b"a" * 300, b"b", b"c" * 70000]
        assert not dev.getsockopt(zmq.RCVMORE)  # each a message of its own

        def answer() -> None:
            seq = wire.FRAME.unpack(dev.recv())[3]  # op, size, flags, seq, offset, data
            dev.send(wire.encode_read_done(seq, b"\x5a", None))

        thread = threading.Thread(target=answer)
        thread.start()
        assert ch.read(5, 1) == b"\x5a"
        thread.join()
    finally:
        dev.close()
        ch.close()
        zctx.term()


class _Alive:
    """A DeviceProcess stand-in that has not ended (wait_ready asks)."""

    pidfd = -1

    def ended(self, within_s: float = 0) -> bool:
        return False

    def poll(self) -> int | None:
        return None


def _wait_ready_unless_hung(ch: DeviceChannel, timeout_ms: int, device: str) -> list[BaseException]:
    """What wait_ready raised, run on a thread: a wait stuck in ZeroMQ fails the test (the
    socket cannot be closed under it)."""
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            ch.wait_ready(_Alive(), timeout_ms=timeout_ms)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(5)
    if waiter.is_alive():
        pytest.fail(f"wait_ready hung on a device {device}")
    return errors


def test_a_send_to_a_connection_that_has_ended_is_no_error_of_the_monitor(
    tmp_path: Path,
) -> None:
    """The device's end closed, and the monitor has not read that yet: the write fails
    (EPIPE), the link is closed, and the channel's send says so as for an end read."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        assert not ch._frame_within(200)  # its greeting and READY, read: no frame
        assert ch._link.reader.ready
        peer.close()
        with pytest.raises(ChannelError, match="closed its channel with a posted write unsent"):
            ch.post(b"x")
        assert ch._link.closed
    finally:
        ch.close()


def test_a_post_before_the_devices_ready_waits_for_it_then_goes(tmp_path: Path) -> None:
    """Nothing goes to a libzmq peer before its READY (it takes a frame that comes earlier
    for a handshake command, and hangs up): a post made before the device has even
    connected accepts its connection, greets it, waits for its READY, then goes."""
    ch, path = _channel(tmp_path)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    before_ready: list[bytes] = []

    def connect_late() -> None:
        time.sleep(0.2)
        peer.connect(str(path))
        time.sleep(0.2)
        before_ready.append(peer.recv(1 << 16, socket.MSG_DONTWAIT))
        peer.sendall(PEER_HANDSHAKE)

    late = threading.Thread(target=connect_late)
    late.start()
    try:
        ch.post(b"hello")
        late.join()
        assert before_ready == [zmtp.HANDSHAKE]  # greeted, and nothing more until its READY
        assert _recv_frame(peer) == b"hello"
    finally:
        late.join()
        peer.close()
        ch.close()


def test_a_message_larger_than_the_socket_buffer_goes_out_whole_and_in_order(
    tmp_path: Path,
) -> None:
    """A posted message the kernel takes in pieces (a device reading slowly): the rest goes
    out before the next message, which does not overtake it."""
    ch, path = _channel(tmp_path)
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dev = zctx.socket(zmq.PAIR)
    dev.setsockopt(zmq.LINGER, 0)
    dev.setsockopt(zmq.RCVHWM, 1)
    dev.connect(f"ipc://{path}")
    big = [bytes([i]) * 60000 for i in range(40)]  # 2.4 MiB: past any socket buffer here
    try:
        ready = threading.Thread(target=dev.send, args=(wire.encode_ready(),))
        ready.start()
        ch.wait_ready(_Alive(), timeout_ms=2000)  # type: ignore[arg-type]
        ready.join()
        got: list[bytes] = []

        def read_slowly() -> None:
            for i in range(len(big) + 3):
                assert dev.poll(5000)
                got.append(dev.recv())
                if i % 8 == 0:
                    time.sleep(0.05)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        ch.post_many(big)
        ch.post_many(big[:2])
        ch.post(b"last")
        reader.join(10)
        assert got == [*big, *big[:2], b"last"]
    finally:
        dev.close()
        ch.close()
        zctx.term()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        assert more, "the channel hung up"
        data += more
    return data


def _recv_frame(s: socket.socket) -> bytes:
    """One short ZMTP frame from the monitor (a request: under 256 bytes)."""
    flags, size = _recv_exact(s, 2)
    assert flags == 0, f"flags {flags:#x}"
    return _recv_exact(s, size)


def test_a_bad_header_behind_a_good_frame_fails_the_device_as_a_channel_error(
    tmp_path: Path,
) -> None:
    """A device writes its reply and, in the same write, the header of a multipart message.
    The reply is taken; the header waits in the parser, and the next request's wait
    (_recv) parses it: that must fail the device (ChannelError, what the slot catches),
    not raise the parser's ProtocolError out of the channel, which a vCPU takes for a
    monitor bug and stops the whole VM for (monitor/vcpu.py), whatever the device's
    on_crash says."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        ready = wire.encode_ready()
        peer.sendall(bytes((0, len(ready))) + ready)
        ch.wait_ready(_Alive(), timeout_ms=2000)  # type: ignore[arg-type]
        ours = _recv_exact(peer, 64 + 2)  # the monitor's greeting, its READY's header
        _recv_exact(peer, ours[-1])

        def answer() -> None:
            seq = wire.FRAME.unpack(_recv_frame(peer))[3]
            reply = wire.encode_read_done(seq, b"\x5a", None)
            peer.sendall(bytes((0, len(reply))) + reply + b"\x01\x00")  # then MORE

        thread = threading.Thread(target=answer)
        thread.start()
        assert ch.read(5, 1) == b"\x5a"
        thread.join()
        with pytest.raises(ChannelError, match="sent a multipart message"):
            ch.read(5, 1)
    finally:
        peer.close()
        ch.close()


def test_a_device_gone_before_the_channel_reads_its_connection_does_not_hang_it(
    tmp_path: Path,
) -> None:
    """The device connects and its connection ends before the monitor first reads the
    channel (a device that crashes at start while the monitor waits on another's READY).
    The greeting, sent once it is accepted, must not wait (with ZMQ_STREAM, which held
    such a connection's pipe unwritable until its end's notice was read, by the caller's
    own thread, it waited for ever in a blocking send)."""
    ch, path = _channel(tmp_path)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(path))
    peer.close()
    time.sleep(0.2)
    try:
        errors = _wait_ready_unless_hung(ch, 1000, "whose connection had ended")
        assert len(errors) == 1 and isinstance(errors[0], ChannelError), errors
    finally:
        ch.close()


def test_a_libzmq_device_whose_handshake_timed_out_is_failed_not_waited_on(
    tmp_path: Path,
) -> None:
    """The device's libzmq starts its handshake timer (ZMQ_HANDSHAKE_IVL, 30 s by default)
    when it connects, and the monitor greets only when it first reads the channel: one
    read later than that (Machine.run reads each device's channel in turn) finds the
    connection ended by the device's own ZeroMQ, never to come back (RECONNECT_IVL -1).
    Here the timer is 200 ms. The channel hung for ever in its greeting's send."""
    ch, path = _channel(tmp_path)
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dev = zctx.socket(zmq.PAIR)
    dev.setsockopt(zmq.LINGER, 0)
    dev.setsockopt(zmq.RECONNECT_IVL, -1)  # as devprocs/runtime.py _connect
    dev.setsockopt(zmq.IMMEDIATE, 1)
    dev.setsockopt(zmq.HANDSHAKE_IVL, 200)
    dev.connect(f"ipc://{path}")
    time.sleep(0.6)  # the monitor reads no channel meanwhile
    try:
        errors = _wait_ready_unless_hung(ch, 2000, "whose handshake had timed out")
        assert len(errors) == 1 and isinstance(errors[0], ChannelError), errors
    finally:
        dev.close()
        ch.close()
        zctx.term()


def test_a_device_that_hangs_up_before_ready_is_told_so_not_timed_out(tmp_path: Path) -> None:
    """Its connection's end (EOF): from then on no frame can come, and
    wait_ready must say that it closed its channel, after the time it really waited. It
    spun instead (each _frame_within returned at once, counted as READY_POLL_MS) and said
    'did not start within 15000 ms' a millisecond in."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        assert not ch._frame_within(100)  # its connection accepted: greeted
        peer.close()
        start = time.monotonic()
        with pytest.raises(ChannelError, match="closed its end of the channel") as e:
            ch.wait_ready(_Alive(), timeout_ms=15000)  # type: ignore[arg-type]
        took_ms = (time.monotonic() - start) * 1000
        said_ms = int(str(e.value).split(" within ")[1].split(" ms")[0])
        assert said_ms <= took_ms + 1, (str(e.value), took_ms)
    finally:
        ch.close()


def test_what_a_device_sent_before_its_end_is_read_after_a_send_to_it_failed(
    tmp_path: Path,
) -> None:
    """The device sends an event (its last checkpoint, say) and its process ends; the next
    thing the monitor does with its channel is a posted write, which fails (EPIPE) before
    anything read the event. The event is still in the kernel's socket buffer, ahead of the
    connection's end: the slot drains it (slot.py _drain_events_locked), as it would have
    had the connection's end been read first. A failed write ended the link for reading
    too, and the device's last frames were dropped unread."""
    path = tmp_path / "dev0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    got: list[events.Event] = []
    ch = DeviceChannel("serial", f"ipc://{path}", listening.detach(), on_event=got.append)
    peer = _raw_peer(path)
    try:
        assert not ch._frame_within(200)  # its greeting and READY, read: no frame
        report = events.encode_report("last words")
        peer.sendall(bytes((0, len(report))) + report)
        peer.close()
        with pytest.raises(ChannelError, match="closed its channel with a posted write unsent"):
            ch.post(b"x")
        ch.drain_events(limited=False)
        assert got == [events.Report("last words")]
    finally:
        ch.close()
