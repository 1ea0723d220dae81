"""A guest reading every page of the PCI hole cannot grow the monitor's memory.

Each read is an unclaimed MMIO access: the monitor answers all-ones and counts it. What it
keeps about those accesses must not grow with the number of distinct addresses the guest picks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.vmproc import boot_guest

pytestmark = pytest.mark.kvm

STRIDE = 0x4000  # 16 KiB: ~250k distinct addresses between 64 MiB and 4 GiB, ~10 s here
# RSS may move a little (allocator, logging, ZeroMQ buffers); one record per address was
# ~14 MiB over this sweep (before the fix: 32.9 MB at 1/8 of it, 46.9 MB at its end).
RSS_SLACK_KIB = 4096


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def test_mmio_sweep_of_pci_hole_keeps_monitor_rss_flat(guests, tmp_path):
    # --log-level info: the monitor logs how many unclaimed accesses it answered, once a
    # second, which the assertion below shows should the guest's count be off
    vm = boot_guest(tmp_path, guests["mmio-sweep"], f"stride={STRIDE:#x}", ("--log-level", "info"))
    try:
        vm.wait_for(r"^mmio-sweep: 1/8\n", timeout=60)
        early = rss_kib(vm.proc.pid)
        # \n, not $: $ also matches at the end of the text, so a line the guest was still
        # printing matched with its last count cut short ("all-ones=25804" of 258046)
        done = vm.wait_for(r"^mmio-sweep: done reads=(\d+) all-ones=(\d+)\n", timeout=180)
        late = rss_kib(vm.proc.pid)
    finally:
        vm.proc.terminate()
        _, stderr = vm.finish()
    reads, all_ones = int(done[1]), int(done[2])
    seen = f"guest: {vm.text()[-300:]!r}; monitor: {stderr[-500:]!r}"  # if it fails
    assert reads == (4 << 30) // STRIDE - (64 << 20) // STRIDE
    # the in-kernel LAPIC and IOAPIC pages answer for themselves, and so does the host
    # bridge at the start of the ECAM window
    assert all_ones >= reads - 3, seen
    assert late - early < RSS_SLACK_KIB, f"monitor RSS grew from {early} to {late} KiB"
