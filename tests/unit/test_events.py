"""Events a device sends unasked (protocol/events.py) and its queue of them (DeviceEvents)."""

from __future__ import annotations

import re

import pytest

from splitvmm.devprocs.base import DeviceEvents
from splitvmm.errors import ProtocolError
from splitvmm.protocol import control, events

STATE = {"model": "serial", "version": 2, "fields": {"ier": 1}}


def test_events_each_kind_decodes_to_what_was_sent():
    assert events.decode_event(events.encode_publish(STATE), "serial") == events.Published(STATE)
    assert events.decode_event(events.encode_report("low on disk"), "serial") == events.Report(
        "low on disk"
    )
    assert events.decode_event(events.encode_route(7, 4), "serial") == events.RouteRequest(7, 4)


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


def test_device_events_queue_until_connected_then_go_in_order():
    sent: list[bytes] = []
    queue = DeviceEvents()
    queue.report("one")
    queue.publish(STATE)

    queue.connect(lambda frame: sent.append(frame) is None)

    assert [events.decode_event(f, "serial") for f in sent] == [
        events.Published(STATE),
        events.Report("one"),
    ]


def test_device_events_newer_state_supersedes_one_the_channel_could_not_take():
    sent: list[bytes] = []
    accept = False
    queue = DeviceEvents()
    queue.connect(lambda frame: accept and sent.append(frame) is None)
    queue.publish({**STATE, "version": 1})
    queue.publish(STATE)

    accept = True
    queue.flush()

    assert [events.decode_event(f, "serial") for f in sent] == [events.Published(STATE)]


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


def test_device_events_route_answer_is_kept_by_id():
    queue = DeviceEvents()
    route = queue.request_route(8)

    queue.route_done(*events.decode_route_done({"id": route, "ok": False, "reason": "no"}))

    assert queue.routes == {route: (False, "no")}
