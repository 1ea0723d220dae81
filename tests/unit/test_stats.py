"""Per-device counters: the control op `stats`, answered by the device runtime with the
model's Device.stats(), and checked by the monitor like every control reply."""

from __future__ import annotations

import pytest

from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.runtime import _serve_control
from splitvmm.devprocs.serial import Uart8250
from splitvmm.errors import ProtocolError
from splitvmm.protocol import control
from splitvmm.protocol.polling import PollWindow
from tests.fakes import FakeIrq


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.window = PollWindow(0)

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


def test_stats_request_answered_with_the_models_counters():
    uart = Uart8250(DeviceContext(irq=FakeIrq()))
    uart.write(4, b"\x10")  # MCR: loopback
    for byte in b"ab":  # looped back into a receiver that holds one byte: an overrun
        uart.write(0, bytes([byte]))
    sock = FakeSocket()
    sock.window.polls, sock.window.caught = 5, 3
    _serve_control(uart, sock, control.encode({"op": "stats", "seq": 7}), FaultInjector())

    reply = control.check_reply(control.decode(sock.sent[0]), "stats", 7, "serial")
    assert (reply["counters"]["rx_overrun"], reply["counters"]["bad_access"]) == (1, 0)
    # and how its channel waited for the guest's accesses (protocol/polling.py)
    counters = reply["counters"]
    assert (counters["channel_polls"], counters["channel_polls_caught"]) == (5, 3)


@pytest.mark.parametrize(
    "counters",
    [
        {"Bad-Name": 1},
        {"x" * 33: 1},
        {"frames": -1},
        {"frames": 1 << 63},
        {"frames": True},
        {f"c{i}": i for i in range(control.MAX_COUNTERS + 1)},
    ],
    ids=["name", "long-name", "negative", "too-big", "bool", "too-many"],
)
def test_stats_reply_out_of_bounds_refused(counters):
    frame = control.encode({"op": "counters", "seq": 1, "counters": counters})

    with pytest.raises(ProtocolError, match="counters"):
        control.decode(frame)
