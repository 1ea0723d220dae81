"""A VM whose stderr nobody reads: the monitor's log lines and the launcher's are dropped and
counted, the VM runs on.

The operator's stderr is a pipe that is full before the VM starts (`splitvmm up ... 2>&1 |
slow`, a terminal stopped with Ctrl-S). With --log-level info the vCPU thread logs the guest's
unclaimed MMIO reads (monitor/bus.py), from the first one on: a log line that waited for room
in the pipe would stop that vCPU, and the guest would never finish its sweep. The launcher
writes there too, what a device writes to its stderr and what it says itself: a line that
waited would stop it, and with it every restart of a device.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.test_crash import (
    parent_of,
    serial_device,
    start_counter,
    wait_back,
    wait_spare,
    zygotes_of,
)
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


def a_device_writes_a_line(tmp_path: Path) -> None:
    """The serial device writes a line to its stderr (a warning, a traceback), which the
    launcher relays (sandbox/relay.py): written into that pipe as the device would
    (test_confinement.py)."""
    warden = int(serial_device(tmp_path)["pid"])  # type: ignore[call-overload]
    fd = os.open(f"/proc/{warden}/fd/2", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"WARNING what a device has to say\n")
    finally:
        os.close(fd)


def the_zygote_dies(tmp_path: Path) -> None:
    """The zygote is killed: the launcher says so when the next spawn (the warm spare that
    follows a restart) starts a new one."""
    launcher = parent_of(int(serial_device(tmp_path)["pid"]))  # type: ignore[call-overload]
    wait_spare(tmp_path)  # forked: the zygote is idle from here on
    (zygote,) = zygotes_of(launcher, tmp_path)
    os.kill(zygote, signal.SIGKILL)


def fill(r: int) -> None:
    """Fill the pipe whose read end is `r`, through a non-blocking write end of our own."""
    w = os.open(f"/proc/self/fd/{r}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 4096)
    os.close(w)


@pytest.mark.parametrize("line", [a_device_writes_a_line, the_zygote_dies], ids=["relay", "say"])
def test_launcher_line_when_stderr_is_full_is_dropped_and_devices_restart(guests, tmp_path, line):
    """The monitor asks the launcher for every restart (sandbox/launcher.py). A line it waited
    to write would keep it from serving them: a killed serial device would not come back, and
    the guest would stop at its next access to it."""
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        assert vm.proc.stderr is not None
        fill(vm.proc.stderr.fileno())  # nobody reads it from here on, until stop()
        line(tmp_path)
        for generation in (2, 3):  # the spare takes over; the next needs a spawn
            os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            wait_back(tmp_path, generation)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))
    finally:
        _, err = vm.stop()
    err = err.lstrip("x")
    assert re.search(r"^splitvmm: \d+ launcher lines? dropped", err, re.M), err[-800:]
