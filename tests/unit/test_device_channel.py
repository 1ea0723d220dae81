"""A device's end of its channel (devprocs/channel.py): ZMTP spoken by the device's one thread
over its connected UNIX socket, against the monitor's end in raw bytes and against a libzmq
PAIR socket (the tests' and `policy audit`'s monitor ends are pyzmq)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

from splitvmm.devprocs.channel import Channel, ChannelClosed
from splitvmm.errors import ProtocolError
from splitvmm.protocol import zmtp
from tests.fakes import MonitorEnd, channel_pair

MAX = 1 << 20


def _listening(tmp_path: Path) -> tuple[socket.socket, str]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "dev0.sock"))
    listener.listen(1)
    return listener, f"ipc://{tmp_path}/dev0.sock"


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    """Everything that comes on `sock` within `seconds`."""
    got = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not data:
            break
        got += data
    return got


def test_nothing_but_the_handshake_goes_before_the_monitors_greeting_however_late(
    tmp_path: Path,
) -> None:
    """The monitor greets when it first reads the channel, which may be long after the device
    connected: no handshake timer drops the connection, and the device's first frame (READY)
    waits for the greeting (a libzmq end takes an earlier frame for a handshake command)."""
    listener, endpoint = _listening(tmp_path)
    channel = Channel.connect(endpoint, MAX, timeout_s=5)
    conn, _ = listener.accept()
    try:
        assert not channel.send_now(b"event")  # nothing taken: it would have to wait
        sender = threading.Thread(target=channel.send, args=(b"READY",))
        sender.start()
        assert _read_for(conn, 0.5) == zmtp.HANDSHAKE  # its greeting and READY command only
        monitor = MonitorEnd(conn)  # greets
        monitor.reader.feed(zmtp.HANDSHAKE)  # the device's, read above
        assert monitor.recv() == b"READY"
        sender.join(5)
        assert not sender.is_alive()
    finally:
        channel.close()
        conn.close()
        listener.close()


def test_a_libzmq_pair_socket_can_be_the_monitors_end(tmp_path: Path) -> None:
    """READY out, a frame in, frames over 255 bytes both ways (ZMTP's long form), several
    frames in one write each taken alone."""
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    monitor = zctx.socket(zmq.PAIR)
    monitor.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/dev0.sock"
    monitor.bind(endpoint)
    channel = Channel.connect(endpoint, MAX, timeout_s=5)
    try:
        channel.send(b"ready")
        assert monitor.poll(5000)
        assert monitor.recv() == b"ready"
        monitor.send(b"q" * 70000)
        monitor.send(b"r")
        assert channel.recv() == b"q" * 70000
        assert channel.recv() == b"r"
        channel.send(b"s" * 300)
        assert monitor.poll(5000)
        assert monitor.recv() == b"s" * 300
    finally:
        channel.close()
        monitor.close()
        zctx.term()


def test_frames_of_one_write_are_served_one_at_a_time_without_another_read() -> None:
    monitor, channel = channel_pair()
    try:
        assert not channel.frame_ready()
        monitor.sock.sendall(b"".join(map(zmtp.encode, (b"a", b"b" * 256, b"c"))))
        assert channel.recv() == b"a"
        monitor.sock.shutdown(socket.SHUT_WR)  # nothing more comes: no read finds b and c
        assert channel.frame_ready()
        assert [channel.recv(), channel.recv()] == [b"b" * 256, b"c"]
        with pytest.raises(ChannelClosed, match="the monitor closed the channel"):
            channel.frame_ready()
    finally:
        monitor.close()
        channel.close()


def test_an_event_the_kernel_takes_in_part_goes_out_whole_before_the_next() -> None:
    """send_now() never waits: what does not fit waits in the channel (`sending`) and goes
    before anything else; while it waits, another event is not taken."""
    monitor, channel = channel_pair()
    big = bytes(range(256)) * 4096  # 1 MiB: past any socket buffer here
    try:
        monitor.send(b"hello")  # so that the device's end has the monitor's greeting
        assert channel.recv() == b"hello"
        assert channel.send_now(big)
        assert channel.sending
        assert not channel.send_now(b"next")
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend([monitor.recv(), monitor.recv()]))
        reader.start()
        while not channel.flush():
            time.sleep(0.001)
        channel.send(b"after")
        reader.join(10)
        assert got == [big, b"after"]
    finally:
        monitor.close()
        channel.close()


def test_a_send_the_kernel_takes_in_part_waits_and_goes_out_whole() -> None:
    """send() (a reply's way: one write when it all fits) waits for room for the rest, and
    nothing else goes in between."""
    monitor, channel = channel_pair()
    big = bytes(range(256)) * 4096  # 1 MiB: past any socket buffer here
    try:
        monitor.send(b"hello")
        assert channel.recv() == b"hello"
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend([monitor.recv(), monitor.recv()]))
        reader.start()
        channel.send(big)
        assert not channel.sending
        channel.send(b"reply")
        reader.join(10)
        assert got == [big, b"reply"]
    finally:
        monitor.close()
        channel.close()


def test_a_closed_monitor_end_is_channel_closed_both_ways() -> None:
    monitor, channel = channel_pair()
    monitor.send(b"x")
    assert channel.recv() == b"x"
    monitor.close()
    with pytest.raises(ChannelClosed):
        channel.recv()
    with pytest.raises(ChannelClosed):
        for _ in range(100):  # the first sends may still land in the closed end's buffer
            channel.send(b"y" * 65536)
    channel.close()


def test_a_monitor_that_breaks_zmtp_is_refused_on_its_bytes() -> None:
    """The monitor is trusted, but its bytes are held to the same reader (and its bound)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(theirs, 1024)
    try:
        ours.sendall(zmtp.HANDSHAKE + b"\x02" + (1 << 40).to_bytes(8, "big"))
        with pytest.raises(ProtocolError, match="over the 1024 allowed"):
            channel.recv()
    finally:
        ours.close()
        channel.close()
