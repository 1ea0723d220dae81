"""The monitor survives every way a device can misbehave on its channel, and names it."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import zmq

from splitvmm.errors import DeviceFailure
from splitvmm.monitor.devhost import DeviceHost, Spawn
from splitvmm.native.eventfd import EventFd
from tests.rogue_device import BEHAVIOURS

SCR = 7  # a read the real serial would answer at once


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def spawn_rogue(behaviour: str, zctx, tmp_path, failures: list[str]) -> DeviceHost:
    irq = EventFd()
    command = (sys.executable, "-m", "tests.rogue_device", behaviour)
    spawn = Spawn("rogue0", "serial", 8, {}, {"irq": irq.fd}, command=command)
    return DeviceHost(spawn, zctx, tmp_path, lambda host, reason: failures.append(reason))


@pytest.mark.parametrize(
    "behaviour,reason",
    [
        ("garbage", "unexpected reply"),
        ("oversized", "no reply within"),  # ZeroMQ drops the peer: the read times out
        ("wrong-seq", "unexpected reply"),
        ("unsolicited", "sent a frame nobody asked for"),
        ("silent", "no reply within"),
        ("wide-reply", "reply has data past its size"),
    ],
)
def test_rogue_reply_kills_device_and_monitor_goes_on(behaviour, reason, zctx, tmp_path, caplog):
    failures: list[str] = []
    host = spawn_rogue(behaviour, zctx, tmp_path, failures)
    try:
        host.wait_ready()
        if behaviour == "unsolicited":
            host.sock.poll(2000)  # let its flood arrive before we ask anything
        with caplog.at_level(logging.ERROR, logger="splitvmm.devhost"):
            first = host.read(SCR, 1)
            second = host.read(SCR, 1)  # a dead device reads as all-ones, without waiting
        host.proc.wait(timeout=5)
    finally:
        host.close()
    assert (first, second) == (b"\xff", b"\xff")
    assert len(failures) == 1 and reason in failures[0]
    assert f"device rogue0 (pid {host.pid}) failed" in caplog.text
    assert host.proc.returncode is not None  # killed, not left running


def test_rogue_ready_garbage_refuses_start(zctx, tmp_path):
    failures: list[str] = []
    host = spawn_rogue("bad-ready", zctx, tmp_path, failures)
    try:
        with pytest.raises(DeviceFailure, match="device rogue0: expected READY"):
            host.wait_ready()
    finally:
        host.close()


def test_all_rogue_behaviours_are_tested():
    tested = {
        "garbage",
        "oversized",
        "wrong-seq",
        "unsolicited",
        "silent",
        "wide-reply",
        "bad-ready",
    }
    assert tested == set(BEHAVIOURS)


def test_rogue_reads_from_many_threads_fail_once(zctx, tmp_path):
    failures: list[str] = []
    host = spawn_rogue("garbage", zctx, tmp_path, failures)
    try:
        host.wait_ready()
        threads = [threading.Thread(target=host.read, args=(SCR, 1)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        host.close()
    assert len(failures) == 1
