"""How `up` takes its stop signals (monitor/machine.py Machine._on_signal), without a VM:
the first asks for a stop, a second (`timeout` signalling the process group after `up`)
changes nothing, a third is the signal's default at once."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from splitvmm.monitor import machine
from splitvmm.monitor.machine import Machine


@pytest.fixture
def raised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """What _on_signal did to the process's signals (nothing is really raised)."""
    done: list[tuple[str, int]] = []
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: done.append(("handler", h)))
    monkeypatch.setattr(machine.signal, "raise_signal", lambda s: done.append(("raise", s)))
    return done


def test_stop_signals_first_stops_second_waits_third_is_the_default(raised):
    stops: list[object] = []
    vm = SimpleNamespace(_stop_signals=0, stop=stops.append)

    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]
    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]
    after_two = list(raised)
    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]

    assert [getattr(o, "message", o) for o in stops] == ["stopped by SIGTERM"] * 2
    assert (after_two, raised) == ([], [("handler", signal.SIG_DFL), ("raise", signal.SIGTERM)])
