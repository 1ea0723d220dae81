"""Every model with a descriptor (protocol/models.py), not a hand-kept list: its saved state
survives the trip through the state codec, and a restore refuses a document that is not its own.

Each model is exercised through its own registers first (writes of each width all over its
window, then a read of each byte), so the state is not just the reset one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitvmm.devprocs.base import DeviceContext, load_model
from splitvmm.errors import StateError
from splitvmm.protocol import codec
from splitvmm.protocol.models import MODELS, FdKind
from tests.fakes import FakeIrq
from tests.virtio.support import close_fds, host_fds, prepared

Contexts = Callable[[str], DeviceContext]


@pytest.fixture(autouse=True)
def still_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RTC saves the time it shows: two saves a second boundary apart differ. The host
    clock stands still here, so a save, restore and save again compares state, not time."""
    from splitvmm.devprocs import rtc

    now = time.time_ns()
    monkeypatch.setattr(rtc.HostClock, "wall_ns", lambda self: now)
    monkeypatch.setattr(rtc.HostClock, "monotonic", lambda self: now / 1e9)


@pytest.fixture
def contexts(tmp_path: Path) -> Iterator[Contexts]:
    """contexts(name): a fresh context for a model, with the host fds its roles need (a
    virtio device's guest RAM, eventfds and disk), on the same fds each time."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 16))
    made: dict[str, dict[str, int]] = {}

    def context(name: str) -> DeviceContext:
        if not any(r.kind is FdKind.GUEST_RAM for r in MODELS[name].fds):
            return DeviceContext(irq=FakeIrq())
        fds = made.setdefault(name, host_fds(name, disk))
        return prepared(name, fds)

    yield context
    for fds in made.values():
        close_fds(fds)


def exercised(name: str, contexts: Contexts):
    """The model after a write of each width to every offset of its window, then a read of
    each byte: a state that is not the reset one."""
    model = load_model(name)
    device = model.from_options(contexts(name), {})
    for size in (1, 2, 4):
        for offset in range(0, model.WINDOW - size + 1, size):
            device.write(offset, ((0x5A ^ offset) & 0xFF).to_bytes(size, "little"))
    for offset in range(model.WINDOW):
        device.read(offset, 1)
    return model, device


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_link_and_request_faults_match_its_descriptor(name, contexts):
    """The monitor offers `ctl link` and io-error faults from the descriptor alone; a model
    that lacked what its descriptor promises would answer the request with an error, and the
    monitor fails a device for that."""
    device = load_model(name).from_options(contexts(name), {})

    assert (device.link(None) is not None) == MODELS[name].link
    assert (device.request_faults is not None) == MODELS[name].request_faults


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_roundtrip_through_codec_is_lossless(name, contexts):
    model, device = exercised(name, contexts)
    device.quiesce()
    state = device.save()

    document = json.loads(json.dumps(codec.state_document(name, state)))  # as on the channel
    decoded = codec.state_from_document(name, model.State, document)

    assert decoded == state
    assert model.restore(contexts(name), decoded).save() == state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_document_of_another_model_refused(name, contexts):
    model, device = exercised(name, contexts)
    document = codec.state_document(name, device.save())

    with pytest.raises(StateError, match="not for model"):
        codec.state_from_document("not-" + name, model.State, document)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_document_from_a_newer_release_refused(name, contexts):
    model, device = exercised(name, contexts)
    document = {**codec.state_document(name, device.save()), "version": model.State.VERSION + 1}

    with pytest.raises(StateError, match="version"):
        codec.state_from_document(name, model.State, document)
