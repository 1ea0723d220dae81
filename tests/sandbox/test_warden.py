"""The warden's own filter (policies/x86_64/warden.policy), loaded in a bare subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.sandbox.harness import REPO

pytestmark = pytest.mark.sandbox

# Loads the warden's filter on this process, then runs the statement in argv[1].
UNDER_WARDEN_FILTER = """
import os, sys
from splitvmm.sandbox import device as sandbox
from splitvmm.sandbox import policy
from splitvmm.native import confine
constants = {**policy.CONSTANTS, "SELF_PID": os.getpid()}
warden = policy.parse_file(policy.default_policy_dir() / "warden.policy", constants)
confine.set_no_new_privs()
policy.compile_filter(warden).load()
exec(sys.argv[1])
"""


def _run(statement: str) -> int:
    argv = [sys.executable, "-c", UNDER_WARDEN_FILTER, statement]
    return subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30).returncode


# SIGSYS (a device killed by its filter) takes the same path; it is left out because a
# warden killed by its own filter would look the same.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGABRT], ids=str)
def test_warden_filter_when_device_died_of_a_signal_lets_it_die_alike(sig: int) -> None:
    assert _run(f"sandbox.die_like({int(sig)})") == -sig  # a wait status: the signal


def test_warden_filter_when_device_exited_passes_its_status() -> None:
    assert _run("sandbox.die_like(3 << 8)") == 3  # a wait status: exit code 3


def test_warden_filter_when_it_signals_another_process_kills_it() -> None:
    assert _run("os.kill(os.getppid(), 0)") == -signal.SIGSYS


def test_warden_filter_when_it_opens_a_file_kills_it() -> None:
    assert _run("open('/etc/passwd')") == -signal.SIGSYS


def test_warden_filter_lets_its_interpreter_grow_its_heap() -> None:
    """A warden that needs memory after its filter is on (the heap grows: brk, mmap) goes
    on; it was killed for it once, and its death then hid how the device had ended."""
    assert _run("x = [bytearray(64) for _ in range(200000)]; sandbox.die_like(5 << 8)") == 5
