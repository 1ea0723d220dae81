"""OnThread: a call on a thread of its own, its error handed to whoever waits for it.
Threads, so not among the unit tests."""

from __future__ import annotations

import threading

import pytest

from splitvmm.errors import KvmError
from splitvmm.monitor.onthread import OnThread

WAIT_S = 5.0


def test_on_thread_result_raises_what_the_call_raised_once():
    def call() -> None:
        raise KvmError(6, "KVM_REINJECT_CONTROL")

    failed = OnThread("t", call)

    with pytest.raises(KvmError, match="KVM_REINJECT_CONTROL"):
        failed.result()
    failed.result()  # handed over: a second wait has nothing to raise


def test_on_thread_runs_the_call_aside_and_wait_returns_its_error():
    ran_on: list[str] = []
    release = threading.Event()

    def call() -> None:
        release.wait(WAIT_S)
        ran_on.append(threading.current_thread().name)
        raise OSError("handed to wait()")

    aside = OnThread("pit-mode", call)
    assert ran_on == []  # started, not waited for
    release.set()
    error = aside.wait()

    assert ran_on == ["pit-mode"]
    assert isinstance(error, OSError)
    assert str(error) == "handed to wait()"
    assert aside.wait() is None


def test_onthread_ended_within_says_whether_the_call_is_done_and_keeps_its_error():
    """The teardown waits a bounded time for the disks' write-back (hung storage), then
    goes on; what the call raised is still wait()'s."""
    release = threading.Event()

    def blocked() -> None:
        release.wait()
        raise OSError("late")

    call = OnThread("blocked", blocked)
    assert call.ended_within(0.05) is False
    release.set()
    assert call.ended_within(10) is True
    assert str(call.wait()) == "late"
