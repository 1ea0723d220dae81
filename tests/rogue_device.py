"""A rogue device process (test-only): speaks the channel, then misbehaves on purpose.

    python -m tests.rogue_device BEHAVIOUR < SPEC_JSON

It connects like a real device, says READY (unless the behaviour is about
READY), then answers reads the way BEHAVIOUR says.
"""

from __future__ import annotations

import json
import sys
import time

import zmq

from splitvmm.protocol import wire

BEHAVIOURS = (
    "garbage",  # replies with random bytes
    "oversized",  # replies with a 2 MiB frame
    "wrong-seq",  # replies with another sequence number
    "unsolicited",  # sends replies nobody asked for, right after READY
    "silent",  # never answers a read
    "bad-ready",  # garbage instead of READY
    "wide-reply",  # replies with more data than was asked for
)


def main() -> None:
    behaviour, spec = sys.argv[1], json.loads(sys.stdin.read())
    sock = zmq.Context().socket(zmq.PAIR)
    sock.connect(spec["channel"])
    if behaviour == "bad-ready":
        sock.send(b"\x00" * 24)
        time.sleep(30)
        return
    sock.send(wire.encode_ready())
    if behaviour == "unsolicited":
        for seq in range(100):
            sock.send(wire.encode_read_done(seq, b"\x00"))
    while True:
        buf = sock.recv()
        op, size, _, seq, _, _ = wire.FRAME.unpack(buf)
        if op != wire.Op.READ:
            continue
        if behaviour == "garbage":
            sock.send(bytes(range(7, 31)))
        elif behaviour == "oversized":
            sock.send(b"\x03" * (2 << 20))
        elif behaviour == "wrong-seq":
            sock.send(wire.encode_read_done(seq + 1, b"\x00" * size))
        elif behaviour == "wide-reply":
            sock.send(wire.FRAME.pack(wire.Op.READ_DONE, size, 0, seq, 0, b"\x01" * 8))
        elif behaviour in ("silent", "unsolicited"):
            pass


if __name__ == "__main__":
    main()
