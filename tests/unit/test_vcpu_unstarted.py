"""An AP that no INIT and SIPI started, woken by an event KVM cannot deliver to it (an NMI IPI
a guest sent it), has every KVM_RUN return EAGAIN at once (exits.Unstarted): its thread waits
between them, and still parks and stops when asked. The vCPU is a fake whose KVM_RUN returns
what a test lists; tests/integration/test_guests.py runs the real case."""

from __future__ import annotations

import threading
import time

from splitvmm.monitor import vcpu as vcpu_module
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.vcpu import UNSTARTED_WAIT_S, VcpuThread, install_kick_handler
from splitvmm.native.exits import INTERRUPTED, UNSTARTED, Exit, PioOut


class FakeVcpu:
    """KVM_RUN returns `script`'s exits in turn, then UNSTARTED for ever (INTERRUPTED while
    immediate_exit is set, as KVM does for an unstarted AP)."""

    vcpu_id = 1

    def __init__(self, script: list[Exit]) -> None:
        self.script = list(script)
        self.runs = 0
        self.immediate_exit = False

    def run(self) -> Exit:
        self.runs += 1
        if self.immediate_exit:
            return INTERRUPTED
        return self.script.pop(0) if self.script else UNSTARTED

    def set_immediate_exit(self, on: bool) -> None:
        self.immediate_exit = on


class NoConfinement:
    def confine_vcpu_thread(self) -> None:
        pass


def thread(vcpu: FakeVcpu) -> VcpuThread:
    pio = Bus("pio")
    return VcpuThread(
        vcpu,  # type: ignore[arg-type]
        pio,
        Bus("mmio"),
        None,  # type: ignore[arg-type]
        lambda outcome: None,
        NoConfinement(),  # type: ignore[arg-type]
    )


def test_an_unstarted_ap_woken_again_and_again_waits_between_its_runs_and_parks_when_asked(
    monkeypatch,
):
    install_kick_handler()  # a pause kicks the thread with a signal, as the monitor does
    # a wait of 30 s under way when the pause comes: the pause must end it
    monkeypatch.setattr(vcpu_module, "UNSTARTED_WAIT_S", (30.0, 30.0))
    vcpu = FakeVcpu([])
    t = thread(vcpu)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while vcpu.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # in its wait, where a loop would run on
        runs = vcpu.runs
        t.request_pause()
        asked = time.monotonic()
        parked = t.wait_parked(10.0)
        waited = time.monotonic() - asked
    finally:
        t.request_stop()
        t.join(10.0)
    assert runs == 2, runs  # one at once, one after which it waits; a loop made thousands
    assert parked and waited < 5.0, waited  # not the 30 s the wait under way had left
    assert not t.is_alive()


def test_an_unstarted_ap_is_run_again_at_once_after_one_eagain_and_waits_only_in_a_row(
    monkeypatch,
):
    """An honest INIT or SIPI gives one EAGAIN, and the AP runs at the next KVM_RUN: no wait
    there. A wait grows only over EAGAINs in a row; any exit between them starts it over."""
    out = PioOut(0x80, 1, b"\0")
    vcpu = FakeVcpu([UNSTARTED, out, UNSTARTED, UNSTARTED, UNSTARTED, out, UNSTARTED])
    t = thread(vcpu)
    waits: list[float] = []
    done = threading.Event()
    real = t._wait_unstarted

    def wait_unstarted(wait: float) -> float:
        waits.append(wait)
        if len(waits) == 5:
            t.stopping = True
            done.set()
        return real(wait)

    monkeypatch.setattr(t, "_wait_unstarted", wait_unstarted)
    t.run()

    first = UNSTARTED_WAIT_S[0]
    assert done.is_set() and waits == [0.0, 0.0, first, 2 * first, 0.0]


def test_a_wait_doubles_up_to_the_longest():
    t = thread(FakeVcpu([]))
    t.stopping = True  # each wait ends at once: only what it returns is looked at
    wait, seen = 0.0, []
    for _ in range(10):
        wait = t._wait_unstarted(wait)
        seen.append(wait)
    first, longest = UNSTARTED_WAIT_S
    assert seen == [first * 2**n for n in range(6)] + [longest] * 4
