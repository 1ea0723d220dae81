"""Control messages on a device channel: quiesce, save, resume, retry, ping, stats,
harvest_dirty, fault, link (JSON, never pickle).

A control frame is one byte CONTROL_TAG then a JSON object; access frames are
fixed-size binary (wire.py) and never start with that byte. Requests carry a
sequence number the reply must echo. Every message is one of the records below, and
decode() checks a frame against its op's record (schema.py) before anyone looks at it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from splitvmm.errors import ProtocolError, shown
from splitvmm.protocol import schema
from splitvmm.protocol.codec import StateDocument, check_fields_depth
from splitvmm.protocol.faults import Fault
from splitvmm.protocol.wire import MAX_COUNT
from splitvmm.record import Struct

CONTROL_TAG = 0x10
MAX_CONTROL = 1 << 20  # Firecracker caps snapshot state loads too: a device can't make us eat RAM
# The largest frame the monitor takes from a device: its biggest is a state document (a save
# reply, a published checkpoint), ~15 KiB for a virtio-console with both buffers full. A
# device sending MAX_CONTROL frames of nested JSON kept the monitor parsing (~0.4 s each).
MAX_DEVICE_FRAME = 64 << 10
# ping: the monitor's heartbeat (monitor/supervisor.py): a device that cannot answer it in
# time is hung, whether or not the guest is touching it. stats: the device's counters.
# retry: the VM resumes after the device's stall (events.py): it tries its request again.
# harvest_dirty: a live snapshot's pass begins (monitor/dirtylog.py): the device moves the marks
# of its dirty bitmap into the bitmap's harvest and clears it, on its own thread, between
# requests, when none of its writes is in flight.
REQUESTS = ("quiesce", "save", "resume", "retry", "ping", "stats", "harvest_dirty")
REPLY_TO = {
    "quiesce": "quiesced",
    "save": "state",
    "resume": "resumed",
    "retry": "retrying",
    "fault": "fault_armed",
    "ping": "pong",
    "stats": "counters",
    "harvest_dirty": "dirty_harvested",
    "link": "link_state",
}
MAX_ERROR_TEXT = 200
# A device's counters (Device.stats()): a few names it chooses, each a count.
MAX_COUNTERS = 32
COUNTER_NAME = schema.Pattern(r"[a-z][a-z0-9_]{0,31}", "a counter name (a-z, 0-9, '_')")

Seq = Annotated[int, schema.U32]


class Request(Struct, frozen=True):
    """Monitor -> device."""

    op: Literal["quiesce", "save", "resume", "retry", "ping", "stats", "harvest_dirty"]
    seq: Seq


class Done(Struct, frozen=True):
    """Device -> monitor: the request is done."""

    op: Literal["quiesced", "resumed", "retrying", "fault_armed", "pong", "dirty_harvested"]
    seq: Seq


class FaultRequest(Fault, frozen=True):
    """Monitor -> device: arm this fault (faults.py) in the running process; it answers
    fault_armed (crash testing: `splitvmm ctl inject-fault`)."""

    op: Literal["fault"]
    seq: Seq


class LinkRequest(Struct, frozen=True):
    """Monitor -> device: take its network link up (true) or down (false), or (null) only say
    how it is (`splitvmm ctl link`; a model with ModelDescriptor.link). The device answers
    with a LinkReply once a checkpoint holding the new state is on its way before it."""

    op: Literal["link"]
    seq: Seq
    up: bool | None


class LinkReply(Struct, frozen=True):
    """Device -> monitor: its link now, and whether the request changed it."""

    op: Literal["link_state"]
    seq: Seq
    up: bool
    changed: bool


class StateReply(StateDocument, frozen=True):
    """Device -> monitor: its saved state, a StateDocument (codec.py) whose fields the monitor
    keeps opaque."""

    op: Literal["state"]
    seq: Seq


class Failed(Struct, frozen=True):
    """Device -> monitor: the request failed, or (seq 0) the device cannot start."""

    op: Literal["error"]
    seq: Seq
    message: str  # the device's words: data, clipped to MAX_ERROR_TEXT when shown


class CountersReply(Struct, frozen=True):
    """Device -> monitor: the answer to stats, its counters by name (Device.stats())."""

    op: Literal["counters"]
    seq: Seq
    counters: Annotated[
        dict[Annotated[str, COUNTER_NAME], Annotated[int, schema.Range(0, MAX_COUNT)]],
        schema.MaxLen(MAX_COUNTERS),
    ]


# -- events: what a device sends unasked, and the monitor's answer (events.py says why) ----------
Unasked = Annotated[int, schema.Range(0, 0)]  # no request to echo: seq is 0
MAX_ROUTE_ID = (1 << 31) - 1
MAX_MSIX_VECTOR = 2047  # an MSI-X table has at most 2048 entries (PCI 3.0 6.8.2.3)
MAX_GSI = 4095  # KVM's IRQ routing table (KVM_CAP_IRQ_ROUTING) has at most 4096 entries
# A console device's host-input buffer (events.py input_room): what it may say it has room
# for. Ours hold 4 KiB; the bound keeps a device from making the monitor send without end.
MAX_INPUT_ROOM = 1 << 20
PRINTABLE_LINE = schema.Pattern(r"[^\x00-\x1f\x7f-\x9f]*", "one line of printable text")


class PublishEvent(StateDocument, frozen=True):
    """Device -> monitor: its current state document; with `applied` (the frames it had
    applied when it took the state: reads, writes, input) and `emitted` (the bytes its output
    line had taken), a checkpoint a restart starts from (monitor/slot.py)."""

    op: Literal["publish"]
    seq: Unasked
    applied: Annotated[int | None, schema.Range(0, MAX_COUNT), schema.OPTIONAL_KEY] = None
    emitted: Annotated[int | None, schema.Range(0, MAX_COUNT), schema.OPTIONAL_KEY] = None


class ReportEvent(Struct, frozen=True):
    """Device -> monitor: an error for the operator; the device carries on."""

    op: Literal["report"]
    seq: Unasked
    message: Annotated[str, schema.MaxLen(MAX_ERROR_TEXT), PRINTABLE_LINE]


class StallEvent(Struct, frozen=True):
    """Device -> monitor: it holds a request it cannot serve until the operator gives the
    host back what ran out (a full file system): pause the VM (events.py stall)."""

    op: Literal["stall"]
    seq: Unasked
    message: Annotated[str, schema.MaxLen(MAX_ERROR_TEXT), PRINTABLE_LINE]


class RouteEvent(Struct, frozen=True):
    """Device -> monitor: asks for an interrupt route."""

    op: Literal["route"]
    seq: Unasked
    id: Annotated[int, schema.Range(0, MAX_ROUTE_ID)]
    gsi: Annotated[int, schema.Range(0, MAX_GSI)]


class MsiEvent(Struct, frozen=True):
    """Device -> monitor: asks that MSI-X vector `vector` send `data` to `address` (what the
    guest wrote in its table entry); the monitor checks it and answers with a RouteDone."""

    op: Literal["msi"]
    seq: Unasked
    id: Annotated[int, schema.Range(0, MAX_ROUTE_ID)]
    vector: Annotated[int, schema.Range(0, MAX_MSIX_VECTOR)]
    address: Annotated[int, schema.U64]
    data: Annotated[int, schema.U32]


class InputRoomEvent(Struct, frozen=True):
    """Device -> monitor: a console device had room for `room` more bytes of host input
    once it had received `received` bytes of it (this process's count): the monitor sends
    no more than that room (monitor/slot.py input())."""

    op: Literal["input_room"]
    seq: Unasked
    received: Annotated[int, schema.Range(0, MAX_COUNT)]
    room: Annotated[int, schema.Range(0, MAX_INPUT_ROOM)]


class RouteDone(Struct, frozen=True):
    """Monitor -> device: the answer to a RouteEvent or MsiEvent of the same id."""

    op: Literal["route_done"]
    seq: Unasked
    id: Annotated[int, schema.Range(0, MAX_ROUTE_ID)]
    ok: bool
    reason: Annotated[str, schema.MaxLen(MAX_ERROR_TEXT)]


MESSAGES: dict[str, type] = {
    **dict.fromkeys(REQUESTS, Request),
    **dict.fromkeys(
        ("quiesced", "resumed", "retrying", "fault_armed", "pong", "dirty_harvested"), Done
    ),
    "fault": FaultRequest,
    "link": LinkRequest,
    "link_state": LinkReply,
    "state": StateReply,
    "counters": CountersReply,
    "error": Failed,
    "publish": PublishEvent,
    "report": ReportEvent,
    "stall": StallEvent,
    "route": RouteEvent,
    "msi": MsiEvent,
    "input_room": InputRoomEvent,
    "route_done": RouteDone,
}


def is_control(buf: bytes) -> bool:
    return bool(buf) and buf[0] == CONTROL_TAG


def encode(msg: dict[str, Any]) -> bytes:
    return bytes([CONTROL_TAG]) + json.dumps(msg, separators=(",", ":")).encode()


def decode(buf: bytes) -> dict[str, Any]:
    """A control frame's message, checked against its op's record, as a plain dict."""
    if not is_control(buf):
        raise ProtocolError("not a control frame")
    if len(buf) > MAX_CONTROL:
        raise ProtocolError(f"control frame of {len(buf)} bytes exceeds {MAX_CONTROL}")
    msg = schema.loads(buf[1:], what="control frame", error=ProtocolError)
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("control frame is not an object with an op")
    record = MESSAGES.get(msg["op"])
    if record is None:
        raise ProtocolError(f"control frame has an unknown op {shown(msg['op'])}")
    schema.decode(record, msg, where=f"control {msg['op']}", error=ProtocolError)
    if issubclass(record, StateDocument):  # a state the monitor may hand a new process
        check_fields_depth(msg["fields"], f"control {msg['op']}", ProtocolError)
    return msg


def check_reply(msg: dict[str, Any], request: str, seq: int, model: str) -> dict[str, Any]:
    """Monitor side: the reply (from decode) to `request` #seq from a device of `model`;
    for a save, its state document {model, version, fields}. Else ProtocolError."""
    if msg["seq"] != seq:
        raise ProtocolError(f"reply seq {msg['seq']} to {request} #{seq}")
    if msg["op"] == "error":
        text = msg["message"][:MAX_ERROR_TEXT]
        raise ProtocolError(f"{request} failed in the device: {text!r}")
    if msg["op"] != REPLY_TO[request]:
        raise ProtocolError(f"reply {msg['op']!r} to {request}")
    if request != "save":
        return msg
    if msg["model"] != model:
        raise ProtocolError(f"state is for model {shown(msg['model'])}, expected {model!r}")
    return {"model": model, "version": msg["version"], "fields": msg["fields"]}
