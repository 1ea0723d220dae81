"""The monitor's side of a real serial device process: frames, input, output, death.

No /dev/kvm needed: the device gets an eventfd for its irq and a pipe for its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import zmq

from splitvmm.devprocs.serial import Lsr, Reg
from splitvmm.errors import DeviceFailure
from splitvmm.monitor.devhost import DeviceHost, Spawn
from splitvmm.monitor.supervisor import Supervisor
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol.spec import MAX_SPEC


class Harness:
    def __init__(self, tmp_path) -> None:
        self.irq = EventFd()
        self.out_r, self.out_w = os.pipe()
        self.failures: list[str] = []
        self.failed = threading.Event()
        self.zctx = zmq.Context()
        spawn = Spawn(
            "serial0", "serial", 8, {"output": "stdio"}, {"irq": self.irq.fd, "out": self.out_w}
        )
        self.host = DeviceHost(spawn, self.zctx, tmp_path, self._on_failure)
        self.host.wait_ready()

    def _on_failure(self, host: DeviceHost, reason: str) -> None:
        self.failures.append(reason)
        self.failed.set()

    def close(self) -> None:
        self.host.close()
        self.zctx.term()
        self.irq.close()
        os.close(self.out_r)
        os.close(self.out_w)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def test_devhost_thr_writes_reach_output_fd_in_order(harness):
    for byte in b"hi!":
        harness.host.write(Reg.RX_TX, bytes([byte]))
    assert harness.host.sync()
    assert os.read(harness.out_r, 16) == b"hi!"


def test_devhost_input_is_read_back_through_rbr(harness):
    harness.host.input(b"typed text")
    lsr = harness.host.read(Reg.LSR, 1)[0]
    received = b"".join(harness.host.read(Reg.RX_TX, 1) for _ in range(10))
    assert (lsr & Lsr.DR, received) == (Lsr.DR, b"typed text")


def test_devhost_rx_interrupt_signals_the_irq_eventfd(harness):
    harness.host.write(Reg.IER, b"\x01")
    harness.host.input(b"x")
    assert harness.host.sync()
    assert harness.irq.drain() == 1


def test_devhost_killed_device_is_reported_and_reads_all_ones(harness):
    supervisor = Supervisor([harness.host])
    supervisor.start()
    os.kill(harness.host.pid, signal.SIGKILL)
    assert harness.failed.wait(10)
    supervisor.close()
    assert harness.failures == ["process was killed by signal 9"]
    assert harness.host.read(Reg.SCR, 1) == b"\xff"


def test_devhost_channel_path_too_long_fails_cleanly(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    zctx = zmq.Context()
    irq = EventFd()
    spawn = Spawn("serial0", "serial", 8, {}, {"irq": irq.fd})
    with pytest.raises(DeviceFailure, match="longer than a UNIX socket allows"):
        DeviceHost(spawn, zctx, deep, lambda host, reason: None)
    zctx.term()  # nothing left open: term() would block forever on a leaked socket
    irq.close()


def test_device_spec_over_cap_exits_with_one_line_not_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm.devprocs"],
        input=b" " * (MAX_SPEC + 1),
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        f"splitvmm: device: the spec is over {MAX_SPEC} bytes\n".encode(),
    )
