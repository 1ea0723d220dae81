"""Events: the frames a device may send without being asked, and what the monitor answers.

A channel is request/reply from the monitor's side; a device may also speak first:

    publish  its current state document ({model, version, fields}, as a save returns),
             so that the state a restart starts from is current, not the last snapshot's;
    report   an error it wants the operator to see, and carries on (one line of text);
    route    asks for an interrupt route (id, gsi); the monitor checks it against what
             the device's descriptor allows and answers with route_done (id, ok, reason).

Each is a control frame (control.py: one tag byte, then JSON). Nothing in one is trusted:
decode_event() checks its op, its keys and every value before the monitor acts on it, a
device gets at most MAX_EVENTS_PER_REQUEST of them in before each reply, and anything else
unasked is a broken channel, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitvmm.errors import ProtocolError
from splitvmm.protocol import control

EVENT_OPS = ("publish", "report", "route")
# Events a device may send around one request of the monitor's; ZeroMQ's RCVHWM already
# bounds what waits unread, this bounds the work one vCPU's access can be made to do.
MAX_EVENTS_PER_REQUEST = 16
MAX_REPORT_TEXT = control.MAX_ERROR_TEXT
MAX_ROUTE_ID = (1 << 31) - 1
MAX_GSI = 4095  # KVM's IRQ routing table (KVM_CAP_IRQ_ROUTING) has at most 4096 entries


@dataclass(frozen=True, slots=True)
class Published:
    state: dict[str, Any]  # {model, version, fields}: the fields stay opaque to the monitor


@dataclass(frozen=True, slots=True)
class Report:
    message: str  # printable, at most MAX_REPORT_TEXT characters


@dataclass(frozen=True, slots=True)
class RouteRequest:
    id: int
    gsi: int


Event = Published | Report | RouteRequest


# -- device side ------------------------------------------------------------------------------
def encode_publish(state_document: dict[str, Any]) -> bytes:
    return control.encode({"op": "publish", "seq": 0, **state_document})


def encode_report(message: str) -> bytes:
    text = "".join(c if c.isprintable() else "?" for c in message)[:MAX_REPORT_TEXT]
    return control.encode({"op": "report", "seq": 0, "message": text})


def encode_route(route_id: int, gsi: int) -> bytes:
    return control.encode({"op": "route", "seq": 0, "id": route_id, "gsi": gsi})


def decode_route_done(msg: dict[str, Any]) -> tuple[int, bool, str]:
    """(id, ok, reason) of the monitor's answer (the monitor is trusted; shape-checked)."""
    route_id, ok, reason = msg.get("id"), msg.get("ok"), msg.get("reason", "")
    if type(route_id) is not int or type(ok) is not bool or not isinstance(reason, str):
        raise ProtocolError("route_done is not {id, ok, reason}")
    return route_id, ok, reason


# -- monitor side -------------------------------------------------------------------------------
def is_event(buf: bytes) -> bool:
    """Whether a frame claims to be an event (decode_event checks that it is one)."""
    if not control.is_control(buf):
        return False
    try:
        return control.decode(buf)["op"] in EVENT_OPS
    except ProtocolError:
        return False


def decode_event(buf: bytes, model: str) -> Event:
    """The event a device of `model` sent, every field checked; ProtocolError otherwise."""
    msg = control.decode(buf)
    op = msg["op"]
    if msg["seq"] != 0:
        raise ProtocolError(f"{op} event with seq {msg['seq']}, not 0")
    if op == "publish":
        return Published(control.check_state(msg, model))
    if op == "report":
        _keys(msg, {"message"})
        text = msg.get("message")
        if not isinstance(text, str) or len(text) > MAX_REPORT_TEXT or not text.isprintable():
            raise ProtocolError(f"report is not one printable line of <= {MAX_REPORT_TEXT}")
        return Report(text)
    if op == "route":
        _keys(msg, {"id", "gsi"})
        route_id, gsi = msg.get("id"), msg.get("gsi")
        if not _int_in(route_id, 0, MAX_ROUTE_ID) or not _int_in(gsi, 0, MAX_GSI):
            raise ProtocolError(f"route request id {route_id!r} gsi {gsi!r} out of range")
        return RouteRequest(route_id, gsi)
    raise ProtocolError(f"unknown event {op!r}")


def encode_route_done(route_id: int, ok: bool, reason: str = "") -> bytes:
    return control.encode(
        {"op": "route_done", "seq": 0, "id": route_id, "ok": ok, "reason": reason}
    )


def _keys(msg: dict[str, Any], allowed: set[str]) -> None:
    extra = set(msg) - {"op", "seq"} - allowed
    if extra:
        raise ProtocolError(f"{msg['op']} event has unknown keys {sorted(extra)}")


def _int_in(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high
