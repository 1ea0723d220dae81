"""Fault injection (crash testing): the fault record, its config form, the launcher's check,
and the device runtime firing each kind, through a fake channel socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitvmm.config import load_config
from splitvmm.devprocs import faults as device_faults
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.runtime import Checkpoints, _serve_frame
from splitvmm.devprocs.serial import Uart8250
from splitvmm.errors import ConfigError, ProtocolError
from splitvmm.protocol import control, faults, wire
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.sandbox.launcher_server import Refused, _decode_spec
from tests.fakes import FakeIrq, FakeLine
from tests.unit.test_config import GOOD, write

LSR = 5


def fault(kind: str, **parts: object) -> faults.Fault:
    return faults.decode({**faults.make(kind), **parts}, "test", ProtocolError)


@pytest.mark.parametrize(
    "doc",
    [
        faults.make("crash", after=200),
        faults.make("delay", after=1, delay_ms=faults.MAX_DELAY_MS),
        faults.make("drop", after=(1 << 32) - 1),
        faults.make("exit"),
        faults.make("io-error", after=3, on="flush", count=(1 << 32) - 1),
    ],
    ids=["crash", "delay-max", "drop-u32", "exit", "io-error"],
)
def test_fault_good_document_decodes(doc: dict[str, object]) -> None:
    assert faults.decode(doc, "test", ProtocolError).kind == doc["kind"]


@pytest.mark.parametrize(
    "doc,message",
    [
        (faults.make("explode"), r"test.*kind"),
        (faults.make("crash", after=0), r"test.*after"),
        (faults.make("crash", after=1 << 32), r"test.*after"),
        (faults.make("delay", delay_ms=faults.MAX_DELAY_MS + 1), r"test.*delay_ms"),
        (faults.make("delay"), r"test.*delay_ms"),
        (faults.make("crash", signal="KILL"), r"test.*signal"),
        (faults.make("crash", after=True), r"test.*after"),
        ({**faults.make("exit"), "code": "x"}, r"test.*code"),
        ({"kind": "exit"}, r"test"),
        (faults.make("io-error", on="discard"), r"test.*on"),
        (faults.make("io-error", count=0), r"test.*count"),
        (faults.make("crash", on="write"), r"test.*on and count belong to an io-error"),
        (faults.make("delay", delay_ms=5, count=2), r"test: count: on and count belong to an"),
    ],
    ids=[
        "kind",
        "after-0",
        "after-u33",
        "delay-over",
        "delay-0",
        "signal",
        "bool",
        "extra",
        "missing",
        "on",
        "count-0",
        "on-not-io-error",
        "count-not-io-error",
    ],
)
def test_fault_bad_document_raises_error_naming_field(doc: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        faults.decode(doc, "test", ProtocolError)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("delay:after=7,delay_ms=300", faults.make("delay", after=7, delay_ms=300)),
        ("delay,delay_ms=300", faults.make("delay", delay_ms=300)),
        ("crash,signal=SEGV", faults.make("crash")),
        ("exit", faults.make("exit")),
        (
            "io-error:after=2,on=write,count=3",
            faults.make("io-error", after=2, on="write", count=3),
        ),
        ("io-error", faults.make("io-error")),
        ("io-error:on=WRITE", faults.make("io-error", on="write")),
    ],
    ids=[
        "after-given",
        "after-left-out",
        "signal-only",
        "kind-only",
        "io-error",
        "io-error-bare",
        "io-error-case",
    ],
)
def test_fault_config_string_parses_to_a_document(
    tmp_path: Path, text: str, expected: dict[str, object]
) -> None:
    """The README's `KIND[:after=N][,delay_ms=D][,signal=SEGV][,on=O][,count=C]`: with `after`
    left out the first part follows a comma ("delay,delay_ms=300"), which was refused as a
    kind. An io-error on a model that serves requests (virtio-blk)."""
    (tmp_path / "kernel.elf").write_bytes(b"\x7fELF")
    if "io-error" in text:
        (tmp_path / "d.img").write_bytes(bytes(4096))
        text = (
            GOOD
            + f'[[device]]\nname = "blk0"\nmodel = "virtio-blk"\npath = "d.img"\nfault = "{text}"\n'
        )
    else:
        text = GOOD.replace('model = "serial"\n', f'model = "serial"\nfault = "{text}"\n')
    cfg = load_config(write(tmp_path, text))
    by_name = {d.name: d for d in cfg.devices}
    assert by_name["blk0" if "io-error" in text else "serial0"].fault == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ('"explode"', r"device 'serial0'\.fault: .*kind"),
        ('"crash:after=x"', r"device 'serial0'\.fault: after must be a whole number"),
        ('"crash:every=3"', r"device 'serial0'\.fault: 'every=3' is not"),
        ('"crash:signal=KILL"', r"device 'serial0'\.fault: .*signal"),
        ("3", r"device 'serial0'\.fault: expected a string"),
        ('"io-error"', r"device 'serial0'\.fault: model serial serves no requests an io-error"),
        ('"io-error:count=x"', r"device 'serial0'\.fault: count must be a whole number"),
    ],
    ids=["kind", "after-text", "unknown-part", "signal", "not-a-string", "io-error", "count"],
)
def test_fault_config_mistake_raises_error_naming_key(
    tmp_path: Path, value: str, message: str
) -> None:
    (tmp_path / "kernel.elf").write_bytes(b"\x7fELF")
    text = GOOD.replace('model = "serial"\n', f'model = "serial"\nfault = {value}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_launcher_spec_with_bad_fault_is_refused_with_one_line() -> None:
    spec = DeviceSpec("serial0", "serial", "ipc:///x/serial0.sock", fault=faults.make("burn"))
    with pytest.raises(Refused, match=r"^device 'serial0': fault: .*kind[^\n]*$"):
        _decode_spec(spec.to_json().encode())


def test_launcher_spec_with_good_fault_decodes() -> None:
    spec = DeviceSpec("serial0", "serial", "ipc:///x/serial0.sock", fault=faults.make("exit"))
    assert _decode_spec(spec.to_json().encode()).fault == faults.make("exit")


# -- the runtime firing each kind ---------------------------------------------------------------
class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent.append(frame)


class Fired(Exception):
    """What the fakes of os._exit and crash() raise: the process would end here."""


def serve_reads(injector: FaultInjector, count: int) -> tuple[FakeSocket, Uart8250]:
    """`count` LSR reads through the runtime; the socket has the replies it sent."""
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine())))
    sock, checkpoints = FakeSocket(), Checkpoints(uart)
    for seq in range(1, count + 1):
        _serve_frame(uart, sock, wire.encode_read(seq, LSR, 1), checkpoints, injector)  # type: ignore[arg-type]
    return sock, uart


def test_runtime_drop_fault_sends_no_reply_to_that_frame_only() -> None:
    sock, _ = serve_reads(FaultInjector(fault("drop", after=2)), 4)
    assert len(sock.sent) == 3
    for frame, seq in zip(sock.sent, (1, 3, 4), strict=True):
        wire.decode_read_done(frame, seq, 1)  # raises on another seq


def test_runtime_delay_fault_waits_before_the_reply_of_its_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[object] = []

    class Poll:
        def poll(self, ms: int) -> None:
            events.append(("wait", ms))

    monkeypatch.setattr(device_faults.select, "poll", Poll)
    injector = FaultInjector(fault("delay", after=2, delay_ms=300))
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine())))
    sock, checkpoints = FakeSocket(), Checkpoints(uart)
    for seq in (1, 2, 3):
        _serve_frame(uart, sock, wire.encode_read(seq, LSR, 1), checkpoints, injector)  # type: ignore[arg-type]
        events.append(("sent", len(sock.sent)))
    assert events == [("sent", 1), ("wait", 300), ("sent", 2), ("sent", 3)]


def test_runtime_exit_fault_ends_the_process_before_applying_its_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exit_(status: int) -> None:
        raise Fired(status)

    monkeypatch.setattr(device_faults.os, "_exit", exit_)
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine())))
    sock, checkpoints = FakeSocket(), Checkpoints(uart)
    injector = FaultInjector(fault("exit", after=2))
    _serve_frame(uart, sock, wire.encode_write(0, b"a"), checkpoints, injector)  # type: ignore[arg-type]
    with pytest.raises(Fired) as fired:
        _serve_frame(uart, sock, wire.encode_write(0, b"b"), checkpoints, injector)  # type: ignore[arg-type]
    assert fired.value.args == (faults.EXIT_STATUS,)
    assert checkpoints.applied == 1  # "b" was never applied


def test_runtime_crash_fault_fires_after_its_frame_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash() -> None:
        raise Fired()

    monkeypatch.setattr(device_faults, "crash", crash)
    injector = FaultInjector(fault("crash", after=3))
    with pytest.raises(Fired):
        serve_reads(injector, 5)
    assert injector.frames == 3


def test_runtime_fault_control_message_arms_it_and_answers_fault_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine())))
    sock, checkpoints, injector = FakeSocket(), Checkpoints(uart), FaultInjector()
    msg = {"op": "fault", "seq": 9, **faults.make("drop", after=1)}
    _serve_frame(uart, sock, control.encode(msg), checkpoints, injector)  # type: ignore[arg-type]
    assert control.check_reply(control.decode(sock.sent[0]), "fault", 9, "serial")["op"] == (
        "fault_armed"
    )
    _serve_frame(uart, sock, wire.encode_read(10, LSR, 1), checkpoints, injector)  # type: ignore[arg-type]
    assert len(sock.sent) == 1  # the read's reply was dropped


def test_io_error_armed_leaves_the_frame_fault_armed() -> None:
    """An io-error counts requests, not frames: it replaces an io-error only, and a crash
    armed before it still fires."""
    requests = device_faults.RequestFaults()
    injector = FaultInjector(requests=requests)

    injector.arm(fault("crash", after=5))
    injector.arm(fault("io-error", on="write"))

    assert injector.fault == fault("crash", after=5) and requests.armed


def test_request_faults_forget_a_failed_request_past_their_window() -> None:
    """Only the last `window` requests asked about keep their answer (the most a stall can
    give back): a place met again past them (its ring's count wrapped at 2^16) is a new
    request, and once none it failed can come back the fault is disarmed."""
    requests, ring = device_faults.RequestFaults(window=2), object()
    requests.arm(fault("io-error", on="write"))
    answers = [requests.fails("write", ring, place) for place in (1, 2, 3)]

    again = requests.fails("write", ring, 1)

    assert (answers, again, requests.armed) == ([True, False, False], False, False)


def test_runtime_bad_fault_control_message_is_a_protocol_error() -> None:
    msg = {"op": "fault", "seq": 9, **faults.make("drop", after=0)}
    with pytest.raises(ProtocolError, match="control fault.*after"):
        control.decode(control.encode(msg))


def test_device_crash_dies_by_sigsegv() -> None:
    import faulthandler
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # pytest's: it would catch the fault first (the device has none)
        device_faults.crash()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
