"""A console device's room for host input (devprocs/runtime.py InputRoomReporter): the
input_room events a real 8250 model sends through the runtime as input comes and the guest
reads it, and the monitor's arithmetic over them (monitor/slot.py input())."""

from __future__ import annotations

from splitvmm.devprocs.base import DeviceContext, load_model
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.runtime import InputRoomReporter, _serve_frame
from splitvmm.devprocs.serial import RX_HOST_ROOM, Mcr, Reg
from splitvmm.protocol import control, events, wire
from splitvmm.protocol.models import MODELS
from tests.fakes import FakeIrq
from tests.unit.test_mirror_publisher import Channel

QUARTER = RX_HOST_ROOM // 4


class Console(Channel):
    """An 8250 served by the runtime (test_mirror_publisher's Channel), its room reported;
    `rooms()` the reports so far."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs = InputRoomReporter(self.uart)
        self.inputs.check()  # the first report, as after READY
        self.sent = 0  # what a monitor sent, keeping to the room: monitor/slot.py input()

    def frame(self, buf: bytes) -> list[bytes]:
        before = len(self.sock.sent)
        _serve_frame(
            self.uart,
            self.sock,  # type: ignore[arg-type]
            buf,
            self.checkpoints,
            FaultInjector(),
            self.mirrors,
            self.inputs,
        )
        self.inputs.check()
        return self.sock.sent[before:]

    def type(self, data: bytes) -> None:
        for i in range(0, len(data), wire.MAX_INPUT_CHUNK):
            self.frame(wire.encode_input(data[i : i + wire.MAX_INPUT_CHUNK]))
        self.sent += len(data)

    def read_rbr(self, count: int) -> None:
        for _ in range(count):
            self.seq += 1
            self.frame(wire.encode_read(self.seq, Reg.RX_TX, 1))

    def rooms(self) -> list[tuple[int, int]]:
        found = (events.event_in(f, "serial") for f in self.sock.sent if control.is_control(f))
        return [(e.received, e.room) for e in found if isinstance(e, events.InputRoom)]

    def room_now(self) -> int:
        """The monitor's room, from the last report: what it may send now."""
        received, room = self.rooms()[-1]
        return events.InputRoom(received, room).left(self.sent)


def test_room_reported_once_at_start():
    assert Console().rooms() == [(0, RX_HOST_ROOM)]


def test_room_not_reported_again_while_input_fills_it_as_the_monitor_counts():
    console = Console()
    console.type(b"x" * RX_HOST_ROOM)
    assert (console.rooms(), console.room_now()) == ([(0, RX_HOST_ROOM)], 0)


def test_room_reported_after_the_guest_read_a_quarter_of_the_buffer_not_before():
    console = Console()
    console.type(b"x" * RX_HOST_ROOM)
    console.read_rbr(QUARTER - 1)
    before = len(console.rooms())
    console.read_rbr(1)
    assert (before, console.rooms()[-1], console.room_now()) == (
        1,
        (RX_HOST_ROOM, QUARTER),
        QUARTER,
    )


def test_room_reported_when_the_guest_emptied_the_buffer_whatever_it_read():
    console = Console()
    console.type(b"abc")
    console.read_rbr(3)
    assert (console.rooms()[-1], console.room_now()) == ((3, RX_HOST_ROOM), RX_HOST_ROOM)


def test_room_that_shrank_without_input_is_reported_at_once():
    """Loopback: the receiver takes no host input, which the monitor must learn before it
    sends into it."""
    console = Console()
    console.type(b"ab")
    console.frame(wire.encode_write(Reg.MCR, bytes([Mcr.LOOP])))
    assert console.rooms()[-1] == (2, 0)


def test_room_a_monitor_keeps_to_lets_no_byte_of_a_long_paste_drop():
    """The monitor's side of the arithmetic against the model: send what the last report
    allows, the guest reads in bursts; 5x the buffer arrives, none dropped, in order."""
    console = Console()
    paste = bytes(i % 251 for i in range(5 * RX_HOST_ROOM))
    got = bytearray()
    while len(got) < len(paste):
        room = console.room_now()
        console.type(paste[console.sent : console.sent + room])
        for _ in range(700):
            if not console.uart.rx:
                break
            got += console.uart.read(Reg.RX_TX, 1)
            console.inputs.check()
    assert bytes(got) == paste and console.uart.ctx.counters.rx_overrun == 0
    assert len(console.rooms()) < 5 * 4 + 4  # a report per quarter of the buffer read, about


def test_room_is_none_in_loopback_and_the_input_waits_for_its_end():
    """Loopback wires the receiver to the transmitter, and host input is dropped: the
    device says it has no room, so none is sent, and says so again when loopback ends."""
    console = Console()
    console.frame(wire.encode_write(Reg.MCR, bytes([Mcr.LOOP])))
    in_loopback = console.room_now()
    console.frame(wire.encode_write(Reg.MCR, b"\x00"))
    assert (in_loopback, console.room_now()) == (0, RX_HOST_ROOM)


def test_room_reported_by_every_console_model():
    """A model the descriptors call a console takes the monitor's input only if it says its
    room: one without input_buffer() would get none, silently."""
    consoles = [name for name, model in MODELS.items() if model.console]
    assert consoles and all(
        callable(getattr(load_model(name), "input_buffer", None)) for name in consoles
    )


def test_room_not_reported_by_a_model_without_console_input():
    from splitvmm.devprocs.rtc import Mc146818

    rtc = Mc146818(DeviceContext(irq=FakeIrq()))
    sent: list[bytes] = []
    rtc.ctx.events.connect(lambda frame: sent.append(frame) is None)
    InputRoomReporter(rtc).check()
    assert sent == []
