"""Device start-up under CPU load never dies of its filter.

When a device process held libzmq's threads, pthread_create returned before the new thread
ran; with every CPU busy, libzmq's reaper thread sometimes started (rseq,
sched_setscheduler, prctl(PR_SET_NAME)...) after the device loaded its filter, and died of
SIGSYS (2 devices in 60). A device has one thread now (devprocs/channel.py), and its filter
allows none of those calls; this still spawns devices under CPU load, where any call that
timing alone brings (a clock without vDSO, a signal's restart) would show.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from tests.sandbox.harness import SandboxedDevice

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]
SPAWNS = 60
HOG = "import signal; signal.alarm(300)\nwhile True: pass"  # alarm: no hog outlives a crash


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(6)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def _death(spawn: Callable[..., SandboxedDevice]) -> str | None:
    """How the device failed to start and serve, or None."""
    dev = spawn(stderr_to_file=False)
    try:
        dev.wait_ready(timeout=60)
        time.sleep(0.05)  # the threads' start-up, if it comes late
        dev.read(5)
    except (AssertionError, zmq.ZMQError) as e:
        return f"{e!r}; warden status {dev.proc.poll()}"
    finally:
        dev.close()
    return None


def test_device_startup_under_cpu_load_never_dies_of_the_filter(
    cpu_hogs: None, spawn: Callable[..., SandboxedDevice]
) -> None:
    deaths = [death for death in (_death(spawn) for _ in range(SPAWNS)) if death]

    assert deaths == []
