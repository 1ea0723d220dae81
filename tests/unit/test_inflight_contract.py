"""The device snapshot contract (quiesce, save, resume, restore) with requests in flight,
through the device runtime's control path and the state codec, as a snapshot carries it."""

from __future__ import annotations

from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.runtime import _serve_control
from splitvmm.protocol import codec, control
from tests.fakes import FakeIrq
from tests.inflight_device import InflightDevice, InflightState


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


def request(device, op: str, seq: int) -> dict:
    sock = FakeSocket()
    _serve_control(device, sock, control.encode({"op": op, "seq": seq}), FaultInjector())
    return control.decode(sock.sent[0])


def saved_document(device, seq: int) -> dict:
    """The state document of a save, as the monitor takes it from the reply."""
    return control.check_reply(request(device, "save", seq), "save", seq, "inflight-test")


def stuck_on(rid: int):
    return lambda r: r != rid


def test_quiesce_finishes_what_it_can_and_records_the_rest():
    dev = InflightDevice(DeviceContext(irq=FakeIrq()), backend=stuck_on(3))
    for rid in (1, 2, 3):
        dev.write(0, bytes([rid]))
    assert request(dev, "quiesce", 1) == {"op": "quiesced", "seq": 1}
    state = saved_document(dev, seq=2)
    assert (state["model"], state["version"]) == ("inflight-test", 1)
    saved = codec.state_from_document("inflight-test", InflightState, state)
    assert (saved.done, saved.in_flight) == (b"\x01\x02", b"\x03")


def test_requests_submitted_while_quiesced_are_not_taken_until_resume():
    dev = InflightDevice(DeviceContext(irq=FakeIrq()))
    request(dev, "quiesce", 1)
    dev.write(0, b"\x07")
    during = dev.save()
    request(dev, "resume", 2)
    dev.pump()
    assert (during.queued, during.in_flight, bytes(dev.done)) == (b"\x07", b"", b"\x07")


def test_restore_reruns_recorded_requests_exactly_once():
    dev = InflightDevice(DeviceContext(irq=FakeIrq()), backend=stuck_on(3))
    for rid in (1, 2, 3):
        dev.write(0, bytes([rid]))
    request(dev, "quiesce", 1)
    document = saved_document(dev, seq=2)
    state = codec.state_from_document("inflight-test", InflightState, document)
    restored = InflightDevice.restore(DeviceContext(irq=FakeIrq()), state)
    assert (bytes(restored.done), bytes(restored.in_flight)) == (b"\x01\x02\x03", b"")
