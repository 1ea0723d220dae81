"""Events: the frames a device may send without being asked, and what the monitor answers.

A channel is request/reply from the monitor's side; a device may also speak first:

    publish  its current state document ({model, version, fields}, as a save returns),
             so that the state a restart starts from is current, not the last snapshot's;
             with the frames it had applied and the output bytes it had emitted then (a
             checkpoint: monitor/slot.py replays the frames after it);
    report   an error it wants the operator to see, and carries on (one line of text);
    stall    it holds a request it cannot serve until the host has room again (one line
             of text: why): its model's descriptor lets it ask, and the operator's config
             chose so (ModelDescriptor.pause_option). The monitor pauses the VM; its next
             resume asks the device to "retry" (control.py), and it tries the request again;
    route    asks for an interrupt route (id, gsi); the monitor checks it against what
             the device's descriptor allows and answers with route_done (id, ok, reason);
    msi      asks that an MSI-X vector send a message (id, vector, address, data): what the
             guest wrote in the vector's table entry. The monitor checks it (a vector the
             descriptor has, an x86 MSI address, a 16-bit data word), points the vector's
             GSI at it and answers with route_done (id, ok, reason);
    input_room
             a console device's room for host input (received, room): it had room for
             `room` more bytes once it had received `received` bytes of input. The monitor
             sends a console device no more input than that room (monitor/slot.py
             input()), so input waits on the host side, never overflows the device.

A publish whose state the monitor has already (the device's last one) may instead be a
CHECKPOINT frame (wire.py): the frames applied and the bytes emitted, and nothing else. The
monitor's end of the channel turns it into the same Published event, with the state that
process published last; a CHECKPOINT before any publish breaks the channel.

Each other event is a control frame whose record (control.py: PublishEvent, ReportEvent,
StallEvent, RouteEvent, MsiEvent, InputRoomEvent, RouteDone) the schema codec checks, key by key, before the monitor
acts on it. A device gets at most MAX_EVENTS_PER_REQUEST of them in around each request of
the monitor's, and anything else unasked is a broken channel, as before.
"""

from __future__ import annotations

from typing import Any

from splitvmm.errors import ProtocolError, shown
from splitvmm.protocol import control
from splitvmm.record import Struct

EVENT_OPS = ("publish", "report", "stall", "route", "msi", "input_room")
# Events a device may send around one request of the monitor's; the socket's buffer already
# bounds what waits unread, this bounds the work one vCPU's access can be made to do (each
# event is checked: ~20 us). A healthy device may send many: the serial device publishes a
# checkpoint at least every 32 frames it applies, and a read can wait behind ~1000 posted
# writes (the channel's socket buffer): ~34 publishes, and those already waiting unread count too (a
# drain takes at most the channel's MAX_DRAINED, 64). Found by a snapshot under forwarded
# reads.
MAX_EVENTS_PER_REQUEST = 256

# Frames between two checkpoints: what the monitor keeps to re-send after a crash, what a new
# process re-applies (~10-20 us a frame here) and, for an output line the monitor cannot
# count (a pipe, socket or terminal), how far back a restart may send bytes twice. Each
# checkpoint is a message of its own, and its wake-ups (measured when both sides' ZeroMQ I/O
# threads woke for it, on a core a vCPU shares) cost a polled serial byte ~7% at 32 frames
# (bench/serial.py).
# The device's runtime takes them (devprocs/runtime.py Checkpoints); the monitor's slot
# keeps to them (monitor/slot.py MAX_AHEAD).
PUBLISH_EVERY = 32
# ... where the monitor counts what the line took (devprocs/output.py BoundedOutput.counted):
# no byte comes out twice whatever the distance, which bounds only the replay (~3-5 ms at
# 256 frames).
PUBLISH_EVERY_COUNTED = 256
MAX_REPORT_TEXT = control.MAX_ERROR_TEXT


class Published(Struct, frozen=True):
    state: dict[str, Any]  # {model, version, fields}: the fields stay opaque to the monitor
    applied: int | None = None  # frames applied when the state was taken (None: not said)
    emitted: int | None = None  # output bytes its line had taken by then


class Report(Struct, frozen=True):
    message: str  # printable, at most MAX_REPORT_TEXT characters


class Stall(Struct, frozen=True):
    message: str  # printable, at most MAX_REPORT_TEXT characters: what ran out, where


class RouteRequest(Struct, frozen=True):
    id: int
    gsi: int


class MsiRequest(Struct, frozen=True):
    id: int
    vector: int
    address: int
    data: int


class InputRoom(Struct, frozen=True):
    received: int  # host input bytes this process had received
    room: int  # and the bytes it had room for then

    def left(self, sent: int) -> int:
        """The room left once `sent` bytes were sent to the process: the monitor's room
        (monitor/slot.py input()), and the device's idea of it (devprocs/runtime.py)."""
        return self.room - (sent - self.received)


Event = Published | Report | Stall | RouteRequest | MsiRequest | InputRoom


# -- device side ------------------------------------------------------------------------------
def encode_publish(
    state_document: dict[str, Any], progress: tuple[int, int] | None = None
) -> bytes:
    """`progress`: (frames applied, output bytes emitted) when the state was taken."""
    extra = {} if progress is None else {"applied": progress[0], "emitted": progress[1]}
    return control.encode({"op": "publish", "seq": 0, **state_document, **extra})


def encode_report(message: str) -> bytes:
    return control.encode({"op": "report", "seq": 0, "message": _printable(message)})


def _printable(message: str) -> str:
    """One line a report or stall may carry (control.PRINTABLE_LINE, MAX_REPORT_TEXT)."""
    return "".join(c if c.isprintable() else "?" for c in message)[:MAX_REPORT_TEXT]


def encode_stall(message: str) -> bytes:
    return control.encode({"op": "stall", "seq": 0, "message": _printable(message)})


def encode_route(route_id: int, gsi: int) -> bytes:
    return control.encode({"op": "route", "seq": 0, "id": route_id, "gsi": gsi})


def encode_msi(route_id: int, vector: int, address: int, data: int) -> bytes:
    """Ask for MSI-X `vector`'s route to the message (address, data) (control.MsiEvent)."""
    msg = {"op": "msi", "seq": 0, "id": route_id, "vector": vector, "address": address}
    return control.encode({**msg, "data": data})


def encode_input_room(received: int, room: int) -> bytes:
    """A console device's room for host input (control.InputRoomEvent)."""
    return control.encode({"op": "input_room", "seq": 0, "received": received, "room": room})


def decode_route_done(msg: dict[str, Any]) -> tuple[int, bool, str]:
    """(id, ok, reason) of the monitor's answer, a message control.decode() checked."""
    return msg["id"], msg["ok"], msg["reason"]


# -- monitor side -------------------------------------------------------------------------------
def is_event(buf: bytes) -> bool:
    """Whether a frame claims to be an event (decode_event checks that it is one). Access
    replies are binary and never start with the control tag: this costs them one compare."""
    if not control.is_control(buf):
        return False
    try:
        return control.decode(buf)["op"] in EVENT_OPS
    except ProtocolError:
        return True  # a broken control frame: decode_event says what is wrong with it


def decode_event(buf: bytes, model: str) -> Event:
    """The event a device of `model` sent, every field checked; ProtocolError otherwise."""
    event = event_in(buf, model)
    if event is None:
        op = control.decode(buf)["op"]
        raise ProtocolError(f"{op!r} is not an event a device may send unasked")
    return event


def event_in(buf: bytes, model: str) -> Event | None:
    """The event in a frame a device of `model` sent, every field checked, decoding the frame
    once; None if the frame is no event (an access reply, or a control reply the caller
    checks against its request); ProtocolError for a broken control frame."""
    if not control.is_control(buf):
        return None
    msg = control.decode(buf)
    op = msg["op"]
    if op not in EVENT_OPS:
        return None
    if op == "publish":
        if msg["model"] != model:
            raise ProtocolError(f"state is for model {shown(msg['model'])}, expected {model!r}")
        state = {"model": model, "version": msg["version"], "fields": msg["fields"]}
        return Published(state, msg.get("applied"), msg.get("emitted"))
    if op == "report":
        return Report(msg["message"])
    if op == "stall":
        return Stall(msg["message"])
    if op == "msi":
        return MsiRequest(msg["id"], msg["vector"], msg["address"], msg["data"])
    if op == "input_room":
        return InputRoom(msg["received"], msg["room"])
    return RouteRequest(msg["id"], msg["gsi"])


def encode_route_done(route_id: int, ok: bool, reason: str = "") -> bytes:
    text = reason[:MAX_REPORT_TEXT]
    return control.encode({"op": "route_done", "seq": 0, "id": route_id, "ok": ok, "reason": text})
