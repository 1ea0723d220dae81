"""The device's side of the register mirror (devprocs/runtime.py MirrorPublisher): which
frames it sends for a read, through the runtime and a fake channel socket."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.runtime import Checkpoints, MirrorPublisher, _serve_control, _serve_frame
from splitvmm.devprocs.serial import RX_BUFFER_MAX, Reg, Uart8250
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.protocol import control, faults, wire
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


# -- the monitor's copy against the UART, whatever happened (hypothesis) ---------------------
SERIAL = MODELS["serial"]


def peek(uart: Uart8250, offset: int) -> int:
    """What a read of a mirrored register would return now, without reading it."""
    match offset:
        case Reg.IER:
            return uart.dlm if uart._dlab() else uart.ier
        case Reg.LCR:
            return uart.lcr
        case Reg.MCR:
            return uart.mcr
        case Reg.LSR:
            return uart._lsr_value(uart._holding_empty())
        case Reg.MSR:
            return uart._modem_status()
        case Reg.SCR:
            return uart.scr
    raise AssertionError(offset)


class World:
    """A UART served by the runtime, and the monitor's copy of its registers fed only by
    what the runtime sends (MIRRORs, RESTAMPED replies), as monitor/channel.py feeds it."""

    def __init__(self, accept: int, capacity: int) -> None:
        self.line = FakeLine(accept)
        self.uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(self.line, capacity)))
        self.sock = FakeSocket()
        self.uart.ctx.events.connect(lambda frame: self.sock.send(frame) is None)
        self.checkpoints = Checkpoints(self.uart)
        self.injector = FaultInjector()
        self.mirrors = MirrorPublisher(self.uart, self.checkpoints, self.injector)
        self.monitor = RegisterMirror(SERIAL.mirrored, SERIAL.quiet_while)
        self.frames = 0
        self.seq = 0
        self.mirrors.changed()
        self.take()

    def take(self, read_seq: int | None = None, size: int = 0) -> bytes | None:
        data = None
        for buf in self.sock.sent:
            if wire.is_mirror(buf):
                self.monitor.take(wire.decode_mirror(buf, SERIAL.mirrored, Uart8250.WINDOW))
            elif read_seq is not None and wire.is_access_reply(buf) and buf[0] == wire.Op.READ_DONE:
                data, stamp = wire.decode_read_reply(buf, read_seq, size)
                if stamp is not None:
                    self.monitor.restamp(stamp)
        self.sock.sent.clear()
        return data

    def frame(self, buf: bytes) -> None:
        _serve_frame(self.uart, self.sock, buf, self.checkpoints, self.injector, self.mirrors)  # type: ignore[arg-type]

    def control(self, msg: dict[str, object]) -> None:
        self.seq += 1
        _serve_control(
            self.uart,
            self.sock,  # type: ignore[arg-type]
            control.encode({"seq": self.seq, **msg}),
            self.injector,
            self.mirrors,
            self.checkpoints,
        )

    def step(self, step: tuple[str, int, bytes]) -> None:
        kind, n, data = step
        match kind:
            case "read":
                self.seq += 1
                self.frames += 1
                self.frame(wire.encode_read(self.seq, n, len(data)))
                self.take(self.seq, len(data))
                self.monitor.sent(None)
            case "write" | "thr":
                writes = [(n, data)] if kind == "write" else [(0, b"x")] * n
                for offset, d in writes:
                    self.frames += 1
                    self.monitor.sent(offset if len(d) == 1 else None)
                    self.frame(wire.encode_write(offset, d))
                self.take()
            case "input":
                for i in range(0, len(data), wire.MAX_INPUT_CHUNK):
                    self.frames += 1
                    self.monitor.sent(None)
                    self.frame(wire.encode_input(data[i : i + wire.MAX_INPUT_CHUNK]))
                self.take()
            case "drain":
                self.line.accept += n
                out = self.uart.ctx.out
                if out.wants_flush() and out.flush():
                    self.uart.output_room()
                    self.mirrors.changed()
                self.take()
            case "sync":
                self.seq += 1
                self.frame(wire.encode_sync(self.seq))
                self.take()
            case "quiesce":
                self.monitor.paused = True
                self.monitor.invalidate()
                self.control({"op": "quiesce"})
                self.take()
            case "resume":
                self.control({"op": "resume"})
                self.take()
                self.monitor.paused = False
            case "save":
                self.control({"op": "save"})
                self.take()
            case "fault":  # one that fires at a reply: the mirror gives no values meanwhile
                self.control({"op": "fault", **faults.make("delay", after=1 + n % 5, delay_ms=1)})
                self.take()

    def check(self) -> None:
        for offset, _ in SERIAL.mirrored:
            answer = self.monitor.answer(offset, 1, self.frames)
            if answer is not None:
                real = peek(self.uart, offset)
                assert answer[0] == real, (
                    f"{Reg(offset).name}: the copy {answer.hex()}, the UART {real:#x}"
                )


def steps() -> st.SearchStrategy[tuple[str, int, bytes]]:
    """Accesses of 1, 2 and 4 bytes (quiet reads often), host events and control ops."""
    access = st.integers(0, 7).flatmap(
        lambda at: st.tuples(
            st.sampled_from(["read", "read", "write"]),
            st.just(at),
            st.sampled_from([n for n in (1, 2, 4) if at + n <= 8]).flatmap(
                lambda n: st.binary(min_size=n, max_size=n)
            ),
        )
    )
    quiet_read = st.tuples(st.just("read"), st.sampled_from([1, 2, 3, 4, 7]), st.just(b"\0"))
    host = st.tuples(
        st.sampled_from(["input", "drain", "sync", "quiesce", "resume", "save", "fault"]),
        st.integers(0, 40),
        st.binary(max_size=40),
    )
    thr = st.tuples(st.just("thr"), st.integers(1, 40), st.just(b""))
    return st.one_of(access, quiet_read, host, thr)


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(steps(), max_size=40),
    capacity=st.sampled_from([24, 64, 200, 4096]),
    accept=st.integers(0, 64),
)
def test_monitor_copy_answers_every_read_as_the_uart_would_after_any_history(
    history, capacity, accept
):
    """End to end: whatever the runtime sends (a MIRROR, a restamp after a quiet read or an
    unchanged one, nothing within the credit), the monitor's answers are the UART's registers.
    Found right by a review that broke the quiet restamp's guard: without `not self._used`,
    [write 0 b"\\x00\\x01", read IER] has the copy say IER=00 where the UART has 01."""
    world = World(accept, capacity)
    world.check()
    for step in history:
        world.step(step)
        world.check()
