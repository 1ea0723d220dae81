"""Events a device sends unasked (protocol/events.py) and its queue of them (DeviceEvents)."""

from __future__ import annotations

import re
import tracemalloc

import pytest

from splitvmm.devprocs.base import DeviceContext, DeviceEvents, DeviceState
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.runtime import Checkpoints
from splitvmm.devprocs.serial import Uart8250
from splitvmm.errors import ProtocolError
from splitvmm.protocol import control, events, wire
from splitvmm.protocol.codec import MAX_FIELDS_DEPTH
from splitvmm.protocol.events import PUBLISH_EVERY, PUBLISH_EVERY_COUNTED
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.sandbox.launcher_server import _decode_spec
from tests.fakes import FakeIrq, FakeLine

STATE = {"model": "serial", "version": 2, "fields": {"ier": 1}}


def test_events_each_kind_decodes_to_what_was_sent():
    assert events.decode_event(events.encode_publish(STATE), "serial") == events.Published(STATE)
    assert events.decode_event(events.encode_report("low on disk"), "serial") == events.Report(
        "low on disk"
    )
    assert events.decode_event(events.encode_route(7, 4), "serial") == events.RouteRequest(7, 4)


def test_events_stall_decodes_to_what_was_sent_made_printable():
    frame = events.encode_stall("disk full\n" + "x" * 500)
    assert events.decode_event(frame, "virtio-blk") == events.Stall(
        "disk full?" + "x" * (events.MAX_REPORT_TEXT - 10)
    )


def test_events_stall_is_checked_as_one_line_of_printable_text():
    with pytest.raises(ProtocolError, match="not one line of printable text"):
        events.decode_event(control.encode({"op": "stall", "seq": 0, "message": "a\nb"}), "x")


def test_events_msi_decodes_to_what_was_sent():
    frame = events.encode_msi(3, 1, 0xFEE0_1000, 0x4041)
    assert events.decode_event(frame, "serial") == events.MsiRequest(3, 1, 0xFEE0_1000, 0x4041)


def test_events_input_room_decodes_to_what_was_sent():
    frame = events.encode_input_room(4096, 1024)
    assert events.decode_event(frame, "serial") == events.InputRoom(4096, 1024)


def test_events_report_text_is_made_printable_and_short_by_its_sender():
    event = events.decode_event(events.encode_report("\x1b[2J" + "x" * 500), "serial")

    assert event == events.Report("?[2J" + "x" * (events.MAX_REPORT_TEXT - 4))


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        ({"op": "publish", "seq": 0, **STATE, "model": "rtc"}, "state is for model 'rtc'"),
        ({"op": "publish", "seq": 3, **STATE}, "control publish: seq: 3 is outside 0..0"),
        ({"op": "report", "seq": 0, "message": "a\nb"}, "is not one line of printable text"),
        ({"op": "report", "seq": 0, "message": "x" * 201}, "expected at most 200 characters"),
        ({"op": "report", "seq": 0, "message": "m", "extra": 1}, "unknown key 'extra'"),
        ({"op": "route", "seq": 0, "id": 1, "gsi": 4096}, "gsi: 4096 is outside 0..4095"),
        ({"op": "route", "seq": 0, "id": -1, "gsi": 4}, "id: -1 is outside 0..2**31-1"),
        ({"op": "route", "seq": 0, "id": True, "gsi": 4}, "expected an integer, got a boolean"),
        ({"op": "route", "seq": 0, "id": 1}, "missing key 'gsi'"),
        (
            {"op": "msi", "seq": 0, "id": 1, "vector": 2048, "address": 0, "data": 0},
            "vector: 2048 is outside 0..2047",
        ),
        (
            {"op": "msi", "seq": 0, "id": 1, "vector": 0, "address": -1, "data": 0},
            "address: -1 is outside 0..2**64-1",
        ),
        (
            {"op": "msi", "seq": 0, "id": 1, "vector": 0, "address": 0, "data": 1 << 32},
            "data: 4294967296 is outside 0..2**32-1",
        ),
        ({"op": "msi", "seq": 0, "id": 1, "vector": 0, "address": 0}, "missing key 'data'"),
        (
            {"op": "input_room", "seq": 0, "received": 0, "room": (1 << 20) + 1},
            "room: 1048577 is outside 0..1048576",
        ),
        ({"op": "input_room", "seq": 0, "received": -1, "room": 8}, "received: -1 is outside"),
        ({"op": "input_room", "seq": 0, "room": 8}, "missing key 'received'"),
        ({"op": "exec", "seq": 0}, "unknown op 'exec'"),
        ({"op": "state", "seq": 0, **STATE}, "'state' is not an event a device may send"),
    ],
)
def test_events_hostile_event_refused_with_a_reason(msg, error):
    with pytest.raises(ProtocolError, match=re.escape(error)):
        events.decode_event(control.encode(msg), "serial")


def test_events_replies_and_access_frames_are_not_events():
    assert not events.is_event(control.encode({"op": "state", "seq": 1, **STATE}))
    assert not events.is_event(b"\x01" * 24)  # a binary access reply
    assert events.is_event(events.encode_route(1, 4))


class Tally(DeviceState, frozen=True, kw_only=True):
    count: int = 0


def tally_document(count: int) -> dict[str, object]:
    return {"model": "tally", "version": 1, "fields": {"count": count}}


def test_device_events_queue_until_connected_then_go_in_order():
    sent: list[bytes] = []
    queue = DeviceEvents()
    queue.report("one")
    queue.publish_state("tally", Tally(count=1))

    queue.connect(lambda frame: sent.append(frame) is None)

    assert [events.decode_event(f, "tally") for f in sent] == [
        events.Published(tally_document(1)),
        events.Report("one"),
    ]


def test_device_events_newer_state_supersedes_one_the_channel_could_not_take():
    sent: list[bytes] = []
    accept = False
    queue = DeviceEvents()
    queue.connect(lambda frame: accept and sent.append(frame) is None)
    queue.publish_state("tally", Tally(count=1))
    queue.publish_state("tally", Tally(count=2))

    accept = True
    queue.flush()

    assert [events.decode_event(f, "tally") for f in sent] == [events.Published(tally_document(2))]


def test_device_events_newer_input_room_supersedes_one_the_channel_could_not_take():
    sent: list[bytes] = []
    accept = False
    queue = DeviceEvents()
    queue.connect(lambda frame: accept and sent.append(frame) is None)
    queue.publish_room(events.encode_input_room(0, 4096))
    queue.publish_room(events.encode_input_room(8, 4088))

    accept = True
    queue.flush()

    assert [events.decode_event(f, "serial") for f in sent] == [events.InputRoom(8, 4088)]


def test_device_events_reports_past_the_cap_are_dropped_and_counted():
    queue = DeviceEvents()
    for i in range(DeviceEvents.MAX_PENDING + 3):
        queue.report(f"r{i}")

    assert queue.dropped == 3


def test_device_events_newer_route_request_of_a_vector_supersedes_one_not_sent():
    """A guest rewriting an unmasked MSI-X entry in a loop while the monitor reads nothing:
    past MAX_PENDING the newest request was dropped, the one the model waits for (its older
    ones' answers it ignores), and the vector stayed unrouted for good."""
    sent: list[bytes] = []
    accept = False
    queue = DeviceEvents()
    queue.connect(lambda frame: accept and sent.append(frame) is None)
    for i in range(DeviceEvents.MAX_PENDING + 3):
        queue.request_msi(0, 0xFEE0_0000, i)
    newest = queue.request_msi(1, 0xFEE0_0000, 0x99)
    last = queue.request_msi(0, 0xFEE0_0000, 0x41)

    accept = True
    queue.flush()

    assert queue.dropped == 0
    assert [events.decode_event(f, "virtio-rng") for f in sent] == [
        events.MsiRequest(last, 0, 0xFEE0_0000, 0x41),
        events.MsiRequest(newest, 1, 0xFEE0_0000, 0x99),
    ]


def test_device_events_route_ids_wrap_within_what_the_monitor_takes():
    """A guest rewriting an MSI-X entry 2**31 times took the ids past MAX_ROUTE_ID, and the
    monitor refused the request as a bad event: the device failed (the VM stopped, under
    on_crash = "stop")."""
    sent: list[bytes] = []
    queue = DeviceEvents()
    queue.connect(lambda frame: sent.append(frame) is None)
    queue._next_route = control.MAX_ROUTE_ID - 1
    ids = [queue.request_msi(0, 0xFEE0_0000, 0x41) for _ in range(3)]
    decoded = [events.event_in(frame, "virtio-rng") for frame in sent]
    assert ids == [control.MAX_ROUTE_ID, 1, 2]
    assert [e.id for e in decoded if isinstance(e, events.MsiRequest)] == ids


def test_device_events_route_answer_goes_to_the_model():
    queue, answers = DeviceEvents(), []
    queue.on_route_done = lambda *answer: answers.append(answer)
    route = queue.request_msi(0, 0xFEE0_0000, 0x41)

    queue.route_done(*events.decode_route_done({"id": route, "ok": False, "reason": "no"}))

    assert answers == [(route, False, "no")]


def test_device_events_keep_nothing_of_answered_routes():
    """Every answer was kept by id, read by nobody: a guest rewriting an MSI-X entry in a
    loop (a request and an answer each) grew its device by ~137 bytes a write, until
    RLIMIT_AS ended it."""
    queue = DeviceEvents()
    queue.on_route_done = lambda *answer: None

    def rewrites(n: int) -> None:
        for i in range(n):
            route = queue.request_msi(0, 0xFEE0_0000, i)
            queue.route_done(route, True, "")

    rewrites(100)  # the pending-frame cap reached, interned what is
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    rewrites(5000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
    assert grown < 16 << 10


# -- a state the monitor has already goes as a CHECKPOINT frame (DeviceEvents.publish_state)
class Channel:
    """The channel's side of DeviceEvents.connect: takes frames while `accept` is set."""

    def __init__(self, queue: DeviceEvents) -> None:
        self.sent: list[bytes] = []
        self.accept = True
        queue.connect(lambda frame: self.accept and self.sent.append(frame) is None)

    def decoded(self) -> list[object]:
        return [
            wire.decode_checkpoint(f) if wire.is_checkpoint(f) else events.decode_event(f, "tally")
            for f in self.sent
        ]


def progressing(*points: tuple[int, int]) -> DeviceEvents:
    """A queue whose progress (frames applied, bytes emitted) is each of `points` in turn."""
    queue = DeviceEvents()
    queue.progress = iter(points).__next__
    return queue


def test_device_events_state_the_monitor_has_goes_as_a_checkpoint():
    queue = progressing((32, 5), (64, 9))
    channel = Channel(queue)

    queue.publish_state("tally", Tally(count=1))
    queue.publish_state("tally", Tally(count=1))

    assert channel.decoded() == [events.Published(tally_document(1), 32, 5), (64, 9)]


def test_device_events_changed_state_goes_as_a_document():
    queue = progressing((32, 5), (64, 9))
    channel = Channel(queue)

    queue.publish_state("tally", Tally(count=1))
    queue.publish_state("tally", Tally(count=2))

    assert channel.decoded() == [
        events.Published(tally_document(1), 32, 5),
        events.Published(tally_document(2), 64, 9),
    ]


def test_device_events_state_of_an_unsent_document_goes_as_a_document_again():
    queue = progressing((32, 5), (64, 9), (96, 12))
    channel = Channel(queue)
    channel.accept = False
    queue.publish_state("tally", Tally(count=1))  # the channel cannot take it yet

    queue.publish_state("tally", Tally(count=1))  # the monitor has no state to hold
    channel.accept = True
    queue.flush()
    queue.publish_state("tally", Tally(count=1))  # now it has

    assert channel.decoded() == [events.Published(tally_document(1), 64, 9), (96, 12)]


def test_device_events_newer_checkpoint_supersedes_one_not_sent():
    queue = progressing((32, 5), (64, 9), (96, 12))
    channel = Channel(queue)
    queue.publish_state("tally", Tally(count=1))
    channel.accept = False

    queue.publish_state("tally", Tally(count=1))
    queue.publish_state("tally", Tally(count=1))
    channel.accept = True
    queue.flush()

    assert channel.decoded() == [events.Published(tally_document(1), 32, 5), (96, 12)]


def test_device_events_state_back_to_the_last_sent_supersedes_an_unsent_document():
    queue = progressing((32, 5), (64, 9), (96, 12), (128, 15))
    channel = Channel(queue)
    queue.publish_state("tally", Tally(count=1))
    channel.accept = False

    queue.publish_state("tally", Tally(count=2))  # never sent: the monitor's last stays 1
    queue.publish_state("tally", Tally(count=1))
    channel.accept = True
    queue.flush()
    queue.publish_state("tally", Tally(count=2))  # the monitor has never had it

    assert channel.decoded() == [
        events.Published(tally_document(1), 32, 5),
        (96, 12),
        events.Published(tally_document(2), 128, 15),
    ]


def test_device_events_state_without_progress_goes_as_a_document():
    queue = DeviceEvents()  # no runtime counts its frames: no checkpoint to make
    channel = Channel(queue)

    queue.publish_state("tally", Tally(count=1))
    queue.publish_state("tally", Tally(count=1))

    assert channel.decoded() == [events.Published(tally_document(1))] * 2


# -- how often the runtime takes a checkpoint (devprocs/runtime.py Checkpoints) ----------------
def checkpoints_after(frames: int, out: BoundedOutput) -> list[int]:
    """The `applied` of each checkpoint a serial device on `out` publishes over `frames`."""
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=out))
    checkpoints = Checkpoints(uart)
    sent: list[bytes] = []
    uart.ctx.events.connect(lambda frame: sent.append(frame) is None)
    for _ in range(frames):
        checkpoints.applied_one()
    return [
        wire.decode_checkpoint(f)[0]
        if wire.is_checkpoint(f)
        else events.decode_event(f, "serial").applied
        for f in sent
    ]


def test_checkpoints_for_an_output_nobody_counts_come_every_publish_every():
    applied = checkpoints_after(3 * PUBLISH_EVERY, BoundedOutput(FakeLine()))

    assert applied == [PUBLISH_EVERY, 2 * PUBLISH_EVERY, 3 * PUBLISH_EVERY]


def test_checkpoints_for_a_counted_output_come_every_publish_every_counted():
    applied = checkpoints_after(2 * PUBLISH_EVERY_COUNTED, BoundedOutput())  # no line

    assert applied == [PUBLISH_EVERY_COUNTED, 2 * PUBLISH_EVERY_COUNTED]


def test_device_events_stall_is_never_dropped_behind_a_full_queue():
    """The VM must pause for a stall, or the guest's request waits for ever: reports may
    be dropped past the cap, a stall never is."""
    sent: list[bytes] = []
    queue = DeviceEvents()
    for i in range(DeviceEvents.MAX_PENDING + 3):
        queue.report(f"r{i}")
    queue.stall("full")
    queue.connect(lambda frame: sent.append(frame) is None)

    assert events.Stall("full") in [events.decode_event(f, "virtio-blk") for f in sent]


def _nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("kind", ["publish", "save reply"])
def test_a_state_whose_fields_no_spawn_spec_could_hold_is_refused_at_the_channel(kind):
    """A spec holds the document two levels down: fields the channel took one level deeper
    than a spec allows made a snapshot the monitor wrote as sound, and no process could be
    started from it (the launcher said only "the request holds no device spec")."""

    def frame(levels: int) -> bytes:
        doc = {"model": "serial", "version": 2, "fields": _nested(levels)}
        if kind == "publish":
            return events.encode_publish(doc)
        return control.encode({"op": "state", "seq": 1, **doc})

    deepest = control.decode(frame(MAX_FIELDS_DEPTH))
    doc = {key: deepest[key] for key in ("model", "version", "fields")}
    spec = DeviceSpec("serial0", "serial", "ipc:///x", state=doc)
    assert _decode_spec(spec.to_json().encode()).state is not None  # a spec holds it
    with pytest.raises(ProtocolError, match=f"fields nest deeper than {MAX_FIELDS_DEPTH} levels"):
        control.decode(frame(MAX_FIELDS_DEPTH + 1))
