"""Machine.run when a stop signal came before any vCPU ran (monitor/machine.py): the VM
stops there, its vCPUs never created, and close() tears down what build() made."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from splitvmm.monitor import machine as machine_module
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.machine import Machine


def bare_machine() -> Machine:
    """A Machine as build() leaves it, but for what run() reaches before its vCPUs."""
    m = Machine.__new__(Machine)
    m._outcome = None
    m._outcome_lock = threading.Lock()
    m.vcpus = []
    m._wake = SimpleNamespace(trigger=lambda: None)
    m._spawned_at = {"serial0": 0.0}
    return m


def test_a_stop_signal_while_the_devices_get_ready_runs_no_vcpu(monkeypatch):
    """SIGTERM during the wait for READY (the longest step of a start): stop() reached no
    vCPU (none existed yet), and run() used to create and start them all the same."""
    m = bare_machine()
    stopped = Outcome(143, "stopped by SIGTERM")
    m.slots = [SimpleNamespace(name="serial0", wait_ready=lambda: m.stop(stopped))]
    monkeypatch.setattr(
        machine_module,
        "Supervisor",
        lambda **kw: (_ for _ in ()).throw(AssertionError("the VM went on to run")),
    )

    assert m.run() is stopped and m.vcpus == []


def test_a_stop_signal_during_the_build_returns_at_once():
    m = bare_machine()
    m.slots = [
        SimpleNamespace(
            name="serial0",
            wait_ready=lambda: (_ for _ in ()).throw(AssertionError("waited for devices")),
        )
    ]
    m.stop(Outcome(130, "stopped by SIGINT"))

    assert m.run().status == 130
