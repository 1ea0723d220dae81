"""What the monitor refuses of a device that lies (or of a snapshot standing in for one), at
unit level, beside tests/integration/test_rogue_device.py's real processes: register
mirrors, late and stale answers, checkpoints, input counts, journals across
restarts, the ZMTP handshake and heartbeats. One test per check; each fails if its check
is broken (a mutation audit found them untested)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitvmm.errors import DeviceFailure, ProtocolError
from splitvmm.monitor import channel as channel_module
from splitvmm.monitor.channel import ChannelError, DeviceChannel
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import Checkpoint, DeviceSlot, SlotState, Spawn
from splitvmm.monitor.supervisor import HEARTBEAT_TIMEOUT_MS, Supervisor
from splitvmm.protocol import control, events, wire, zmtp
from splitvmm.protocol.models import MODELS
from tests.unit.test_channel_drain import access_channel, drained_channel
from tests.unit.test_channel_multipart import _channel, _raw_peer
from tests.unit.test_slot import InputChannel, refuse


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


# -- monitor/slot.py: what a device's events say ------------------------------------------------
@pytest.fixture
def live_slot(tmp_path: Path) -> tuple[DeviceSlot, InputChannel]:
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: False)
    channel = InputChannel(slot)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    return slot, channel


SERIAL_STATE = {"model": "serial", "version": MODELS["serial"].state_version, "fields": {}}


def test_slot_checkpoint_past_the_frames_sent_is_a_broken_channel(live_slot) -> None:
    """A checkpoint says how many frames the device applied: more than were sent is a lie
    that would empty the journal a restart replays (and refuse every honest checkpoint
    after it)."""
    slot, _ = live_slot
    for _ in range(3):
        slot.write(0, b"A")
    slot._on_event(events.Published(SERIAL_STATE, 3, 0))  # all three: fine
    with pytest.raises(ChannelError, match="published a checkpoint at frame 4, but it was sent 3"):
        slot._on_event(events.Published(SERIAL_STATE, 4, 0))


def test_slot_checkpoint_before_the_last_one_is_a_broken_channel(live_slot) -> None:
    """Checkpoints only go forward: one behind the last would replay frames the journal no
    longer holds (dropped when the later one came)."""
    slot, _ = live_slot
    for _ in range(3):
        slot.write(0, b"A")
    slot._on_event(events.Published(SERIAL_STATE, 2, 0))
    with pytest.raises(ChannelError, match="its last checkpoint was at 2"):
        slot._on_event(events.Published(SERIAL_STATE, 1, 0))


def test_slot_input_room_claiming_one_byte_more_than_was_sent_fails_the_device(
    live_slot,
) -> None:
    """The bound exactly: 3 bytes sent, the device says it received 4 (the room it then
    claims would let the monitor send past its buffer)."""
    slot, channel = live_slot
    channel.events.append(events.InputRoom(0, 3))
    assert slot.input(b"abc") == 3
    slot._on_event(events.InputRoom(3, 0))  # exactly what was sent: fine
    with pytest.raises(ChannelError, match="said it received 4 bytes of input, but was sent 3"):
        slot._on_event(events.InputRoom(4, 0))


def test_slot_restart_skips_nothing_when_the_checkpoint_counts_more_than_the_file_grew(
    tmp_path: Path,
) -> None:
    """skip = the file's growth less the checkpoint's emitted, never below 0: the count is
    the device's word (a lie, or a file truncated since, as logrotate's copytruncate does),
    and a negative skip is refused by the next process, which then never starts."""
    out = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        slot = DeviceSlot(Spawn("serial0", "serial", 8, fds={"out": out}), tmp_path, refuse,
                          lambda s, why: True)  # fmt: skip
        os.write(out, b"boot\n")  # the file grew by 5
        slot._checkpoint = Checkpoint(None, 0, 12)  # the device says its line took 12
        with slot._lock:
            resume = slot._resume_locked()
    finally:
        os.close(out)
    assert resume["skip"] == 0


def test_slot_ready_of_a_process_no_longer_in_the_slot_leaves_it_away(tmp_path: Path) -> None:
    """A READY that comes once its process was taken out of the slot (vacate() from another
    thread while wait_ready() waited) does not make the slot live with no process in it."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    gone = object()
    assert (slot.process, slot.state) == (None, SlotState.AWAY)
    slot._now_live(gone)  # type: ignore[arg-type]
    assert slot.state is SlotState.AWAY


class _Gone:
    """A device process that has ended: what the slot's teardown of it asks."""

    pid = 4242
    pidfd = -1

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def lingered(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_slot_restart_past_the_journal_hands_no_spare_a_journal_with_frames_missing(
    tmp_path: Path,
) -> None:
    """More frames than MAX_JOURNAL since the last checkpoint: the restart is refused before
    a warm spare is handed the rest (it would go on without the frames dropped, and the
    check after a spare failed to take over is never reached once one takes over)."""
    failures: list[str] = []
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse,
                      lambda s, why: failures.append(why) or True)  # fmt: skip
    resumed: list[object] = []

    def resumer(process: object, spec: object) -> None:
        resumed.append(spec)
        raise DeviceFailure("the test's spare takes over nothing")

    slot._resumer = resumer  # type: ignore[assignment]
    slot._spare = (_Gone(), os.open(os.devnull, os.O_RDONLY))  # type: ignore[assignment]
    slot.process, slot.state, slot.restarting = _Gone(), SlotState.AWAY, True  # type: ignore[assignment]
    slot._lost = 5  # frames 1-5 fell out of the journal; the checkpoint is at 0

    with pytest.raises(DeviceFailure, match="more than 4096 frames since its last checkpoint"):
        slot.restart()
    assert resumed == []


def test_slot_writes_lost_from_the_journal_while_it_restarted_fail_the_device(
    tmp_path: Path,
) -> None:
    """Posted writes that came while a restart was away past RESTART_WAIT_MS go to the new
    process once READY; when the journal dropped some of them (more than MAX_JOURNAL) the
    device cannot go on transparently and has failed, rather than get the rest."""
    failures: list[str] = []
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse,
                      lambda s, why: failures.append(why) and False)  # fmt: skip
    process = _Gone()
    channel = SyncedChannel(slot)
    slot.process, slot.channel = process, channel  # type: ignore[assignment]
    slot.state, slot.restarting = SlotState.AWAY, True
    with slot._lock:
        for _ in range(3):
            slot._journal_locked(wire.encode_write(0, b"A"))
    slot._resumed_at, slot._lost = 0, 1  # frame 1 went out of the journal

    slot._now_live(process)  # type: ignore[arg-type]

    assert failures == ["more than 4096 writes came while it restarted"]
    assert (slot.state, list(channel)) == (SlotState.FAILED, [])


class SyncedChannel(InputChannel):
    def sync(self, drain: bool = False) -> None:
        pass


def test_slot_route_request_in_an_ended_process_last_words_is_not_answered(tmp_path) -> None:
    """As an MSI request's (test_slot.py): the answer could not go to a process that ended,
    and its send failing ended the drain, losing its last checkpoint after the request."""
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, refuse, lambda s, why: True)
    answers: list[bytes] = []
    slot.channel = SimpleNamespace(answer=answers.append)  # type: ignore[assignment]

    def last_words(limited: bool) -> None:
        slot._on_event(events.RouteRequest(9, 4))

    slot._drain_events_locked(SimpleNamespace(drain_events=last_words))  # type: ignore[arg-type]
    assert answers == []
    slot._on_event(events.RouteRequest(9, 4))  # from a live process: answered
    assert len(answers) == 1


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
