"""bench/memory.py: the VM's figure is the same measure as QEMU's (resident pages, each
counted once) and does not move with processes that are no part of the VM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import memory
from tests.guests.build import build_guests

pytestmark = pytest.mark.kvm


def the_vms_figure(use: memory.Usage) -> int:
    """What show() sets against QEMU for a VM: distinct resident pages where the bench has
    them, else its sum of PSS."""
    return use.resident or use.pss  # PSS only where pagemap gives no frame numbers (not root)


@pytest.fixture(scope="module")
def idle_image(tmp_path_factory) -> Path:
    return build_guests(tmp_path_factory.mktemp("guests"))["firmware-idle"]


IDLE_PYTHON = "import splitvmm.cli, splitvmm.cli.up, splitvmm.monitor.machine, time; time.sleep(60)"


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap gives frame numbers to root only")
def test_the_vms_figure_does_not_move_with_unrelated_processes(monkeypatch, tmp_path, idle_image):
    """The same kind of VM measured twice, the second time with six idle interpreters on the
    host that are no part of it: the figure set against QEMU's must be the same (within 2%)."""
    figures = []
    for others in (0, 6):
        started = [subprocess.Popen([sys.executable, "-c", IDLE_PYTHON]) for _ in range(others)]
        try:
            time.sleep(2 if others else 0)
            roles = memory.measure_splitvmm(tmp_path, idle_image, None)
        finally:
            for p in started:
                p.kill()
                p.wait()
        figures.append(the_vms_figure(roles["total"]))
    assert figures[1] == pytest.approx(figures[0], rel=0.02), figures
