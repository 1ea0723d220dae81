"""A monitor whose stderr nobody reads: its log lines are dropped and counted, the VM runs on.

The operator's stderr is a pipe that is full before the VM starts (`splitvmm up ... 2>&1 |
slow`, a terminal stopped with Ctrl-S). With --log-level info the vCPU thread logs the guest's
unclaimed MMIO reads (monitor/bus.py), from the first one on: a log line that waited for room
in the pipe would stop that vCPU, and the guest would never finish its sweep.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.vmproc import REPO, env_for

pytestmark = pytest.mark.kvm

STRIDE = 0x10000000  # 256 MiB: a dozen unclaimed reads, each one a log line's worth
WAIT_S = 60  # for the guest's sweep, which takes well under a second when nothing stalls


def full_pipe() -> tuple[int, int]:
    """A pipe with no room left; its write end blocking again, as an operator's is."""
    return _filled(*os.pipe2(os.O_CLOEXEC))


def full_socket() -> tuple[int, int]:
    """The same with a stream socket (journald's stderr for a service): it is sent to."""
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return _filled(r.detach(), w.detach())


def _filled(r: int, w: int) -> tuple[int, int]:
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 4096)
    os.set_blocking(w, True)
    return r, w


@pytest.mark.parametrize("make", [full_pipe, full_socket], ids=["pipe", "socket"])
def test_monitor_log_when_stderr_is_full_drops_lines_and_the_guest_runs(guests, tmp_path, make):
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    kernel = guests["mmio-sweep"]
    config.write_text(
        vm_toml(f'kernel = "{kernel}"\ncmdline = "stride={STRIDE:#x}"', "64M", 1, serial)
    )
    r, w = make()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "--log-level", "info", "up", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=w,
        cwd=REPO,
        env=env_for(tmp_path),
    )
    os.close(w)
    try:
        deadline = time.monotonic() + WAIT_S
        done = None
        while done is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            text = serial.read_text(errors="replace") if serial.exists() else ""
            done = re.search(r"^mmio-sweep: done reads=\d+", text, re.M)
    finally:
        proc.terminate()  # the guest spins once done; the monitor ends the VM
        with os.fdopen(r, "rb") as stderr:  # room at last: the monitor's last lines come
            err = stderr.read().lstrip(b"x").decode(errors="replace")
        proc.wait()
    assert done is not None, f"the guest did not finish its sweep; monitor: {err[-800:]!r}"
    assert re.search(r"^splitvmm: \d+ log lines? dropped", err, re.M), err[-800:]
