"""Golden VM snapshots from released versions restore and the guest carries on."""

from __future__ import annotations

import hashlib
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


@pytest.mark.parametrize("version", sorted(SAVED_COUNT))
def test_golden_snapshot_decodes_fully(version):
    snap = Snapshot.open(GOLDENS / version)
    snap.verify()
    states = restore.decode_states(snap)
    assert (len(states.vcpus), snap.manifest.memory.size) == (1, 16 << 20)
    assert restore.device_state(snap, "serial0")["model"] == "serial"


@pytest.mark.parametrize("version", sorted(SAVED_COUNT))
def test_golden_snapshot_restores_and_counter_continues(version, tmp_path):
    """The copy is re-targeted to this host's TSC rate first: on most hosts it differs from
    the golden's, KVM here cannot scale it and restore would refuse; this way everything
    but TSC scaling is checked on every host (the same path whatever the host's rate)."""
    assert PERIOD == 1_000_000  # the golden guest's period
    snap = tmp_path / "snap"
    shutil.copytree(GOLDENS / version, snap)
    with Kvm() as kvm:
        retarget_tsc(snap, "vcpu0", kvm.default_tsc_khz())
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["restore", str(snap), "--set", f"serial0.output={serial}"], serial)
    vm.wait_for(r"^count=\d+ sum=.*\n(?:.*\n)?count=\d+ sum=")
    vm.proc.terminate()
    vm.finish()
    assert_counts_continue(vm.text(), SAVED_COUNT[version])


def retarget_tsc(snap: Path, chunk: str, khz: int) -> None:
    """Rewrite a vCPU chunk's TSC rate and its size and checksum in the manifest."""
    path = snap / f"{chunk}.json"
    state = json.loads(path.read_text())
    state["tsc_khz"] = khz
    data = json.dumps(state).encode()
    path.write_bytes(data)
    manifest = json.loads((snap / "manifest.json").read_text())
    entry = next(c for c in manifest["chunks"] if c["name"] == chunk)
    entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(manifest))


def test_retarget_tsc_keeps_the_snapshot_valid(tmp_path):
    snap = tmp_path / "snap"
    shutil.copytree(GOLDENS / "v1", snap)

    retarget_tsc(snap, "vcpu0", 1_234_567)

    copy = Snapshot.open(snap)
    copy.verify()
    assert restore.decode_states(copy).vcpus[0].tsc_khz == 1_234_567
