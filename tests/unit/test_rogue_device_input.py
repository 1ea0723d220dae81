"""What the monitor refuses of a device that lies (or of a snapshot standing in for one), at
unit level, beside tests/integration/test_rogue_device.py's real processes: register
mirrors, late and stale answers, the ZMTP handshake and heartbeats (its checkpoints, input
counts and journals are test_slot.py's). One test per check; each fails if its check is
broken (a mutation audit found them untested)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from splitvmm.errors import ProtocolError
from splitvmm.monitor import channel as channel_module
from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.supervisor import HEARTBEAT_TIMEOUT_MS, Supervisor
from splitvmm.protocol import control, events, wire, zmtp
from splitvmm.protocol.models import MODELS
from tests.unit.test_channel_drain import access_channel, drained_channel
from tests.unit.test_channel_multipart import _channel, _raw_peer


# -- monitor/mirror.py -------------------------------------------------------------------------
def test_mirror_stamp_far_past_a_wrap_still_answers_at_its_stamp() -> None:
    """A MIRROR's stamp is the device's frame count mod 2**32; the slot's is not reduced.
    After the count wrapped, a mirror stamped with the current count answers (the existing
    wrap test was one frame off, where an unmasked difference happens to be right too)."""
    mirror = RegisterMirror(((1, 1), (4, 2), (7, 1)))
    frames = (1 << 32) + 1000
    mirror.take(wire.Mirror((b"\x01", b"\x02\x03", b"\x5a"), 0, 0, frames & wire.STAMP_MASK))
    assert mirror.answer(1, 1, frames=frames) == b"\x01"


# -- monitor/channel.py ------------------------------------------------------------------------
def _answering_channel(reply: dict[str, object]) -> DeviceChannel:
    """A channel without a socket whose device answers each request with `reply` (its seq
    the request's)."""
    ch = drained_channel(lambda buf: True)
    ch._seq, ch._late, ch._host_io, ch._model, ch._pidfd = 0, {}, None, "serial", None

    def answer(frame: bytes, timeout_ms: int, wait_host_io: bool = True) -> bytes:
        return control.encode({**reply, "seq": control.decode(frame)["seq"]})

    ch._request = answer  # type: ignore[method-assign]
    return ch


def test_channel_ping_of_a_device_that_left_max_late_requests_unanswered_fails_it() -> None:
    """Each late answer waits in _late; a device that never gives them has failed, and the
    heartbeat says so (else _late grows by one per heartbeat the device sits out)."""
    ch = _answering_channel({"op": "pong"})
    ch._late = {seq: "pong" for seq in range(100, 100 + channel_module.MAX_LATE_STATS)}
    with pytest.raises(ChannelError, match=f"left {channel_module.MAX_LATE_STATS} requests"):
        ch.ping(2000)


def test_channel_stats_of_a_device_that_left_max_late_requests_unanswered_fails_it() -> None:
    ch = _answering_channel({"op": "counters", "counters": {}})
    ch._late = {seq: "pong" for seq in range(100, 100 + channel_module.MAX_LATE_STATS)}
    with pytest.raises(ChannelError, match=f"left {channel_module.MAX_LATE_STATS} requests"):
        ch.stats(2000)


def test_channel_event_allowance_of_posted_frames_is_the_next_requests_only() -> None:
    """Each posted frame may bring one MIRROR, so the request after N posts allows N more
    events; the one after that is back to MAX_EVENTS_PER_REQUEST (kept, a device that was
    once sent many writes could send that many more events around every later request)."""
    ch, sent = access_channel(0.0, events=events.MAX_EVENTS_PER_REQUEST + 3)
    ch._posted = 3  # three posted writes since the last request
    ch.read(0, 4)
    with pytest.raises(ChannelError, match=f"more than {events.MAX_EVENTS_PER_REQUEST} events"):
        ch.read(0, 4)


def _late_channel(late: dict[int, str]) -> DeviceChannel:
    ch = DeviceChannel.__new__(DeviceChannel)
    ch._late, ch._model, ch._on_event = dict(late), "serial", None
    return ch


def test_channel_late_answer_of_another_op_is_not_taken_for_the_one_given_up_on() -> None:
    """A late answer is dropped only when it is the answer given up on (its seq and its op):
    a pong under a given-up stats request's seq is a frame nobody asked for."""
    ch = _late_channel({5: "counters"})
    assert ch._handled_event(control.encode({"op": "pong", "seq": 5})) is False
    assert ch._late == {5: "counters"}


def test_channel_late_answer_is_dropped_once_and_forgotten() -> None:
    """The answer given up on is dropped when it comes, and no longer waited for: a second
    one is a frame nobody asked for, and it no longer counts towards MAX_LATE_STATS."""
    ch = _late_channel({5: "counters"})
    counters = control.encode({"op": "counters", "seq": 5, "counters": {}})
    assert ch._handled_event(counters) is True
    assert ch._late == {}
    assert ch._handled_event(counters) is False


def test_channel_save_reply_in_a_version_its_model_does_not_save_fails_the_device() -> None:
    """A saved state must be in the version its model saves (a snapshot holding another
    passes `snapshot verify` and fails its restore): checked for a publish and, here, for
    the save a snapshot takes."""
    version = MODELS["serial"].state_version
    ch = _answering_channel(
        {"op": "state", "model": "serial", "version": version + 1, "fields": {}}
    )
    with pytest.raises(ChannelError, match=f"sent a state of version {version + 1}"):
        ch.control("save", 2000)


def test_channel_mirror_from_a_model_that_mirrors_no_register_fails_the_device(
    tmp_path: Path,
) -> None:
    """Even an empty MIRROR (no register valid, no data, a credit inside the window) from a
    device whose model mirrors nothing breaks its channel."""
    path = tmp_path / "rtc0.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    ch = DeviceChannel("rtc", f"ipc://{path}", listening.detach(), on_event=lambda e: None)
    try:
        empty = wire.FRAME.pack(wire.Op.MIRROR, 0, 0, 0, 0, b"")
        with pytest.raises(ChannelError, match="a rtc mirrors none"):
            ch._handled_event(empty)
    finally:
        ch.close()


def test_channel_broken_zmtp_ends_the_devices_connection(tmp_path: Path) -> None:
    """A device that breaks ZMTP is failed and its connection ended by us (close_peer): the
    channel says its connection ended, and the device reads EOF."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    try:
        peer.sendall(b"\x10\x00")  # frame flags no ZMTP peer sends
        time.sleep(0.1)
        with pytest.raises(ChannelError, match="frame flags 0x10"):
            ch.drain_events()
        assert ch.connection_ended
        peer.settimeout(5)
        while peer.recv(1 << 16):  # our greeting, then the end
            pass
    finally:
        peer.close()
        ch.close()


def test_channel_link_ended_by_us_reads_its_fd_number_no_more(tmp_path: Path) -> None:
    """Once close_peer() closed the connection, nothing reads its fd again: the number may
    be another file's by then (here a pipe, put there on purpose), whose bytes are not the
    device's."""
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)
    r, w = os.pipe()
    try:
        assert not ch._frame_within(100)  # connected, greeted
        link = ch._link
        link.close_peer()
        os.dup2(r, link.fd)  # the fd number reused
        os.write(w, b"\x00\x01x")  # a whole ZMTP frame, were it read
        assert link.frame_ready() is False
        os.set_blocking(link.fd, False)
        assert os.read(link.fd, 16) == b"\x00\x01x"  # still there: not read by the link
    finally:
        os.close(link.fd)
        for fd in (r, w):
            os.close(fd)
        peer.close()
        ch._link._conn = None  # its socket object's fd was closed above
        ch.close()


# -- monitor/supervisor.py ---------------------------------------------------------------------
class _BeatSlot:
    def __init__(self) -> None:
        self.pings: list[int] = []

    def heartbeat(self, timeout_ms: int) -> None:
        self.pings.append(timeout_ms)


def test_supervisor_heartbeat_pings_each_watched_device_and_no_spare() -> None:
    """A device hung in a loop is seen only by the heartbeat (virtio I/O reaches it through
    ioeventfds): each beat pings every process that serves, never a spare."""
    sup = Supervisor()
    serving, spare = _BeatSlot(), _BeatSlot()
    sup._watched = {100: (serving, object(), False), 101: (spare, object(), True)}  # type: ignore[dict-item]
    try:
        sup._beat()
    finally:
        sup._watched = {}
        sup.close()
    assert (serving.pings, spare.pings) == ([HEARTBEAT_TIMEOUT_MS], [])


# -- protocol/zmtp.py: a device's READY ----------------------------------------------------------
def test_zmtp_ready_whose_last_property_is_shorter_than_it_says_is_refused() -> None:
    """A property's value must be as long as its size says, the last one too (its value is
    otherwise taken from what is there: a Socket-Type of 100 bytes holding 'PAIR')."""
    greeting = b"\xff" + bytes(7) + b"\x01\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
    body = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 100) + b"PAIR"
    reader = zmtp.ZmtpReader(64 << 10)
    reader.feed(greeting + b"\x04" + bytes([len(body)]) + body)
    with pytest.raises(ProtocolError, match="a truncated property"):
        reader.next()


# -- monitor/channel.py: a device that takes no posted frame ------------------------------
def test_channel_post_to_a_device_that_takes_nothing_fails_at_the_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that stops reading its channel (not in a host I/O call) has failed once a
    post found no room for WRITE_TIMEOUT_MS: the post must not wait on, deadline after
    deadline, holding the vCPU and the slot's lock."""
    monkeypatch.setattr(channel_module, "WRITE_TIMEOUT_MS", 200)
    ch, path = _channel(tmp_path)
    peer = _raw_peer(path)  # greets, then never reads
    errors: list[BaseException] = []

    def post() -> None:
        try:
            ch.post(bytes(16 << 20))  # far more than its socket buffer takes
        except BaseException as e:
            errors.append(e)

    poster = threading.Thread(target=post, daemon=True)
    try:
        poster.start()
        poster.join(5)
        assert not poster.is_alive(), "the post waited on past its timeout"
        assert len(errors) == 1 and "stopped taking frames" in str(errors[0]), errors
    finally:
        peer.close()
        if not poster.is_alive():
            ch.close()
