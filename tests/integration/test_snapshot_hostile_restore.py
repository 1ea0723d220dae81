"""Hostile snapshots through `splitvmm restore` and `up --restore` with KVM: the VM runs, and
nothing the snapshot names is created, connected to or read; what cannot run is refused in one
line. The fast suite with every attack is tests/unit/test_snapshot_hostile.py."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Saved, vm_toml
from tests.integration.vmproc import VmProcess, splitvmm
from tests.unit.snapshot_support import checksum_keys

pytestmark = pytest.mark.kvm

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- e2e-marker "
COUNT = r"^count=\d+$"


def hostile_copy(saved: Saved, tmp_path: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    snap = tmp_path / "snap"
    shutil.copytree(saved.snap, snap)
    path = snap / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return snap


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_bytes(SECRET.ljust(64 << 10, b"S"))  # firmware-sized: 64 KiB
    path.chmod(0o600)
    return path


def run_until_count(tmp_path: Path, args: list[str], out: Path, stdio: bool) -> str:
    """Run the VM until the guest prints a count line, stop it; the guest's output."""
    vm = VmProcess(tmp_path, args, out, stdio=stdio)
    vm.wait_for(COUNT)
    vm.proc.terminate()
    _, stderr = vm.finish()
    assert "Traceback" not in stderr
    return vm.text()


def assert_one_line_error(r, expected: str) -> None:
    """Exit 1 with one `splitvmm: error:` line (a device's refusal is also logged by its slot)."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("splitvmm: error: ")]
    assert (r.returncode, len(errors)) == (1, 1), r.stderr
    assert expected in errors[0] and "Traceback" not in r.stderr


def test_restore_manifest_output_file_is_never_created(saved, tmp_path):
    (tmp_path / "etc").mkdir()
    target = tmp_path / "etc" / "cron-evil"
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"]["device"][0].update(output=str(target))
    )

    console = run_until_count(tmp_path, ["restore", str(snap)], tmp_path / "console", stdio=True)

    assert "count=" in console and list((tmp_path / "etc").iterdir()) == []


def test_restore_manifest_unix_output_is_never_connected(saved, tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "op.sock"))
    listener.listen(1)
    listener.setblocking(False)
    output = f"unix:{tmp_path / 'op.sock'}"
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"]["device"][0].update(output=output)
    )

    run_until_count(tmp_path, ["restore", str(snap)], tmp_path / "console", stdio=True)

    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


def test_restore_firmware_snapshot_without_set_refused_secret_unread(saved, tmp_path):
    secret = secret_file(tmp_path)
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"].update(boot={"firmware": str(secret)})
    )

    r = splitvmm(tmp_path, "restore", str(snap))

    assert_one_line_error(r, "name its firmware with --set boot.firmware=PATH")
    assert b"e2e-marker" not in (r.stdout + r.stderr).encode()


def test_restore_firmware_snapshot_runs_with_operator_firmware(saved, guests, tmp_path):
    secret = secret_file(tmp_path)
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"].update(boot={"firmware": str(secret)})
    )
    args = ["restore", str(snap), "--set", f"boot.firmware={guests['firmware-hello']}"]

    console = run_until_count(tmp_path, args, tmp_path / "console", stdio=True)

    assert "count=" in console and "e2e-marker" not in console


def test_up_restore_takes_output_from_operator_config_only(saved, guests, tmp_path):
    (tmp_path / "etc").mkdir()
    planted = str(tmp_path / "etc" / "cron-evil")
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"]["device"][0].update(output=planted)
    )
    log, config = tmp_path / "op.log", tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{guests["counter"]}"', serial_out=log))

    run_until_count(tmp_path, ["up", str(config), "--restore", str(snap)], log, stdio=False)

    assert list((tmp_path / "etc").iterdir()) == []
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_restore_hostile_device_state_refused_by_device_in_one_line(saved, tmp_path):
    snap = tmp_path / "snap"
    shutil.copytree(saved.snap, snap)
    doc = json.loads((snap / "serial0.json").read_text())
    doc["state"]["rx"] = base64.b64encode(b"x" * 6000).decode()
    data = json.dumps(doc).encode()
    (snap / "serial0.json").write_bytes(data)
    hostile = hostile_copy(
        Saved(snap, saved.config, saved.key),
        tmp_path / "h",
        lambda m: (entry := next(c for c in m["chunks"] if c["name"] == "serial0")).update(
            checksum_keys(entry, data)
        ),
    )

    r = splitvmm(tmp_path, "restore", str(hostile))

    # The device refuses the state and exits; whether the monitor reads its reason before it
    # sees the exit is a race in DeviceSlot.wait_ready, so only the device is asserted here.
    assert_one_line_error(r, "splitvmm: error: device serial0: ")


def test_restore_signed_snapshot_with_its_key_runs(saved, tmp_path):
    args = ["restore", str(saved.snap), "--require-signature", str(saved.key)]

    console = run_until_count(tmp_path, args, tmp_path / "console", stdio=True)

    assert "count=" in console


@pytest.mark.parametrize("verb", ["restore", "up"])
def test_restore_signed_snapshot_edited_refused(saved, tmp_path, verb):
    snap = hostile_copy(
        saved, tmp_path, lambda m: m["vm_config"]["device"][0].update(on_crash="leave")
    )
    head = (
        ["restore", str(snap)]
        if verb == "restore"
        else ["up", str(saved.config), "--restore", str(snap)]
    )

    r = splitvmm(tmp_path, *head, "--require-signature", str(saved.key))

    assert_one_line_error(r, "manifest.sig: the signature does not match")


def test_restore_require_signature_unsigned_refused(saved, tmp_path):
    snap = hostile_copy(saved, tmp_path, lambda m: None)
    (snap / "manifest.sig").unlink()

    r = splitvmm(tmp_path, "restore", str(snap), "--require-signature", str(saved.key))

    assert_one_line_error(r, "manifest.sig: missing: the snapshot is not signed")


def test_restore_require_signature_other_key_refused(saved, tmp_path):
    other = tmp_path / "other.key"
    other.write_bytes(b"another key, 32 bytes long......")
    other.chmod(0o600)

    r = splitvmm(tmp_path, "restore", str(saved.snap), "--require-signature", str(other))

    assert_one_line_error(r, "the signature does not match")
