"""The device's side of the register mirror (devprocs/runtime.py MirrorPublisher): which
frames it sends for a read, through the runtime and a fake channel socket."""

from __future__ import annotations

from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.runtime import Checkpoints, MirrorPublisher, _serve_frame
from splitvmm.devprocs.serial import RX_BUFFER_MAX, Reg, Uart8250
from splitvmm.protocol import wire
from splitvmm.protocol.models import MODELS
from tests.fakes import FakeIrq, FakeLine
from tests.unit.test_faults import FakeSocket


class Channel:
    """A serial device served by the runtime; `sock.sent` holds every frame it sent."""

    def __init__(self) -> None:
        self.uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine())))
        self.sock = FakeSocket()
        self.uart.ctx.events.connect(lambda frame: self.sock.send(frame) is None)
        self.checkpoints = Checkpoints(self.uart)
        self.mirrors = MirrorPublisher(self.uart, self.checkpoints, FaultInjector())
        self.mirrors.changed()  # the first MIRROR, as after READY
        self.seq = 0

    def frame(self, buf: bytes) -> list[bytes]:
        """Serve one frame; what the device sent for it."""
        before = len(self.sock.sent)
        _serve_frame(self.uart, self.sock, buf, self.checkpoints, FaultInjector(), self.mirrors)  # type: ignore[arg-type]
        return self.sock.sent[before:]

    def read(self, offset: int) -> list[bytes]:
        self.seq += 1
        return self.frame(wire.encode_read(self.seq, offset, 1))


def test_publisher_read_that_changes_no_mirrored_value_is_restamped_without_a_mirror():
    channel = Channel()
    channel.frame(wire.encode_write(Reg.SCR, b"\x5a"))
    sent = channel.read(Reg.IIR_FCR)
    assert len(sent) == 1
    assert wire.decode_read_reply(sent[0], 1, 1)[1] == 2  # the write and the read applied


def test_publisher_read_that_changes_a_mirrored_value_sends_a_mirror_before_its_reply():
    channel = Channel()
    channel.uart.host_input(b"x" * (RX_BUFFER_MAX + 1))  # overrun: LSR not mirrored
    channel.mirrors.changed()
    mirror, reply = channel.read(Reg.LSR)  # the read clears OE: LSR is valid again
    published = wire.decode_mirror(mirror, MODELS["serial"].mirrored, Uart8250.WINDOW)
    assert (published.stamp, published.values[3] is not None) == (1, True)
    assert wire.decode_read_reply(reply, 1, 1)[1] is None


def asked(channel: Channel) -> list[int]:
    """Counts the model's mirror() calls from now on (one element per call)."""
    calls: list[int] = []
    mirror = channel.uart.mirror

    def counted() -> wire.Mirror:
        calls.append(1)
        return mirror()

    channel.uart.mirror = counted  # type: ignore[method-assign]
    return calls


def test_publisher_quiet_read_is_restamped_without_asking_the_model():
    channel = Channel()
    calls = asked(channel)
    for seq, reg in enumerate((Reg.IIR_FCR, Reg.IER, Reg.LCR, Reg.MCR, Reg.SCR), 1):
        (reply,) = channel.read(reg)
        assert wire.decode_read_reply(reply, seq, 1)[1] == seq  # RESTAMPED at its count
    assert calls == []


def test_publisher_quiet_read_after_a_write_within_the_credit_asks_the_model():
    """The write used the credit: whether a restamp may give it whole again is the model's
    credit now, which only mirror() says."""
    channel = Channel()
    channel.frame(wire.encode_write(Reg.RX_TX, b"a"))  # THR, within the credit
    calls = asked(channel)
    (reply,) = channel.read(Reg.IIR_FCR)
    assert (len(calls), wire.decode_read_reply(reply, 1, 1)[1]) == (1, 2)
    channel.read(Reg.IIR_FCR)  # restamped whole: quiet again
    assert len(calls) == 1


def test_publisher_read_that_is_not_quiet_asks_the_model():
    channel = Channel()
    calls = asked(channel)
    channel.read(Reg.LSR)
    channel.read(Reg.RX_TX)
    assert len(calls) == 2
