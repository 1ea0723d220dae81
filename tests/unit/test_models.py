"""Model descriptors (protocol/models.py) against the models that implement them."""

from __future__ import annotations

import pytest

from splitvmm.devprocs.base import REGISTRY, load_all_models, load_model, register
from splitvmm.errors import StateError
from splitvmm.protocol.models import (
    MODELS,
    PROGRESS_MAX_VECTORS,
    SERIAL,
    VIRTIO_BLK,
    FdKind,
    ModelDescriptor,
    PciFunction,
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_its_descriptor(name):
    model = load_model(name)
    descriptor = MODELS[name]

    assert (model.NAME, model.WINDOW) == (descriptor.name, descriptor.transport.size)
    assert model.State.VERSION == descriptor.state_version


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_output_role_names_an_option_and_has_a_recipe(name):
    descriptor = MODELS[name]
    outputs = [r for r in descriptor.fds if r.kind is FdKind.OUTPUT]

    # output through registers (a UART's) or through a transmit queue (a virtio console's;
    # a network card's transmit queue goes elsewhere: a queue 1 recipe without an output
    # is fine)
    queue_output = any(r.queue == 1 for r in descriptor.queue_recipes)
    assert all(r.option in {o.name for o in descriptor.options} for r in outputs)
    assert (descriptor.output_recipe is not None) <= bool(outputs)
    assert bool(outputs) <= (descriptor.output_recipe is not None or queue_output)


def test_load_all_models_covers_every_descriptor():
    assert set(load_all_models()) == set(MODELS)


def test_load_model_unknown_name_refused_without_import():
    with pytest.raises(StateError, match="unknown device model 'os'"):
        load_model("os")


def test_register_model_disagreeing_with_descriptor_refused():
    serial = load_model("serial")
    wrong = type("Wrong", (serial,), {"WINDOW": serial.WINDOW + 1})

    with pytest.raises(TypeError, match="WINDOW"):
        register(wrong)
    assert REGISTRY["serial"] is serial


def test_register_model_with_a_link_its_descriptor_lacks_refused():
    """The monitor offers `ctl link` from the descriptor alone (ModelDescriptor.link)."""
    serial = load_model("serial")
    linked = type("Linked", (serial,), {"link": lambda self, up: True})

    with pytest.raises(TypeError, match="link"):
        register(linked)
    assert REGISTRY["serial"] is serial


def test_register_model_without_descriptor_refused():
    serial = load_model("serial")
    stray = type("Stray", (serial,), {"NAME": "stray"})

    with pytest.raises(TypeError, match="no descriptor 'stray'"):
        register(stray)


def test_descriptors_are_frozen():
    with pytest.raises(AttributeError, match="immutable"):
        MODELS["serial"].name = "x"  # type: ignore[misc]


# -- write-behind declarations (monitor/writebehind.py) -------------------------------------------
def _serial_with(**changes: object) -> ModelDescriptor:
    return ModelDescriptor(**{**asdict_shallow(MODELS["serial"]), **changes})


def asdict_shallow(d: ModelDescriptor) -> dict[str, object]:
    return {f: getattr(d, f) for f in d.__struct_fields__}


@pytest.mark.parametrize(
    "registers",
    [((8, 1),), ((0, 3),), ((-1, 1),), ((0, 2), (1, 1))],
    ids=["outside", "odd size", "negative", "overlap"],
)
def test_write_behind_register_not_valid_is_refused(registers):
    with pytest.raises(ValueError, match="write-behind register"):
        _serial_with(write_behind=registers)


def test_write_behind_in_a_pci_function_is_refused():
    with pytest.raises(ValueError, match="port window"):
        ModelDescriptor(**{**asdict_shallow(MODELS["virtio-rng"]), "write_behind": ((0, 1),)})


def test_write_behind_while_a_register_not_mirrored_is_refused():
    with pytest.raises(ValueError, match="does not mirror"):
        _serial_with(write_behind_while=((2, 0x01, 0),))


# -- quiet declarations (monitor/mirror.py, news) -------------------------------------------------
@pytest.mark.parametrize(
    ("conditions", "why"),
    [
        (((2, 0x01, 0),), "does not mirror"),
        (((1, 0x100, 0),), "mask"),
        (((1, 0x00, 0),), "mask"),
        (((1, 0x02, 0x04),), "value"),
    ],
    ids=["not mirrored", "mask too wide", "no mask", "value outside the mask"],
)
def test_quiet_while_not_valid_is_refused(conditions, why):
    with pytest.raises(ValueError, match=f"quiet_while .*{why}"):
        _serial_with(quiet_while=conditions)


def test_write_behind_while_with_a_mask_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="write_behind_while has mask 0x100"):
        _serial_with(write_behind_while=((1, 0x100, 0),))


def test_pauses_follows_the_pause_option_and_its_default():
    """The one rule the device (whether to stall) and the monitor (whether to take its stall
    event) share."""
    assert VIRTIO_BLK.pauses({"on_full": "pause"}) is True
    assert VIRTIO_BLK.pauses({"on_full": "error"}) is False
    assert VIRTIO_BLK.pauses({}) is True  # the option's default
    assert SERIAL.pauses({"on_full": "pause"}) is False  # its model has no pause_option


def test_models_handed_guest_ram_are_the_virtio_ones() -> None:
    """A restore starts the others before it loads RAM (monitor/machine.py build)."""
    assert {name for name, model in MODELS.items() if model.reads_guest_ram} == {
        name for name in MODELS if name.startswith("virtio-")
    }


def test_every_pci_models_vectors_have_a_byte_in_the_progress_page():
    """The page says which vectors may fire (devprocs/progress.py): one byte each."""
    functions = [m.transport for m in MODELS.values() if isinstance(m.transport, PciFunction)]
    assert functions and all(f.msix_vectors <= PROGRESS_MAX_VECTORS for f in functions)
