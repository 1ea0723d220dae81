"""A rogue device process (test-only): speaks the channel, then misbehaves on purpose.

    python -m tests.rogue_device BEHAVIOUR [DELAY_MS] < SPEC_JSON

It connects like a real device, says READY (unless the behaviour is about
READY), then answers reads the way BEHAVIOUR says. The slow behaviours answer
correctly, but only after DELAY_MS (by default three quarters of the monitor's
deadline for that request, so no single reply misses it).
"""

from __future__ import annotations

import json
import socket
import sys
import time

import zmq

from splitvmm.monitor.channel import CONTROL_TIMEOUT_MS, READ_TIMEOUT_MS
from splitvmm.protocol import control, events, wire, zmtp
from splitvmm.protocol.models import MODELS

BEHAVIOURS = (
    "garbage",  # replies with random bytes
    "oversized",  # replies with a 2 MiB frame
    "wrong-seq",  # replies with another sequence number
    "unsolicited",  # sends replies nobody asked for, right after READY
    "silent",  # never answers a read
    "hang-up",  # closes its end of the channel at the first read, and lives on
    "bad-ready",  # garbage instead of READY
    "event-ready",  # an event (a publish) instead of READY
    "wide-reply",  # replies with more data than was asked for
    "slow",  # answers every read and sync correctly, DELAY_MS late
    "slow-control",  # answers every control request correctly, DELAY_MS late; reads at once
    "slow-drain",  # ZMTP by hand: READY, then every DELAY_MS reads what waits; answers nothing
    # -- events (protocol/events.py): frames a device may send unasked, checked by the monitor
    "publish",  # publishes its state (fields: the read's seq) before each read reply
    "report",  # reports an error with bidi and invisible characters, then answers the read
    "route",  # asks for routes to GSI 4 (its own) and 9; the read returns what it was told
    "event-flood",  # publishes MAX_EVENTS_PER_REQUEST + 1 times before a read reply
    "bad-event",  # publishes a state for another model before its read reply
    "bad-version",  # publishes a state of a version its model does not save, then replies
    "huge-event",  # publishes a state of 96 KiB (under MAX_CONTROL) before its read reply
    "endless-events",  # from READY on, publishes slow-to-check states without end
    "ping-flood",  # sends 200 slow-to-check states before each pong (heartbeat)
    "slow-ping",  # answers each ping correctly, DELAY_MS late
    "mirror-flood",  # publishes a register mirror, then slow-to-check states without end
    # -- CHECKPOINT frames (wire.py), each sent before its read reply
    "checkpoint",  # publishes states at reads 1 and 2, then says the last holds (applied)
    "checkpoint-first",  # says its state holds without having published one
    "bad-checkpoint",  # publishes its state, then a CHECKPOINT with a flag set
    "checkpoint-backwards",  # a checkpoint with output bytes, then one with fewer (none)
    # -- register mirrors (monitor/mirror.py), each sent before its read reply
    "mirror-undeclared",  # a value for a register past the six the serial model mirrors
    "mirror-oversized",  # data past the six bytes the serial model's registers take
    "mirror-credit-outside",  # a credit for writes at an offset outside the window
)
# The MIRROR frames of the mirror behaviours: mask, credit offset, data.
ROGUE_MIRRORS = {
    "mirror-undeclared": (0b1000000, 0, b"\x00" * 6 + b"\x01\x00"),
    "mirror-oversized": (0b111111, 0, b"\x60" * 8),
    "mirror-credit-outside": (0b111111, 8, b"\x60" * 6 + b"\x00\x00"),
}
SLOW_DATA = 0x5A  # what a slow device's reads return


# The version of the state it poses as (a serial device's: the monitor takes no other).
VERSION = MODELS["serial"].state_version
# A state under MAX_DEVICE_FRAME that takes the monitor ~20-30 ms to check (nested JSON).
SLOW_STATE = {"model": "serial", "version": VERSION, "fields": {"pad": [{}] * 15000}}
# A serial mirror with every register valid: LSR (offset 5) reads 0x60, THR empty.
VALID_MIRROR = (0b111111, 0, b"\x60" * 6 + b"\x00\x00")


def answer_control(sock: zmq.Socket, buf: bytes, delay_s: float | None) -> None:
    """A real device's reply to quiesce, save or resume, after delay_s; none if None."""
    if delay_s is None:
        return
    msg = control.decode(buf)
    time.sleep(delay_s)
    reply = {"op": control.REPLY_TO[msg["op"]], "seq": msg["seq"]}
    if msg["op"] == "save":
        reply.update(model="serial", version=VERSION, fields={})
    if msg["op"] == "stats":
        reply.update(counters={"late": 1})
    sock.send(control.encode(reply))


def answer_slowly(sock: zmq.Socket, buf: bytes, delay_s: float) -> None:
    op, size, _, seq, _, _ = wire.FRAME.unpack(buf)
    time.sleep(delay_s)
    if op == wire.Op.READ:
        sock.send(wire.encode_read_done(seq, bytes([SLOW_DATA]) * size))
    elif op == wire.Op.SYNC:
        sock.send(wire.encode_sync_done(seq))


EVENT_BEHAVIOURS = (
    "publish",
    "report",
    "route",
    "event-flood",
    "bad-event",
    "bad-version",
    "huge-event",
    "checkpoint",
    "checkpoint-first",
    "bad-checkpoint",
    "checkpoint-backwards",
)
CHECKPOINT_EMITTED = 7  # the output bytes the "checkpoint" behaviour says its line took


def answer_with_events(
    sock: zmq.Socket, buf: bytes, behaviour: str, routes: dict[int, bool]
) -> None:
    """Events first, then the reply to a read (or sync) -- as a real device may order them."""
    op, size, _, seq, _, _ = wire.FRAME.unpack(buf)
    state = {"model": "serial", "version": VERSION, "fields": {"seq": seq}}
    if behaviour == "publish":
        sock.send(events.encode_publish(state))
    elif behaviour == "report":
        message = "disk on fire \u202egol.exe\u202c\u2028\u200b"  # bidi, separator, invisible
        sock.send(control.encode({"op": "report", "seq": 0, "message": message}))
    elif behaviour == "event-flood":
        for _ in range(events.MAX_EVENTS_PER_REQUEST + 1):
            sock.send(events.encode_publish(state))
    elif behaviour == "bad-event":
        sock.send(events.encode_publish({**state, "model": "rtc"}))
    elif behaviour == "bad-version":
        sock.send(events.encode_publish({**state, "version": VERSION + 1}))
    elif behaviour == "huge-event":
        sock.send(events.encode_publish({**state, "fields": {"pad": "x" * (96 << 10)}}))
    elif behaviour == "checkpoint" and seq <= 2:
        sock.send(events.encode_publish(state))
    elif behaviour in ("checkpoint", "checkpoint-first"):
        sock.send(wire.encode_checkpoint(seq - 1, CHECKPOINT_EMITTED))
    elif behaviour == "checkpoint-backwards" and seq == 1:
        sock.send(events.encode_publish(state, (0, CHECKPOINT_EMITTED)))
    elif behaviour == "checkpoint-backwards":  # its line took fewer bytes than it said
        sock.send(wire.encode_checkpoint(seq - 1, 0))
    elif behaviour == "bad-checkpoint":
        sock.send(events.encode_publish(state))
        sock.send(wire.FRAME.pack(wire.Op.CHECKPOINT, 0, 1, 0, seq, bytes(8)))
    if op == wire.Op.READ:
        told = bytes([int(routes.get(1, False)) | int(routes.get(2, False)) << 1]) * size
        sock.send(wire.encode_read_done(seq, told if behaviour == "route" else b"\x00" * size))
    elif op == wire.Op.SYNC:
        sock.send(wire.encode_sync_done(seq))


def drain_slowly(endpoint: str, delay_s: float) -> None:
    """slow-drain: its end of the channel spoken by hand (libzmq would read whatever comes
    into a queue of its own at once): READY, then every delay_s whatever waits in its socket
    is read and dropped. The monitor's posted writes fill the socket, and each one after
    that waits for the next read, just under the WRITE_TIMEOUT_MS that would fail it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(endpoint.removeprefix("ipc://"))
    sock.sendall(zmtp.HANDSHAKE + zmtp.encode(wire.encode_ready()))
    sock.setblocking(False)
    while True:
        time.sleep(delay_s)
        try:
            while sock.recv(zmtp.CHUNK):
                pass
        except BlockingIOError:
            pass


def main() -> None:
    behaviour, spec = sys.argv[1], json.loads(sys.stdin.read())
    default_ms = CONTROL_TIMEOUT_MS if behaviour == "slow-control" else READ_TIMEOUT_MS
    delay_s = (int(sys.argv[2]) if len(sys.argv) > 2 else default_ms * 3 // 4) / 1000
    if behaviour == "slow-drain":
        drain_slowly(spec["channel"], delay_s)
    sock = zmq.Context().socket(zmq.PAIR)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)  # as a device's (devprocs/runtime.py _connect)
    sock.connect(spec["channel"])
    if behaviour in ("bad-ready", "event-ready"):
        state = {"model": "serial", "version": VERSION, "fields": {}}
        sock.send(b"\x00" * 24 if behaviour == "bad-ready" else events.encode_publish(state))
        time.sleep(30)
        return
    sock.send(wire.encode_ready())
    if behaviour == "unsolicited":
        for seq in range(100):
            sock.send(wire.encode_read_done(seq, b"\x00"))
    if behaviour == "mirror-flood":
        mask, credit_offset, data = VALID_MIRROR
        sock.send(wire.FRAME.pack(wire.Op.MIRROR, mask, 1, 0, credit_offset, data))
    if behaviour in ("endless-events", "mirror-flood"):
        frame = events.encode_publish(SLOW_STATE)
        while True:  # as fast as the monitor takes them (a PAIR socket blocks at its HWM)
            sock.send(frame)
    routes: dict[int, bool] = {}
    if behaviour == "route":
        sock.send(events.encode_route(1, 4))
        sock.send(events.encode_route(2, 9))
    while True:
        buf = sock.recv()
        if control.is_control(buf):
            msg = control.decode(buf)
            if msg["op"] == "route_done":
                routes[msg["id"]] = msg["ok"]
                continue
            if msg["op"] == "ping" and behaviour == "ping-flood":
                for _ in range(200):
                    sock.send(events.encode_publish(SLOW_STATE))
            if behaviour == "slow-control" or (behaviour == "slow-ping" and msg["op"] == "ping"):
                answer_control(sock, buf, delay_s)
            elif behaviour in ("ping-flood", "slow-ping"):
                answer_control(sock, buf, 0)
            continue
        if behaviour in ROGUE_MIRRORS:
            mask, credit_offset, data = ROGUE_MIRRORS[behaviour]
            sock.send(wire.FRAME.pack(wire.Op.MIRROR, mask, 1, 0, credit_offset, data))
            behaviour = "silent"  # after that, no reply: the monitor must not wait for one
        if behaviour in EVENT_BEHAVIOURS:
            answer_with_events(sock, buf, behaviour, routes)
            continue
        if behaviour == "slow":
            answer_slowly(sock, buf, delay_s)
            continue
        op, size, _, seq, _, _ = wire.FRAME.unpack(buf)
        if op != wire.Op.READ:
            continue
        if behaviour == "hang-up":
            sock.close(linger=0)
            time.sleep(30)
            return
        if behaviour == "garbage":
            sock.send(bytes(range(7, 31)))
        elif behaviour == "oversized":
            sock.send(b"\x03" * (2 << 20))
        elif behaviour == "wrong-seq":
            sock.send(wire.encode_read_done(seq + 1, b"\x00" * size))
        elif behaviour == "wide-reply":
            sock.send(wire.FRAME.pack(wire.Op.READ_DONE, size, 0, seq, 0, b"\x01" * 8))
        elif behaviour == "slow-control":
            sock.send(wire.encode_read_done(seq, bytes(size)))
        elif behaviour in ("silent", "unsolicited"):
            pass


if __name__ == "__main__":
    main()
