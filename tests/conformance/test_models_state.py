"""Every model with a descriptor (protocol/models.py), not a hand-kept list: its saved state
survives the trip through the state codec, and a restore refuses a document that is not its own.

Each model is exercised through its own registers first (a write to every offset of its
window, then a read of each), so the state is not just the reset one."""

from __future__ import annotations

import json

import pytest

from splitvmm.devprocs.base import DeviceContext, load_model
from splitvmm.errors import StateError
from splitvmm.protocol import codec
from splitvmm.protocol.models import MODELS
from tests.fakes import FakeIrq


def exercised(name: str):
    model = load_model(name)
    device = model(DeviceContext(irq=FakeIrq()))
    for offset in range(model.WINDOW):
        device.write(offset, bytes([0x5A ^ offset]))
    for offset in range(model.WINDOW):
        device.read(offset, 1)
    return model, device


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_roundtrip_through_codec_is_lossless(name):
    model, device = exercised(name)
    device.quiesce()
    state = device.save()

    document = json.loads(json.dumps(codec.state_document(name, state)))  # as on the channel
    decoded = codec.state_from_document(name, model.State, document)

    assert decoded == state
    assert model.restore(DeviceContext(irq=FakeIrq()), decoded).save() == state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_document_of_another_model_refused(name):
    model, device = exercised(name)
    document = codec.state_document(name, device.save())

    with pytest.raises(StateError, match="not for model"):
        codec.state_from_document("not-" + name, model.State, document)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_document_from_a_newer_release_refused(name):
    model, device = exercised(name)
    document = {**codec.state_document(name, device.save()), "version": model.State.VERSION + 1}

    with pytest.raises(StateError, match="version"):
        codec.state_from_document(name, model.State, document)
