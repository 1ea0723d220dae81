"""restore.config_of: a restore keeps the snapshot's guest settings and takes every host
resource (output, socket, kernel, firmware) from the operator, never from the manifest."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from splitvmm import config
from splitvmm.cli import cli
from splitvmm.config import HOST_RESOURCES, MODEL_OPTIONS, config_to_dict
from splitvmm.devprocs.base import load_model
from splitvmm.devprocs.virtio_net import BARE_MAC, VirtioNet
from splitvmm.errors import ConfigError
from splitvmm.monitor import loader, machine, restore, vmstate
from splitvmm.monitor.pci import state as pcistate
from splitvmm.monitor.platform import GED_POWER_BUTTON, AcpiGed
from splitvmm.native.kvm import CpuidEntry
from splitvmm.protocol import codec
from splitvmm.protocol.models import MODELS
from splitvmm.sandbox.launcher import Launcher
from splitvmm.snapshot import Snapshot, SnapshotError
from splitvmm.snapshot.format import MAX_MANIFEST_BYTES
from tests.unit.snapshot_support import checksum_keys, edit_manifest
from tests.virtio.support import close_fds, host_fds, prepared

GOLDEN = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "vm" / "v1"


def golden(tmp_path: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Snapshot:
    """A copy of the golden VM snapshot (counter guest, kernel boot, serial0), edited."""
    path = tmp_path / "snap"
    shutil.copytree(GOLDEN, path)
    if edit is not None:
        edit_manifest(path, edit)
    return Snapshot.open(path)


def as_firmware(m: dict[str, Any]) -> None:
    m["vm_config"]["boot"] = {"firmware": "/home/op/.ssh/id_ed25519"}


def test_config_of_without_set_uses_stdio_and_no_kernel(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {})

    assert (cfg.devices[0].options, cfg.boot.kernel, cfg.boot.initrd, cfg.boot.firmware) == (
        {"output": "stdio"},
        None,
        None,
        None,
    )


def test_config_of_keeps_guest_settings(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {})

    assert (cfg.vm.name, cfg.vm.memory, cfg.boot.cmdline, cfg.devices[0].on_crash) == (
        "golden",
        16 << 20,
        "period=1000000 check=1",
        "stop",
    )


def test_config_of_set_output_is_the_only_output(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {"serial0.output": "unix:/run/op.sock"})

    assert cfg.devices[0].options["output"] == "unix:/run/op.sock"


def test_config_of_set_reaches_a_device_whose_name_holds_dots(tmp_path):
    """A device name may hold dots ("com.1", NAME_RE): --set splits at the last one."""
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(name="com.1"))

    cfg = restore.config_of(snap, {"com.1.output": "unix:/run/op.sock"})

    assert (cfg.devices[0].name, cfg.devices[0].options["output"]) == (
        "com.1",
        "unix:/run/op.sock",
    )


@pytest.mark.parametrize(
    "planted", ["/etc/cron.d/evil", "unix:/run/docker.sock", "stdio", "", 7, None]
)
def test_config_of_manifest_output_never_used(tmp_path, planted):
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(output=planted))

    assert restore.config_of(snap, {}).devices[0].options["output"] == "stdio"


def test_config_of_manifest_arming_a_fault_refused(tmp_path):
    """A crash-testing fault is the operator's to arm (`ctl inject-fault`, the config):
    the writer never stores one, so a manifest that does was made to."""
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(fault="crash:after=1"))

    with pytest.raises(SnapshotError, match="device 'serial0' arms a crash-testing fault"):
        restore.config_of(snap, {})


def test_config_of_manifest_kernel_and_initrd_dropped(tmp_path):
    snap = golden(
        tmp_path, lambda m: m["vm_config"]["boot"].update(kernel="/etc/shadow", initrd="/x")
    )

    cfg = restore.config_of(snap, {})

    assert (cfg.boot.kernel, cfg.boot.initrd) == (None, None)


@pytest.mark.parametrize("planted", ["{tmp}", "/nonexistent/snapshots"], ids=["here", "absent"])
def test_config_of_manifest_snapshot_dirs_dropped(tmp_path, planted):
    """Where the monitor may write (its Landlock rules, `ctl snapshot`'s targets) is the
    operator's to say (`restore --snapshot-dir`), never the snapshot's: and a directory the
    saving host had does not stop a restore on another."""
    where = planted.format(tmp=tmp_path)
    snap = golden(tmp_path, lambda m: m["vm_config"]["vm"].update(snapshot_dirs=[where]))

    assert restore.config_of(snap, {}).vm.snapshot_dirs == ()


def test_config_of_firmware_snapshot_without_set_refused_in_one_line(tmp_path):
    snap = golden(tmp_path, as_firmware)

    with pytest.raises(ConfigError) as e:
        restore.config_of(snap, {})

    assert str(e.value) == (
        "the snapshot is of a firmware-booted VM: name its firmware with --set "
        "boot.firmware=PATH (a snapshot's own host paths are never used)"
    )


def test_config_of_firmware_from_set_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = golden(tmp_path, as_firmware)

    cfg = restore.config_of(snap, {"boot.firmware": "fw.bin"})

    assert cfg.boot.firmware == tmp_path / "fw.bin"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("boot.firmware", "--set boot.firmware: the snapshot's VM booted a kernel, not firmware"),
        ("boot.kernel", "--set boot.kernel: a restore loads no kernel or initrd"),
        ("boot.initrd", "--set boot.initrd: a restore loads no kernel or initrd"),
        ("boot.cmdline", "--set boot.'cmdline': only boot.firmware can be set"),
        ("com1.output", "--set 'com1.output': no device 'com1' \\(devices: 'serial0'\\)"),
        ("serial0.path", "--set serial0.'path': not an option of device 'serial0'"),
        ("serial0.name", "--set serial0.'name': not an option"),
        ("serial0", "--set 'serial0': expected DEVICE.OPTION=VALUE"),
        (
            "vm.memory",
            "--set vm.'memory': only vm.track_dirty_pages, vm.device_uid, vm.device_gid can be set",
        ),
        ("vm.track_dirty_pages", "--set vm.track_dirty_pages: expected true or false"),
    ],
)
def test_config_of_bad_set_refused_naming_it(tmp_path, key, message):
    with pytest.raises(ConfigError, match=message):
        restore.config_of(golden(tmp_path), {key: "/tmp/x"})


def tracked(m: dict[str, Any]) -> None:
    m["vm_config"]["vm"]["track_dirty_pages"] = True


@pytest.mark.parametrize(("edit", "value"), [(None, "true"), (tracked, "false")])
def test_config_of_set_track_dirty_pages_overrides_the_saved_vms(tmp_path, edit, value):
    """What logging the guest's writes costs the host is the operator's to choose at a
    restore, as `up --restore` takes it from the operator's config: each value against a
    saved VM that had the other."""
    cfg = restore.config_of(golden(tmp_path, edit), {"vm.track_dirty_pages": value})

    assert cfg.vm.track_dirty_pages is (value == "true")


def test_config_of_set_device_user_runs_the_devices_as_it(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {"vm.device_uid": "64000", "vm.device_gid": "64001"})

    assert cfg.vm.device_user == (64000, 64001)


def names_a_device_user(m: dict[str, Any]) -> None:
    m["vm_config"]["vm"] |= {"device_uid": 1, "device_gid": 1}


def test_config_of_a_snapshot_that_names_a_device_user_is_not_taken_at_its_word(tmp_path):
    """A snapshot is untrusted input: which host user its devices run as is the operator's
    to say (--set), never the snapshot's (config_to_dict never writes it either)."""
    cfg = restore.config_of(golden(tmp_path, names_a_device_user), {})

    assert cfg.vm.device_user is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"vm.device_uid": "64000"}, "vm.device_uid: vm.device_gid must be set with it"),
        ({"vm.device_uid": "x", "vm.device_gid": "1"}, "--set vm.device_uid: expected an integer"),
        ({"vm.device_uid": "0", "vm.device_gid": "1"}, "vm.device_uid: 0 is outside"),
    ],
)
def test_config_of_bad_device_user_refused_naming_it(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        restore.config_of(golden(tmp_path), settings)


def test_config_of_empty_set_value_refused(tmp_path):
    with pytest.raises(ConfigError, match="--set 'serial0.output': the value is empty"):
        restore.config_of(golden(tmp_path), {"serial0.output": ""})


def test_config_of_set_on_crash_overrides_manifest(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {"serial0.on_crash": "leave"})

    assert cfg.devices[0].on_crash == "leave"


def test_config_of_set_on_crash_away_from_restart_drops_the_stored_budget(tmp_path):
    """A snapshot of a device with on_crash = "restart" stores its restart budget; a --set
    of another policy left it there, and the config's check then blamed the manifest
    ("snapshot ...: manifest vm_config: ... a restart budget needs on_crash = restart")."""
    snap = golden(
        tmp_path,
        lambda m: m["vm_config"]["device"][0].update(
            on_crash="restart", max_restarts=3, restart_window=10.0
        ),
    )

    cfg = restore.config_of(snap, {"serial0.on_crash": "stop"})

    assert cfg.devices[0].on_crash == "stop"


def test_config_of_manifest_on_crash_kept_when_valid(tmp_path):
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(on_crash="leave"))

    assert restore.config_of(snap, {}).devices[0].on_crash == "leave"


def test_config_of_manifest_on_crash_garbage_names_manifest(tmp_path):
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(on_crash="rm -rf"))

    with pytest.raises(SnapshotError, match=r"^manifest vm_config: device 'serial0'\.on_crash"):
        restore.config_of(snap, {})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "serial0.output",
            "~nosuchuser/x",
            r"^--set 'serial0\.output': device 'serial0'\.output: '~no",
        ),
    ],
)
def test_config_of_operators_bad_value_is_blamed_on_the_set_not_the_snapshot(
    tmp_path, key, value, message
):
    with pytest.raises(ConfigError, match=message):
        restore.config_of(golden(tmp_path), {key: value})


def test_host_resources_cover_every_model():
    assert set(HOST_RESOURCES) == set(MODEL_OPTIONS)
    for model, options in HOST_RESOURCES.items():
        assert set(options) <= set(MODEL_OPTIONS[model]), model


def test_config_of_new_model_resource_without_default_needs_set(tmp_path, monkeypatch):
    monkeypatch.setitem(
        config.MODEL_OPTIONS, "serial", {"output": (str, "stdio"), "path": (str, "")}
    )
    monkeypatch.setitem(config.HOST_RESOURCES, "serial", {"output": "stdio", "path": None})
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(path="/dev/sda"))

    with pytest.raises(ConfigError, match=r"device 'serial0': a restore needs --set serial0\.path"):
        restore.config_of(snap, {})


def test_config_of_new_model_resource_from_set_only(tmp_path, monkeypatch):
    monkeypatch.setitem(
        config.MODEL_OPTIONS, "serial", {"output": (str, "stdio"), "path": (str, "")}
    )
    monkeypatch.setitem(config.HOST_RESOURCES, "serial", {"output": "stdio", "path": None})
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"][0].update(path="/dev/sda"))

    cfg = restore.config_of(snap, {"serial0.path": "/srv/disk.img"})

    assert cfg.devices[0].options["path"] == "/srv/disk.img"


def test_config_of_restored_config_roundtrips_for_the_next_snapshot(tmp_path):
    cfg = restore.config_of(golden(tmp_path), {"serial0.output": "/tmp/o"})
    saved = config_to_dict(cfg)
    again = golden(tmp_path / "2", lambda m: m.update(vm_config=saved))

    assert restore.config_of(again, {}).boot == cfg.boot


def test_check_compatible_firmware_snapshot_with_kernel_config_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kernel_cfg = restore.config_of(golden(tmp_path / "k"), {})
    snap = golden(tmp_path / "f", as_firmware)

    with pytest.raises(SnapshotError, match="the snapshot's VM booted firmware, the config gives"):
        restore.check_compatible(snap, kernel_cfg)


def test_device_state_over_the_cap_refused_naming_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(restore, "MAX_DEVICE_STATE", 100)

    with pytest.raises(SnapshotError, match=r"chunk serial0 \(serial0.json\): device state of 145"):
        restore.device_state(golden(tmp_path), "serial0")


def test_device_state_newer_than_its_model_refused_naming_chunk(tmp_path):
    """Refused by the monitor, so `snapshot verify` (check_states) says so too."""
    path = golden(tmp_path).path
    doc = json.loads((path / "serial0.json").read_text())
    doc["version"] = MODELS["serial"].state_version + 1
    data = json.dumps(doc).encode()
    (path / "serial0.json").write_bytes(data)

    def newer(m: dict[str, Any]) -> None:
        entry = next(c for c in m["chunks"] if c["name"] == "serial0")
        entry.update(state_version=doc["version"], **checksum_keys(entry, data))

    edit_manifest(path, newer)

    newer_than = rf"chunk serial0 \(serial0.json\): state version {doc['version']} is newer"
    with pytest.raises(SnapshotError, match=newer_than):
        restore.check_states(Snapshot.open(path))


def test_config_of_set_value_of_the_wrong_choice_names_set_not_the_manifest(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set serial0\.on_crash: expected one of stop, rest"):
        restore.config_of(golden(tmp_path), {"serial0.on_crash": "bogus"})


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False)])
def test_config_of_set_bool_option_is_typed(tmp_path, monkeypatch, text, value):
    monkeypatch.setitem(
        config.MODEL_OPTIONS, "serial", {"output": (str, "stdio"), "quiet": (bool, False)}
    )

    cfg = restore.config_of(golden(tmp_path), {"serial0.quiet": text})

    assert cfg.devices[0].options["quiet"] is value


def test_config_of_set_bool_option_not_true_or_false_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(
        config.MODEL_OPTIONS, "serial", {"output": (str, "stdio"), "quiet": (bool, False)}
    )

    with pytest.raises(ConfigError, match=r"^--set serial0\.quiet: expected true or false"):
        restore.config_of(golden(tmp_path), {"serial0.quiet": "yes"})


def test_apply_restores_the_vm_before_its_vcpus_and_tells_them_they_stopped(monkeypatch):
    """The order tests/integration/test_vmstate_kvm.py shows a kvmclock guest needs (the VM's
    clock before the vCPUs' MSRs), then KVM_KVMCLOCK_CTRL on each vCPU before any runs."""
    calls: list[str] = []
    monkeypatch.setattr(vmstate.VcpuHost, "probe", staticmethod(lambda kvm, vm: "host"))
    monkeypatch.setattr(vmstate, "restore_vm", lambda vm, state: calls.append("vm"))
    monkeypatch.setattr(
        vmstate, "restore_vcpu", lambda fd, state, host: calls.append(f"vcpu{fd.vcpu_id}")
    )
    monkeypatch.setattr(vmstate, "tell_stopped", lambda fd: calls.append(f"told{fd.vcpu_id}"))
    monkeypatch.setattr(restore, "_boot_cpuid", lambda machine: [])
    fds = [SimpleNamespace(vcpu_id=0), SimpleNamespace(vcpu_id=1)]
    ged = AcpiGed(lambda: calls.append("interrupt"))
    machine = SimpleNamespace(mem=None, kvm=None, vm=None, vcpu_fds=fds, firmware=None, ged=ged)
    snap = SimpleNamespace(load_ram=lambda mem: calls.append("ram"))
    vcpu = SimpleNamespace(cpuid=())
    vm = SimpleNamespace(firmware=None, ged_events=GED_POWER_BUTTON)
    states = SimpleNamespace(vcpus=[vcpu, vcpu], vm=vm, pci=None)

    restore.apply(snap, states, machine)  # type: ignore[arg-type]

    # A power button pressed before the snapshot, not read by the guest yet: its event is
    # back, and its interrupt raised again once the LAPICs are (the saved one may have missed it)
    assert calls == ["ram", "vm", "vcpu0", "vcpu1", "told0", "told1", "interrupt"]
    assert ged.events == GED_POWER_BUTTON


@pytest.mark.parametrize(("in_ram", "copied"), [(False, True), (True, False)])
@pytest.mark.parametrize("named", [False, True])
def test_apply_copies_a_firmwares_shadow_only_into_a_snapshot_that_lacks_it(
    monkeypatch, tmp_path, in_ram, copied, named
):
    """A firmware VM saved before its shadow was RAM (a v2 vm chunk) had the image's tail
    mapped read-only below 1 MiB: its RAM holds nothing there, and the image is what the
    guest saw. One saved since holds what the firmware made of it, which stays. The image
    is taken when it is the one the state names (v4), or the state names none (before v4)."""
    calls: list[object] = []
    monkeypatch.setattr(vmstate.VcpuHost, "probe", staticmethod(lambda kvm, vm: "host"))
    monkeypatch.setattr(vmstate, "restore_vm", lambda vm, state: calls.append("vm"))
    monkeypatch.setattr(vmstate, "restore_vcpu", lambda fd, state, host: None)
    monkeypatch.setattr(vmstate, "tell_stopped", lambda fd: None)
    monkeypatch.setattr(restore, "_boot_cpuid", lambda machine: [])
    image = tmp_path / "bios.bin"
    image.write_bytes(bytes(64 * 1024 - 1) + b"\xea")
    mem = SimpleNamespace(write=lambda gpa, data: calls.append((gpa, len(data), data[-1])))
    machine = SimpleNamespace(
        mem=mem, kvm=None, vm=None, vcpu_fds=[SimpleNamespace(vcpu_id=0)],
        firmware=loader.load_firmware(image), firmware_id=vmstate.FirmwareId.of(image.read_bytes()),
        ged=AcpiGed(lambda: None),
    )  # fmt: skip
    snap = SimpleNamespace(load_ram=lambda mem: calls.append("ram"))
    firmware = vmstate.FirmwareId.of(image.read_bytes()) if named else None
    vm = SimpleNamespace(firmware_shadow=in_ram, firmware=firmware, ged_events=0)
    states = SimpleNamespace(vcpus=[SimpleNamespace(cpuid=())], vm=vm, pci=None)

    restore.apply(snap, states, machine)  # type: ignore[arg-type]

    shadow = [(0xF0000, 0x10000, 0xEA)] if copied else []
    assert calls == ["ram", *shadow, "vm"]


def firmware_machine(tmp_path: Path, data: bytes) -> SimpleNamespace:
    image = tmp_path / "bios.bin"
    image.write_bytes(data)
    firmware = loader.load_firmware(image)
    return SimpleNamespace(
        firmware=firmware, firmware_id=vmstate.FirmwareId.of(firmware.data), mem=None
    )


@pytest.mark.parametrize(
    "given",
    [
        bytes(64 * 1024 - 1) + b"\xeb",  # the same size, another byte
        bytes(128 * 1024 - 1) + b"\xea",  # another size: its ROM would start elsewhere
    ],
)
def test_restore_apply_refuses_another_firmware_before_loading_ram(tmp_path, given):
    saved = bytes(64 * 1024 - 1) + b"\xea"
    machine = firmware_machine(tmp_path, given)
    loaded: list[object] = []
    snap = SimpleNamespace(load_ram=loaded.append)
    vm = SimpleNamespace(firmware_shadow=True, firmware=vmstate.FirmwareId.of(saved))
    states = SimpleNamespace(vm=vm, pci=None)

    with pytest.raises(SnapshotError) as e:
        restore.apply(snap, states, machine)  # type: ignore[arg-type]

    assert str(e.value) == (
        f"chunk vm: the VM was saved running firmware of 65536 bytes, BLAKE3 "
        f"{vmstate.FirmwareId.of(saved).blake3.hex()[:16]}; boot.firmware "
        f"{tmp_path / 'bios.bin'} is {vmstate.FirmwareId.of(given)}: a restore runs the "
        f"image it was saved with"
    )
    assert loaded == []


class BootedVcpu:
    """vCPU 0 of the machine a restore builds: the CPUID KVM reads back once one is set."""

    vcpu_id = 0

    def __init__(self, read_back: list[CpuidEntry]) -> None:
        self.read_back = read_back
        self.set: list[CpuidEntry] = []

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self.set = entries

    def get_cpuid(self) -> list[CpuidEntry]:
        return self.read_back


@pytest.mark.parametrize(
    ("read_back", "warned"),
    [
        ([CpuidEntry(7, 0, 1, 0, 0, 0, 0)], True),
        # PVM answers KVM_GET_CPUID2 with the host's own table, whatever was set, so a
        # snapshot of it holds bits KVM_GET_SUPPORTED_CPUID lacks: compared with that, every
        # restore here warned. Compared with what a vCPU booted here reads back, none does.
        ([CpuidEntry(7, 0, 1, 0, 1 << 16, 0, 0)], False),
    ],
    ids=["lacking", "read-back-has-it"],
)
def test_apply_says_which_cpu_features_this_host_lacks(monkeypatch, caplog, read_back, warned):
    """Said, not refused (QEMU's way without `enforce`): the golden snapshots, made on an AMD
    host with AVX-512, restore here and their guest never uses those features."""
    monkeypatch.setattr(vmstate.VcpuHost, "probe", staticmethod(lambda kvm, vm: "host"))
    monkeypatch.setattr(vmstate, "restore_vm", lambda vm, state: None)
    monkeypatch.setattr(vmstate, "restore_vcpu", lambda fd, state, host: None)
    monkeypatch.setattr(vmstate, "tell_stopped", lambda fd: None)
    avx512 = CpuidEntry(7, 0, 1, eax=0, ebx=1 << 16, ecx=0, edx=0)
    kvm = SimpleNamespace(supported_cpuid=lambda: [], check_extension=lambda cap: 1)
    machine = SimpleNamespace(
        mem=None, kvm=kvm, vm=None, vcpu_fds=[BootedVcpu(read_back)], firmware=None,
        ged=AcpiGed(lambda: None),
    )  # fmt: skip
    vm = SimpleNamespace(firmware=None, ged_events=0)
    states = SimpleNamespace(vcpus=[SimpleNamespace(cpuid=(avx512,))], vm=vm, pci=None)

    restore.apply(SimpleNamespace(load_ram=lambda mem: None), states, machine)  # type: ignore[arg-type]

    said = "CPU features this host's KVM does not offer (leaf 0x7.0 ebx bits 0x10000)"
    assert (said in caplog.text) is warned


def test_verify_takes_a_stored_config_with_two_writable_disks(tmp_path):
    """`snapshot verify` parses the stored config as a restore would, with a stand-in for each
    host resource the operator names at a restore: one path for every disk made two writable
    disks share an image, and a valid snapshot failed, blaming a --set nobody gave."""
    disks = [{"name": f"disk{i}", "model": "virtio-blk", "path": f"/img/{i}"} for i in (0, 1)]
    snap = golden(tmp_path, lambda m: m["vm_config"]["device"].extend(disks))

    cfg = restore.config_of(snap, restore._stand_ins(snap))  # what verify parses

    assert [d.name for d in cfg.devices] == ["serial0", "disk0", "disk1", "rtc"]


def test_verify_refuses_a_stored_config_of_thousands_of_devices_before_parsing_them(tmp_path):
    """A 1 MiB manifest (under its cap) holds ~27000 devices: verify took ~30 s on loops
    quadratic in them before it refused anything. The count is refused first."""
    path = tmp_path / "snap"
    shutil.copytree(GOLDEN, path)
    doc = json.loads((path / "manifest.json").read_text())
    doc["vm_config"]["device"] = [{"name": f"d{i}", "model": "virtio-blk"} for i in range(26000)]
    data = json.dumps(doc, separators=(",", ":")).encode()
    assert len(data) <= MAX_MANIFEST_BYTES  # what any snapshot may hold
    (path / "manifest.json").write_bytes(data)

    result = CliRunner().invoke(cli, ["snapshot", "verify", str(path)])

    assert result.exit_code == 1 and "26000 devices; a VM has at most 64" in result.output
    assert len(result.output.splitlines()) == 1, result.output


@pytest.mark.parametrize("kind", ["fifo", "socket", "char-device"])
def test_restore_snapshot_dir_that_is_no_directory_is_refused_naming_the_option(tmp_path, kind):
    """Checked as a config's vm.snapshot_dirs is (config.snapshot_dirs), before anything is
    built: click's file_okay=False refused only a regular file, and a FIFO, a socket or
    /dev/null went on to the monitor, whose Landlock refused it after the devices were
    launched ("cannot confine the monitor with Landlock: [Errno 22] landlock_add_rule(
    '/dev/null'): Invalid argument", a device's traceback now and then), naming no option."""
    path = os.devnull
    if kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif kind == "socket":
        path = str(tmp_path / "sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
    argv = ["restore", str(GOLDEN), "--set", f"serial0.output={tmp_path / 'out'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", *argv, "--snapshot-dir", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"splitvmm: error: --snapshot-dir: {path} does not exist or is not a directory\n"
    )


def _add_chunk(snap: Path, kind: str, name: str, doc: Any, model: str | None = None) -> None:
    data = json.dumps(doc).encode()
    (snap / f"{name}.json").write_bytes(data)

    def add(m: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"kind": kind, "name": name, "state_version": 1,
                                 "file": f"{name}.json", "sha256": ""}  # fmt: skip
        if model is not None:
            entry["model"] = model
        entry["state_version"] = 2 if name == pcistate.CHUNK else 1
        entry.update(checksum_keys(entry, data))
        m["chunks"].append(entry)

    edit_manifest(snap, add)


def _pci(*functions: tuple[str, int]) -> dict[str, Any]:
    return {
        "functions": [
            {"name": n, "device": d, "bars": [0] * 6, "command": 0} for n, d in functions
        ],
        "msi_routes": [],
        "config_address": 0,
        "host_bridge": {"command": 0, "interrupt_line": 0},
    }


def _with_two_rngs(snap: Path) -> None:
    """The golden VM with two virtio-rng functions, rng0 at 00:01.0 and rng1 at 00:02.0, as
    a VM whose config lists them in that order has them."""
    fds = host_fds("virtio-rng")
    try:
        device = load_model("virtio-rng").from_options(prepared("virtio-rng", fds), {})
        device.quiesce()
        state = codec.state_document("virtio-rng", device.save())  # a fresh function's
    finally:
        close_fds(fds)
    for name in ("rng0", "rng1"):
        doc = {"model": "virtio-rng", "version": 1, "state": state["fields"]}
        _add_chunk(snap, "device", name, doc, model="virtio-rng")
    _add_chunk(snap, "vm", pcistate.CHUNK, _pci(("rng0", 1), ("rng1", 2)))
    edit_manifest(
        snap,
        lambda m: m["vm_config"]["device"].extend(
            [{"name": "rng0", "model": "virtio-rng"}, {"name": "rng1", "model": "virtio-rng"}]
        ),
    )


def test_restore_of_pci_devices_listed_in_another_order_is_refused_before_guest_ram(
    tmp_path, monkeypatch
):
    """An operator's config listing the snapshot's PCI devices in another order puts each
    at another device number than the guest's drivers know: pcistate refused it once guest
    RAM was loaded and the vCPUs set; restore.apply now asks pcistate.check() first."""
    path = tmp_path / "snap"
    shutil.copytree(GOLDEN, path)
    _with_two_rngs(path)
    snap = Snapshot.open(path)
    states = restore.decode_states(snap)
    loaded: list[object] = []
    monkeypatch.setattr(Snapshot, "load_ram", lambda self, mem: loaded.append(mem))
    placed = {"rng1": SimpleNamespace(device=1), "rng0": SimpleNamespace(device=2)}
    machine = SimpleNamespace(functions=placed, routes=SimpleNamespace(), mem=object())

    with pytest.raises(SnapshotError, match=r"chunk pci: .*no PCI device rng0 at 00:01\.0"):
        restore.apply(snap, states, machine)  # type: ignore[arg-type]
    assert loaded == []


VM_TOML = """
[vm]
name = "golden"
memory = "16M"
[boot]
kernel = "{kernel}"
[[device]]
name = "serial0"
model = "serial"
output = "{out}"
[[device]]
name = "net0"
model = "virtio-net"
tap = "tap0"
mac = ""
"""


def test_up_restore_of_a_snapshot_taken_before_with_mac_empty_keeps_the_saved_mac(
    tmp_path, monkeypatch
):
    """`mac = ""` is derived for an operator's config now, and was the model's bare MAC
    before: `up vm.toml --restore` of a snapshot taken then, with the vm.toml that made it,
    must give its device the MAC its saved state holds, as `splitvmm restore` does (a stored
    "" stays ""), or the device refuses the config ("mac is ... in the config")."""
    fds = host_fds("virtio-net")
    try:  # the device a release before bcc0fe9 started for mac = "": the bare MAC
        old = VirtioNet.from_options(prepared("virtio-net", fds), {"tap": "tap0", "mac": ""})
        old.quiesce()
        state = old.save()
        doc = codec.state_document("virtio-net", state)
        assert old.mac.hex(":") == BARE_MAC
        snap = tmp_path / "snap"
        shutil.copytree(GOLDEN, snap)
        # _add_chunk's version: the state as that release saved it, before the link (v2)
        v1_fields = {k: v for k, v in doc["fields"].items() if k != "link_up"}
        chunk = {"model": "virtio-net", "version": 1, "state": v1_fields}
        _add_chunk(snap, "device", "net0", chunk, model="virtio-net")
        _add_chunk(snap, "vm", "pci", _pci(("net0", 1)))
        edit_manifest(  # its stored config: config_to_dict kept the operator's ""
            snap,
            lambda m: m["vm_config"]["device"].append(
                {"name": "net0", "model": "virtio-net", "on_crash": "stop", "tap": "tap0",
                 "mac": ""}
            ),
        )  # fmt: skip
        config = tmp_path / "vm.toml"
        config.write_text(VM_TOML.format(kernel=tmp_path / "k.elf", out=tmp_path / "out.log"))

        seen = []
        monkeypatch.setattr(
            Launcher, "start", staticmethod(lambda: SimpleNamespace(close=lambda: None))
        )
        monkeypatch.setattr(
            machine, "run_vm",
            lambda cfg, snap, launcher: seen.append(cfg) or SimpleNamespace(status=0, message="ok"),
        )  # fmt: skip
        result = CliRunner().invoke(cli, ["up", str(config), "--restore", str(snap)])
        assert result.exit_code == 0, result.output
        (cfg,) = seen
        (net0,) = [d for d in cfg.devices if d.name == "net0"]

        # what the restored device process does with the config's options (runtime.py)
        restored = VirtioNet.restore(prepared("virtio-net", fds), state)
        restored.check_options(net0.options)  # ConfigError: "mac is 52:54:00:.. in the config"
    finally:
        close_fds(fds)


def test_verify_refuses_a_pci_chunk_the_stored_configs_vm_cannot_take(tmp_path):
    """verify said OK; `splitvmm restore` built KVM, loaded all of guest RAM, set the vCPUs,
    and only then refused it (pcistate.apply), as 5ecc5c6 fixed for the RAM regions."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)
    _add_chunk(snap, "vm", pcistate.CHUNK, _pci(("serial0", 3)))  # no PCI device at all

    verified = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])

    assert verified.exit_code == 1, verified.output
    assert (
        "chunk pci: PCI device 'serial0' was at 00:03.0; the config has no such" in verified.output
    )


def test_up_restore_with_pci_devices_in_another_order_is_refused_before_anything_is_built(
    tmp_path,
):
    """An operator's config listing the same PCI devices in another order: each would sit at
    another device number than the guest's drivers know. check_compatible (before KVM and
    RAM) let it through; pcistate.apply refused it once RAM was loaded."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)
    _with_two_rngs(snap)
    assert CliRunner().invoke(cli, ["snapshot", "verify", str(snap)]).exit_code == 0
    data = {
        "vm": {"name": "golden", "memory": "16M", "vcpus": 1},
        "boot": {"kernel": "/nonexistent/counter.elf"},
        "device": [
            {"name": "serial0", "model": "serial"},
            {"name": "rng1", "model": "virtio-rng"},
            {"name": "rng0", "model": "virtio-rng"},
        ],
    }
    cfg = config.parse_config(data, tmp_path, check_files=False)

    with pytest.raises(
        SnapshotError, match=r"'rng0' was at 00:01\.0; the config puts it at 00:02\.0"
    ):
        restore.check_compatible(Snapshot.open(snap), cfg)
