"""A corrupt, truncated or mismatched snapshot: one clear error naming the chunk, before any
vCPU runs, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.vmproc import splitvmm

pytestmark = pytest.mark.kvm

CHUNK_FILES = ["ram.bin", "vcpu0.json", "vm.json", "serial0.json"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def edit_manifest(snap: Path, change) -> None:
    manifest = json.loads((snap / "manifest.json").read_text())
    change(manifest)
    (snap / "manifest.json").write_text(json.dumps(manifest))


def chunk(manifest: dict, name: str) -> dict:
    return next(c for c in manifest["chunks"] if c["name"] == name)


CASES = {
    **{f"flip-{f}": (lambda s, f=f: flip_byte(s / f), f.split(".")[0]) for f in CHUNK_FILES},
    **{f"truncate-{f}": (lambda s, f=f: truncate(s / f), f.split(".")[0]) for f in CHUNK_FILES},
    **{f"remove-{f}": (lambda s, f=f: (s / f).unlink(), f.split(".")[0]) for f in CHUNK_FILES},
    "format-version": (
        lambda s: edit_manifest(s, lambda m: m.update(format_version=99)),
        "snapshot format: version 99 is newer",
    ),
    "vcpu-state-version": (
        lambda s: edit_manifest(s, lambda m: chunk(m, "vcpu0").update(state_version=9)),
        "chunk vcpu0: state version 9 is newer",
    ),
    "device-state-version": (
        lambda s: edit_manifest(s, lambda m: chunk(m, "serial0").update(state_version=9)),
        "serial0",
    ),
    "manifest-not-json": (lambda s: (s / "manifest.json").write_text("{not json"), "manifest"),
    "manifest-missing": (lambda s: (s / "manifest.json").unlink(), "manifest"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_restore_corrupt_snapshot_fails_clearly_naming_chunk(saved, tmp_path, case):
    snap, config = saved.snap, saved.config
    broken = tmp_path / "broken"
    shutil.copytree(snap, broken)
    corrupt, names = CASES[case]
    corrupt(broken)
    r = splitvmm(tmp_path, "up", str(config), "--restore", str(broken))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"splitvmm: error: snapshot {broken}: "), r.stderr
    assert names in r.stderr, r.stderr


def test_restore_wrong_memory_size_names_ram_chunk(saved, tmp_path):
    snap, config = saved.snap, saved.config
    bigger = tmp_path / "vm.toml"
    bigger.write_text(config.read_text().replace('memory = "64M"', 'memory = "128M"'))
    r = splitvmm(tmp_path, "up", str(bigger), "--restore", str(snap))
    assert r.returncode == 1
    assert "chunk ram: snapshot has 64 MiB of RAM, the config asks for 128 MiB" in r.stderr


def test_restore_device_set_mismatch_names_device(saved, tmp_path):
    snap, config = saved.snap, saved.config
    renamed = tmp_path / "vm.toml"
    renamed.write_text(config.read_text().replace('name = "serial0"', 'name = "com1"'))
    r = splitvmm(tmp_path, "up", str(renamed), "--restore", str(snap))
    assert r.returncode == 1
    assert "serial0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["vm_config"].pop("boot"),
        lambda m: m["vm_config"].update(boot="kernel"),
        lambda m: m["vm_config"]["device"][0].pop("name"),
        lambda m: m["vm_config"]["vm"].update(vcpus="two"),
    ],
    ids=["no-boot", "boot-not-table", "device-without-name", "vcpus-not-int"],
)
def test_restore_corrupt_stored_config_names_manifest(saved, tmp_path, change):
    snap = saved.snap
    broken = tmp_path / "broken"
    shutil.copytree(snap, broken)
    edit_manifest(broken, change)
    r = splitvmm(tmp_path, "restore", str(broken))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "manifest vm_config" in r.stderr or "device" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def saved_with_pci(guests, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A counter guest with a virtio-rng function on its PCI bus, suspended once per module:
    (snapshot, config)."""
    from tests.integration.vmproc import VmProcess

    tmp = tmp_path_factory.mktemp("saved_pci")
    serial, config = tmp / "serial.log", tmp / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=1000000"'
    rng = '[[device]]\nname = "rng0"\nmodel = "virtio-rng"\n'
    config.write_text(vm_toml(boot, serial_out=serial) + rng)
    vm = VmProcess(tmp, ["up", str(config)], serial)
    vm.wait_for(r"^count=\d+$")
    assert vm.ctl("suspend", str(tmp / "snap")).returncode == 0
    assert vm.finish()[0] == 0
    return tmp / "snap", config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m.update(chunks=[c for c in m["chunks"] if c["name"] != "pci"]),
            r"chunk pci: not in this snapshot, but its VM has PCI devices \(rng0\)",
        ),
    ],
    ids=["pci-chunk-left-out"],
)
def test_restore_of_a_vm_with_pci_devices_needs_its_pci_chunk(
    saved_with_pci, tmp_path, change, message
):
    """Without it the guest's moved BARs and MSI routes are lost, and its driver hung."""
    snap, config = saved_with_pci
    broken = tmp_path / "broken"
    shutil.copytree(snap, broken)
    edit_manifest(broken, change)
    r = splitvmm(tmp_path, "up", str(config), "--restore", str(broken))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr
    verified = splitvmm(tmp_path, "snapshot", "verify", str(broken))
    assert verified.returncode != 0 and re.search(message, verified.stderr), verified.stderr
    ok = splitvmm(tmp_path, "snapshot", "verify", str(snap))
    assert ok.returncode == 0, ok.stderr  # the snapshot as taken is sound
