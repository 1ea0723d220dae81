"""Restore: check a snapshot against the VM being built, then load it instead of booting.

Everything that can be wrong with a snapshot is found before any vCPU runs:
checksums (verify), memory size and layout, vCPU count, the device set and
models, and each state's decoding. The messages name the chunk.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitvmm.config import VmConfig, parse_config
from splitvmm.errors import ConfigError, StateError
from splitvmm.monitor import vmstate
from splitvmm.snapshot.format import SnapshotError
from splitvmm.snapshot.reader import Snapshot, format_size

if TYPE_CHECKING:
    from splitvmm.monitor.machine import Machine


def check_compatible(snap: Snapshot, cfg: VmConfig) -> None:
    """The config must describe the machine the snapshot was taken of (host paths may differ)."""
    size = snap.manifest.memory.size
    if size != cfg.vm.memory:
        raise SnapshotError(
            f"chunk ram: snapshot has {format_size(size)} of RAM, the config asks "
            f"for {format_size(cfg.vm.memory)}"
        )
    if snap.vcpu_count != cfg.vm.vcpus:
        raise SnapshotError(
            f"snapshot has {snap.vcpu_count} vCPUs, the config asks for {cfg.vm.vcpus}"
        )
    saved = {c.name: c.model for c in snap.chunks if c.kind == "device"}
    wanted = {d.name: d.model for d in cfg.devices}
    for name in sorted(saved.keys() - wanted.keys()):
        raise SnapshotError(f"chunk {name}: the snapshot has device {name!r}, the config does not")
    for name in sorted(wanted.keys() - saved.keys()):
        raise SnapshotError(f"device {name!r} is in the config but not in the snapshot")
    for name, model in wanted.items():
        if saved[name] != model:
            raise SnapshotError(
                f"chunk {name}: saved model {saved[name]!r}, the config says {model!r}"
            )


def config_of(snap: Snapshot, overrides: dict[str, str]) -> VmConfig:
    """The VM config stored in the snapshot, with `device.key=value` host-resource overrides.

    The stored config is untrusted like the rest of the snapshot: parse_config checks its
    shape and every value, and any mistake names the manifest's vm_config."""
    data = copy.deepcopy(dict(snap.manifest.vm_config))
    boot = data.get("boot")
    devices_raw = data.get("device")
    if not isinstance(boot, dict) or not isinstance(devices_raw, list):
        raise SnapshotError("manifest vm_config: no [boot] table or [[device]] list")
    devices = {d.get("name"): d for d in devices_raw if isinstance(d, dict)}
    for key, value in overrides.items():
        name, _, option = key.partition(".")
        if name == "boot" and option in ("kernel", "initrd", "firmware"):
            boot[option] = value
        elif name in devices and option and option not in ("name", "model"):
            devices[name][option] = value
        else:
            raise ConfigError(f"--set {key}: expected DEVICE.OPTION or boot.firmware")
    try:
        return parse_config(data, Path("/"), check_files=False)
    except ConfigError as e:
        raise SnapshotError(f"manifest vm_config: {e}") from None


def device_state(snap: Snapshot, name: str) -> dict[str, object]:
    """The `{model, version, fields}` document the device process restores from."""
    entry = snap.chunk(name)
    fields = snap.read_json(name)
    if not isinstance(fields, dict):
        raise SnapshotError(f"chunk {name}: device state is not an object")
    return {"model": entry.model, "version": entry.state_version, "fields": fields}


def _read_state(snap: Snapshot, name: str, cls: Any) -> Any:
    """A vCPU or VM state chunk, upgraded from its recorded version, decoded strictly."""
    version = snap.chunk(name).state_version
    if version > cls.VERSION:
        raise SnapshotError(
            f"chunk {name}: state version {version} is newer than this splitvmm reads "
            f"({cls.VERSION}): upgrade splitvmm"
        )
    try:
        fields = cls.migrate(version, snap.read_json(name))
        return vmstate.from_dict(cls, fields)
    except StateError as e:
        raise SnapshotError(f"chunk {name}: {e}") from None


@dataclass(frozen=True, slots=True)
class SavedStates:
    vcpus: tuple[vmstate.VcpuState, ...]
    vm: vmstate.VmState


def decode_states(snap: Snapshot) -> SavedStates:
    """Every vCPU and VM chunk decoded and checked: done before the machine is built, so a
    bad chunk stops the restore before any process is spawned."""
    vcpus = tuple(_read_state(snap, f"vcpu{i}", vmstate.VcpuState) for i in range(snap.vcpu_count))
    return SavedStates(vcpus, _read_state(snap, "vm", vmstate.VmState))


def apply(snap: Snapshot, states: SavedStates, machine: Machine) -> None:
    """Load RAM, vCPU and VM state into a freshly built (not yet running) machine."""
    snap.load_ram(machine.mem)
    host = vmstate.VcpuHost.probe(machine.kvm, machine.vm)
    for fd in machine.vcpu_fds:
        name = f"vcpu{fd.vcpu_id}"
        state = states.vcpus[fd.vcpu_id]
        try:
            vmstate.restore_vcpu(fd, state, host)
        except (OSError, StateError) as e:
            raise SnapshotError(f"chunk {name}: KVM refused the state: {e}") from None
    try:
        vmstate.restore_vm(machine.vm, states.vm)
    except (OSError, StateError) as e:
        raise SnapshotError(f"chunk vm: KVM refused the state: {e}") from None
