"""Golden VM snapshots from released versions restore and the guest carries on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitvmm.monitor import restore
from splitvmm.native.kvm import Kvm
from splitvmm.snapshot.reader import Snapshot
from tests.integration.test_snapshot import PERIOD, assert_counts_continue
from tests.integration.vmproc import VmProcess

pytestmark = pytest.mark.kvm

GOLDENS = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "vm"
SAVED_COUNT = {"v1": 93_000_000}
TSC_TOLERANCE_PPM = 250


@pytest.mark.parametrize("version", sorted(SAVED_COUNT))
def test_golden_snapshot_decodes_fully(version):
    snap = Snapshot.open(GOLDENS / version)
    snap.verify()
    states = restore.decode_states(snap)
    assert (len(states.vcpus), snap.manifest.memory.size) == (1, 16 << 20)
    assert restore.device_state(snap, "serial0")["model"] == "serial"


@pytest.mark.parametrize("version", sorted(SAVED_COUNT))
def test_golden_snapshot_restores_and_counter_continues(version, tmp_path):
    assert PERIOD == 1_000_000  # the golden guest's period
    golden_khz = json.loads((GOLDENS / version / "vcpu0.json").read_text())["tsc_khz"]
    with Kvm() as kvm:
        here = kvm.default_tsc_khz()
    if abs(here - golden_khz) * 1_000_000 > golden_khz * TSC_TOLERANCE_PPM:
        pytest.skip(f"golden TSC {golden_khz} kHz, this host {here} kHz: KVM here cannot scale")
    snap = tmp_path / "snap"
    shutil.copytree(GOLDENS / version, snap)
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["restore", str(snap), "--set", f"serial0.output={serial}"], serial)
    vm.wait_for(r"^count=\d+ sum=.*\n(?:.*\n)?count=\d+ sum=")
    vm.proc.terminate()
    vm.finish()
    assert_counts_continue(vm.text(), SAVED_COUNT[version])
