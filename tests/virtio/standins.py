"""Until splitvmm/devprocs/virtio/guestram.py and queue.py are merged (another branch writes
them), the tests import test-only stand-ins with the same API under their names. Once the
real modules exist this does nothing, and every test runs against them."""

from __future__ import annotations

import importlib
import importlib.util
import sys

STANDINS = {
    "splitvmm.devprocs.virtio.guestram": "tests.virtio.standin_guestram",
    "splitvmm.devprocs.virtio.queue": "tests.virtio.standin_queue",
}


_installed: list[str] = []


def missing() -> list[str]:
    """The real modules not in this tree (the stand-ins take their place in tests)."""
    return _installed + [
        name
        for name in STANDINS
        if name not in _installed and importlib.util.find_spec(name) is None
    ]


def install() -> None:
    for name in missing():
        sys.modules[name] = importlib.import_module(STANDINS[name])
        _installed.append(name)
