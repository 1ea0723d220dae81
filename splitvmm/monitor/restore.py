"""Restore: check a snapshot against the VM being built, then load it instead of booting.

Everything that can be wrong with a snapshot is found before any vCPU runs:
checksums (verify), memory size and layout, vCPU count, the device set and
models, and each state's decoding. The messages name the chunk.

A snapshot is untrusted input, its stored config included (no checksum covers it, and a
signature only says who wrote it): a restore takes no host resource from it. `up --restore`
uses the operator's config file alone; `restore` (config_of) keeps the stored config's guest
settings and replaces every host path, socket and image named by config.HOST_RESOURCES and
BOOT_RESOURCES with what the operator --set, or the model's restore default.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitvmm.config import (
    BOOT_RESOURCES,
    DEFAULT_DEVICES,
    HOST_RESOURCES,
    MODEL_OPTIONS,
    ON_CRASH,
    VmConfig,
    device_name_problem,
    parse_config,
)
from splitvmm.errors import ConfigError, StateError, clip, shown
from splitvmm.monitor import boot, cpuid, layout, vmstate
from splitvmm.monitor.pci import state as pcistate
from splitvmm.monitor.pci.root import device_numbers
from splitvmm.protocol.control import MAX_CONTROL
from splitvmm.protocol.models import MODELS, PciFunction
from splitvmm.record import Struct
from splitvmm.snapshot.format import SnapshotError
from splitvmm.snapshot.reader import Snapshot, format_size

log = logging.getLogger("splitvmm.restore")

# A device process reads its spec, saved state included, capped (protocol/spec.py
# MAX_SPEC): a bigger state must be refused here, in a sentence, not there, in a traceback.
MAX_DEVICE_STATE = MAX_CONTROL

if TYPE_CHECKING:
    from splitvmm.monitor.machine import Machine
    from splitvmm.native.kvm import CpuidEntry


def check_ram_layout(snap: Snapshot) -> None:
    """The snapshot's RAM regions must be those a VM of its RAM size has (layout.ram_ranges,
    which GuestMemory makes): else load_ram refuses them, after the VM is built."""
    size = snap.manifest.memory.size
    regions = [(r.gpa, r.size) for r in snap.manifest.memory.regions]
    if regions != layout.ram_ranges(size):
        listed = ", ".join(f"({gpa:#x}, {length:#x})" for gpa, length in regions[:4])
        more = ", ..." if len(regions) > 4 else ""
        raise SnapshotError(
            f"chunk ram: RAM regions [{listed}{more}] (guest address, size) are not those "
            f"of a VM with {format_size(size)} of RAM"
        )


def check_compatible(snap: Snapshot, cfg: VmConfig) -> None:
    """The config must describe the machine the snapshot was taken of (host paths may differ)."""
    check_ram_layout(snap)
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
    if firmware_booted(snap) != (cfg.boot.firmware is not None):
        booted, asks = ("firmware", "none") if firmware_booted(snap) else ("a kernel", "firmware")
        raise SnapshotError(f"the snapshot's VM booted {booted}, the config gives {asks}")
    saved = {c.name: c.model for c in snap.chunks if c.kind == "device"}
    wanted = {d.name: d.model for d in cfg.devices}
    for name in sorted(saved.keys() - wanted.keys()):
        raise SnapshotError(f"chunk {name}: the snapshot has device {name!r}, the config does not")
    for name in sorted(wanted.keys() - saved.keys() - set(added_defaults(snap, cfg))):
        raise SnapshotError(f"device {name!r} is in the config but not in the snapshot")
    for name, model in wanted.items():
        if name in saved and saved[name] != model:
            raise SnapshotError(
                f"chunk {name}: saved model {saved[name]!r}, the config says {model!r}"
            )
    _check_pci_numbers(snap, cfg)


def _check_pci_numbers(snap: Snapshot, cfg: VmConfig) -> None:
    """Each PCI device the snapshot saved at the number a VM of `cfg` gives it: a config
    that lists them in another order puts each at another number than the guest's drivers
    know. pcistate.check() refuses that too, once the VM is built; here `snapshot verify`
    and a restore refuse it before anything is."""
    state = _read_pci(snap)
    if state is None:
        return
    try:
        numbers = device_numbers(cfg.devices)
    except ConfigError as e:
        raise SnapshotError(f"the config: {e}") from None
    for saved in state.functions:
        now = numbers.get(saved.name)
        if now != saved.device:
            where = "has no such PCI device" if now is None else f"puts it at 00:{now:02x}.0"
            raise SnapshotError(
                f"chunk {pcistate.CHUNK}: PCI device {saved.name!r} was at "
                f"00:{saved.device:02x}.0; the config {where}"
            )
    missing = sorted(numbers.keys() - {saved.name for saved in state.functions})
    if missing:
        raise SnapshotError(
            f"chunk {pcistate.CHUNK}: no state for PCI device(s) {', '.join(missing)}"
        )


def added_defaults(snap: Snapshot, cfg: VmConfig) -> list[str]:
    """Default devices (a PC's RTC) the config has and the snapshot does not: it was taken
    by a release before the device became a default. They start fresh, as at power-on
    (the guest saw nothing at their ports before: all-ones)."""
    saved = {c.name for c in snap.chunks if c.kind == "device"}
    return [
        d.name
        for d in cfg.devices
        if d.name not in saved and DEFAULT_DEVICES.get(d.model) == d.name
    ]


def saved_device_state(snap: Snapshot, name: str) -> dict[str, object] | None:
    """device_state(), or None for a default device the snapshot predates."""
    if not any(c.kind == "device" and c.name == name for c in snap.chunks):
        return None
    return device_state(snap, name)


def stored_empty(snap: Snapshot) -> frozenset[str]:
    """The devices whose stored config says mac = "": saved by a release that gave such a
    NIC the model's own MAC (now "" is derived, as a mac not given is), which their saved
    state holds; `up --restore`'s config keeps its "" for them (config.parse_config). Only
    a "" is kept so: the saved device still checks the MAC it is given."""
    devices = snap.manifest.vm_config.get("device")
    if not isinstance(devices, list):
        return frozenset()
    return frozenset(
        d["name"]
        for d in devices
        if isinstance(d, dict) and isinstance(d.get("name"), str) and d.get("mac") == ""
    )


def firmware_booted(snap: Snapshot) -> bool:
    """Whether the stored config says the VM booted firmware. Untrusted like all of it: used
    only to ask the operator for a firmware path, or to refuse a config that has none."""
    boot = snap.manifest.vm_config.get("boot")
    return isinstance(boot, dict) and "firmware" in boot


def _split_key(key: str) -> tuple[str, str]:
    """(device or "boot", option): split at the last dot, since a device's name may hold
    dots (protocol/spec.py NAME_RE: "disk.0") and no option's does."""
    name, _, option = key.rpartition(".")
    if not name or not option:
        raise ConfigError(
            f"--set {shown(key)}: expected DEVICE.OPTION=VALUE, boot.firmware=PATH, "
            "vm.track_dirty_pages=true|false or vm.device_uid/device_gid=ID"
        )
    return name, option


def _set_boot(boot: dict[str, Any], option: str, value: str, firmware: bool) -> None:
    if option in ("kernel", "initrd"):
        raise ConfigError(
            f"--set boot.{option}: a restore loads no kernel or initrd (RAM has them)"
        )
    if option != "firmware":
        raise ConfigError(f"--set boot.{shown(option)}: only boot.firmware can be set")
    if not firmware:
        raise ConfigError("--set boot.firmware: the snapshot's VM booted a kernel, not firmware")
    boot["firmware"] = value


# [vm] keys that are the host's, not the saved machine's: what logging the guest's writes
# costs the host (a fault per page after each snapshot, 4 KiB pages on hardware KVM), and the
# host user the devices run as. The operator's to choose, as `up --restore` takes them from
# the operator's config; a stored config's are dropped (_restore_data).
VM_SETTABLE: dict[str, type] = {"track_dirty_pages": bool, "device_uid": int, "device_gid": int}
VM_HOST_ONLY = ("snapshot_dirs", "device_uid", "device_gid")  # never taken from a snapshot


def _set_vm(data: dict[str, Any], option: str, value: str) -> None:
    """A VM_SETTABLE key; nothing else of [vm] is settable (it is the saved machine's)."""
    kind = VM_SETTABLE.get(option)
    if kind is None:
        raise ConfigError(
            f"--set vm.{shown(option)}: only {', '.join(f'vm.{k}' for k in VM_SETTABLE)} can be set"
        )
    vm = data.get("vm")
    if not isinstance(vm, dict):  # the stored config's own fault, named when it is parsed
        return
    data["vm"] = {**vm, option: _typed(value, kind, f"--set vm.{option}")}


def _set_device(device: dict[str, Any], name: str, option: str, value: str) -> None:
    """The option's --set value, typed and checked here, so that a mistake names --set (the
    stored config's own values are checked after, naming the manifest)."""
    model = device.get("model")
    options = MODEL_OPTIONS.get(model, {}) if isinstance(model, str) else {}
    allowed = {*options, "on_crash"}
    if option not in allowed:
        raise ConfigError(
            f"--set {name}.{shown(option)}: not an option of device {name!r} "
            f"(options: {', '.join(sorted(allowed)) or 'none'})"
        )
    key = f"--set {name}.{option}"
    kind = options[option][0] if option in options else str
    typed = _typed(value, kind, key)
    descriptor = MODELS[model].options if isinstance(model, str) and model in MODELS else ()
    choices = (
        ON_CRASH
        if option == "on_crash"
        else next((o.choices for o in descriptor if o.name == option), ())
    )
    if choices and typed not in choices:
        raise ConfigError(
            f"{key}: expected one of {', '.join(map(str, choices))}, got {shown(value)}"
        )
    device[option] = typed
    if option == "on_crash" and typed != "restart":
        # the stored restart budget was the stored policy's: it goes with it (left, the
        # config's check blamed the snapshot's manifest for the operator's --set)
        device.pop("max_restarts", None)
        device.pop("restart_window", None)


def _typed(value: str, kind: type, key: str) -> object:
    """A --set value (always text) as the option's type: bool from true/false, int."""
    if kind is bool:
        if value not in ("true", "false"):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        return value == "true"
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}") from None
    return value


def _own_resources(device: dict[str, Any], set_keys: set[str]) -> None:
    """Drop the snapshot's host resources from a device's table; the operator's --set (applied
    later) or the model's restore default takes their place."""
    model, name = device.get("model"), device.get("name")
    if not isinstance(model, str) or model not in HOST_RESOURCES:
        return  # parse_config refuses the unknown model, naming it
    for option, default in HOST_RESOURCES[model].items():
        device.pop(option, None)
        if f"{name}.{option}" in set_keys:
            continue
        if default is None:
            if device_name_problem(name) is not None:
                continue  # no --set names it: parse_config refuses the name, naming the manifest
            raise ConfigError(f"device {shown(name)}: a restore needs --set {name}.{option}=...")
        device[option] = default


def _restore_data(snap: Snapshot, overrides: dict[str, str]) -> dict[str, Any]:
    """The stored config as plain tables, with no host resource of the snapshot's left in
    it: kernel, initrd and firmware paths and each model's HOST_RESOURCES options are dropped,
    and only the operator's --set values (or restore defaults) stand in their place.
    Shallow copies only: values are never changed, and a deep copy could recurse on them."""
    data = dict(snap.manifest.vm_config)
    boot, devices = data.get("boot"), data.get("device", [])
    if not isinstance(boot, dict) or not isinstance(devices, list):
        raise SnapshotError("manifest vm_config: no [boot] table or [[device]] list")
    firmware = firmware_booted(snap)
    data["boot"] = {k: v for k, v in boot.items() if k not in BOOT_RESOURCES}
    vm = data.get("vm")
    if isinstance(vm, dict):  # where the monitor may write (`restore --snapshot-dir`), and
        data["vm"] = {k: v for k, v in vm.items() if k not in VM_HOST_ONLY}  # who devices are
    data["device"] = [dict(d) if isinstance(d, dict) else d for d in devices]
    by_name: dict[str, dict[str, Any]] = {}
    for d in data["device"]:
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            if d["name"] in by_name:  # a --set would name the last alone: refused as the
                raise SnapshotError(  # config's check would (config.parse_config)
                    f"manifest vm_config: device {shown(d['name'])}: the name is used twice"
                )
            by_name[d["name"]] = d
    set_keys = set(overrides)  # once: a stored config may list thousands of devices
    for device in data["device"]:
        if isinstance(device, dict):
            if "fault" in device:  # the writer never stores it (config_to_dict)
                raise SnapshotError(
                    f"manifest vm_config: device {shown(device.get('name'), 40)} arms a "
                    "crash-testing fault, which no snapshot carries"
                )
            _own_resources(device, set_keys)
    for key, value in overrides.items():
        name, option = _split_key(key)
        if not value:
            raise ConfigError(f"--set {shown(key)}: the value is empty")
        if name == "boot":
            _set_boot(data["boot"], option, value, firmware)
        elif name == "vm":  # a reserved device name (config.RESERVED_NAME_RE)
            _set_vm(data, option, value)
        elif name in by_name:
            _set_device(by_name[name], name, option, value)
        else:
            names = ", ".join(shown(n, 40) for n in by_name) or "none"
            raise ConfigError(f"--set {shown(key)}: no device {shown(name)} (devices: {names})")
    if firmware and "firmware" not in data["boot"]:
        raise ConfigError(
            "the snapshot is of a firmware-booted VM: name its firmware with "
            "--set boot.firmware=PATH (a snapshot's own host paths are never used)"
        )
    return data


def working_dir() -> Path:
    """Where a restore takes its relative --set and --snapshot-dir paths from."""
    try:
        return Path.cwd()
    except OSError as e:  # getcwd() fails once the working directory is removed
        raise ConfigError(
            f"cannot find the working directory, which relative --set paths are taken from: "
            f"{e.strerror} (was it removed?)"
        ) from None


def config_of(snap: Snapshot, overrides: dict[str, str], base: Path | None = None) -> VmConfig:
    """The VM config to restore snap with (`splitvmm restore`): the stored config's guest
    settings, with host resources only from `overrides` (`--set DEVICE.OPTION=VALUE`,
    `--set boot.firmware=PATH`) or each model's restore default (serial output: stdio).
    Relative paths among them are taken from `base`, by default the working directory.

    The stored config is untrusted like the rest of the snapshot: parse_config checks its
    shape and every value, and any mistake names the manifest's vm_config."""
    data = _restore_data(snap, overrides)
    base = working_dir() if base is None else base
    try:
        return parse_config(data, base, check_files=False, restored=True)
    except ConfigError as e:
        key = _overridden(str(e), overrides)
        if key is not None:  # the operator's value, not the snapshot's, is at fault
            raise ConfigError(f"--set {shown(key)}: {clip(str(e))}") from None
        raise SnapshotError(f"manifest vm_config: {clip(str(e))}") from None


def _overridden(message: str, overrides: dict[str, str]) -> str | None:
    """The --set key whose option a config error names (parse_config's way of naming it:
    "device 'NAME'.OPTION: ..." or "boot.OPTION: ..."), or None."""
    for key in overrides:
        name, option = _split_key(key)
        named = f"{name}.{option}:" if name in ("boot", "vm") else f"device {name!r}.{option}:"
        if message.startswith(named):
            return key
    return None


def device_state(snap: Snapshot, name: str) -> dict[str, object]:
    """The `{model, version, fields}` document the device process restores from."""
    entry = snap.chunk(name)
    if entry.size > MAX_DEVICE_STATE:
        raise SnapshotError(
            f"{entry.label}: device state of {entry.size} bytes, over the {MAX_DEVICE_STATE} cap"
        )
    # Refused here, naming the chunk, as _read_state refuses a newer vCPU chunk: left to the
    # device process, `snapshot verify` said OK to what every restore then refuses.
    model = MODELS.get(entry.model or "")
    if model is not None and entry.state_version > model.state_version:
        raise SnapshotError(
            f"{entry.label}: state version {entry.state_version} is newer than this splitvmm "
            f"reads for model {entry.model!r} ({model.state_version}): upgrade splitvmm"
        )
    fields = snap.read_json(name)
    if not isinstance(fields, dict):
        raise SnapshotError(f"chunk {name}: device state is not an object")
    # Also measured as a device's state reply carries it (control.encode: compact, \u
    # escapes), which is how its spec carries it too: a file of raw UTF-8 under the cap
    # takes up to 3x that there, past MAX_SPEC, and was refused only at the spawn.
    sent = len(json.dumps(fields, separators=(",", ":")))
    if sent > MAX_DEVICE_STATE:
        raise SnapshotError(
            f"{entry.label}: device state of {sent} bytes as a device is sent it (JSON, "
            f"non-ASCII escaped), over the {MAX_DEVICE_STATE} cap"
        )
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
        return vmstate.from_dict(cls, snap.read_json(name), version=version)
    except StateError as e:
        raise SnapshotError(f"chunk {name}: {e}") from None


class SavedStates(Struct, frozen=True):
    vcpus: tuple[vmstate.VcpuState, ...]
    vm: vmstate.VmState
    pci: pcistate.PciState | None  # None: a snapshot from before the PCI platform


def decode_states(snap: Snapshot) -> SavedStates:
    """Every vCPU and VM chunk decoded and checked: done before the machine is built, so a
    bad chunk stops the restore before any process is spawned."""
    if snap.vcpu_count == 0:
        raise SnapshotError("no vCPU chunk: a VM has at least one vCPU")
    vcpus = tuple(_read_state(snap, f"vcpu{i}", vmstate.VcpuState) for i in range(snap.vcpu_count))
    # A release that read the LAPICs before the IOAPIC may have saved a pin waiting for an
    # EOI none of them will send: released, or it never delivers again once restored.
    vm = vmstate.release_orphaned_eois(_read_state(snap, "vm", vmstate.VmState), vcpus)
    return SavedStates(vcpus, vm, _read_pci(snap))


def check_states(snap: Snapshot) -> None:
    """What a restore checks of the states before any process runs (`snapshot verify`):
    every vCPU, VM and PCI chunk decoded, every device chunk a state document of its
    bounded size, and the stored config as `splitvmm restore` parses it. A device's fields
    are its model's to judge, in its sandboxed process."""
    decode_states(snap)
    check_ram_layout(snap)
    for chunk in snap.chunks:
        if chunk.kind == "device":
            device_state(snap, chunk.name)
    # The stored config, as `splitvmm restore DIR` takes it. `up CONFIG --restore` takes
    # CONFIG instead.
    try:
        # stand-ins are never opened: no working directory is needed (it may be gone)
        check_compatible(snap, config_of(snap, _stand_ins(snap), base=Path("/")))
    except (SnapshotError, ConfigError) as e:
        raise SnapshotError(f"{e} (`splitvmm restore` refuses it; `up CONFIG --restore` "
                            "would take CONFIG's instead)") from None  # fmt: skip


def _stand_ins(snap: Snapshot) -> dict[str, str]:
    """`--set` values for what a restore needs the operator to name (a firmware, a disk
    image, a TAP): stand-ins, never opened (config_of checks no file)."""
    stand_ins = {"boot.firmware": "stand-in"} if firmware_booted(snap) else {}
    numbers = itertools.count()
    devices = snap.manifest.vm_config.get("device")
    for device in devices if isinstance(devices, list) else []:
        if not isinstance(device, dict):
            continue  # config_of names it
        model, name = device.get("model"), device.get("name")
        if isinstance(name, str) and isinstance(model, str) and model in HOST_RESOURCES:
            for option, default in HOST_RESOURCES[model].items():
                if default is None:  # one each: two writable disks may not share an image
                    stand_ins[f"{name}.{option}"] = f"stand-in-{next(numbers)}"
    return stand_ins


def _read_pci(snap: Snapshot) -> pcistate.PciState | None:
    """The PCI platform's chunk; None for a snapshot from before it, which has no PCI device
    (without the chunk, where the guest moved their BARs and its MSI routes are unknown)."""
    if not any(c.name == pcistate.CHUNK and c.kind == "vm" for c in snap.chunks):
        on_pci = sorted(
            c.name
            for c in snap.chunks
            if c.kind == "device" and c.model in MODELS
            and isinstance(MODELS[c.model].transport, PciFunction)
        )  # fmt: skip
        if on_pci:
            raise SnapshotError(
                f"chunk {pcistate.CHUNK}: not in this snapshot, but its VM has PCI devices "
                f"({', '.join(on_pci)})"
            )
        return None
    try:
        return pcistate.decode(
            snap.read_json(pcistate.CHUNK), snap.chunk(pcistate.CHUNK).state_version
        )
    except StateError as e:
        raise SnapshotError(f"chunk {pcistate.CHUNK}: {e}") from None


def _check_firmware(saved: vmstate.VmState, machine: Machine) -> None:
    """The operator's firmware must be the image the VM was saved with: its ROM stays mapped
    at the top of 4 GiB, where the guest may be running it, and its size says where it starts.
    A state from before v4 does not say which image it was: any is taken, as before."""
    if machine.firmware is None or saved.firmware is None:
        return  # (a kernel boot; check_compatible refused a config of the other boot kind)
    given = machine.firmware_id
    if given != saved.firmware:
        raise SnapshotError(
            f"chunk vm: the VM was saved running firmware of {saved.firmware}; "
            f"boot.firmware {machine.firmware.path} is {given}: a restore runs the image "
            f"it was saved with"
        )


def apply(snap: Snapshot, states: SavedStates, machine: Machine) -> None:
    """Load RAM, vCPU and VM state into a freshly built (not yet running) machine."""
    if states.pci is not None:  # the PCI devices where the guest's drivers know them, first
        try:
            pcistate.check(states.pci, machine.functions, machine.routes)
        except StateError as e:
            raise SnapshotError(f"chunk {pcistate.CHUNK}: {e}") from None
    _check_firmware(states.vm, machine)
    snap.load_ram(machine.mem)
    if machine.firmware is not None and not states.vm.firmware_shadow:
        # Saved by a release that mapped the image's tail there read-only: RAM holds nothing
        # of it, and the image's bytes are what the guest saw.
        boot.write_shadow(machine.mem, machine.firmware)
    host = vmstate.VcpuHost.probe(machine.kvm, machine.vm)
    booted_here = _boot_cpuid(machine)
    # The VM's first (vmstate's docstring): its kvmclock must be back before the vCPUs' MSRs,
    # as KVM writes a kvmclock guest's wall clock into its RAM from it as the MSR is set.
    try:
        vmstate.restore_vm(machine.vm, states.vm)
    except (OSError, StateError) as e:
        raise SnapshotError(f"chunk vm: KVM refused the state: {e}") from None
    machine.ged.restore(states.vm.ged_events)  # (checked as the chunk was decoded)
    for fd in machine.vcpu_fds:
        name = f"vcpu{fd.vcpu_id}"
        state = states.vcpus[fd.vcpu_id]
        try:
            vmstate.restore_vcpu(fd, state, host)
        except (OSError, StateError) as e:
            raise SnapshotError(f"chunk {name}: KVM refused the state: {e}") from None
    for fd in machine.vcpu_fds:
        vmstate.tell_stopped(fd)  # the guest was stopped since it was saved
    # After the LAPICs are set (KVM_SET_LAPIC would drop an IRR bit set before it): an unread
    # power button press gets its interrupt, whether or not the saved states held one
    machine.ged.resend()
    if states.pci is not None:  # None: a snapshot from before the PCI platform (_read_pci)
        try:
            pcistate.apply(states.pci, machine.functions, machine.routes, machine.config_ports)
        except (OSError, StateError) as e:
            raise SnapshotError(f"chunk {pcistate.CHUNK}: {e}") from None
    # Said, not refused, as QEMU does without `enforce`: a guest that never uses them runs
    # (the golden snapshots, made on another host, do), one that does meets #UD. Said once
    # the VM's state is in, so that a restore refused on the way prints only its error.
    missing = cpuid.missing_on_host(states.vcpus[0].cpuid, booted_here)
    if missing:
        log.warning(
            "the restored guest was started with CPU features this host's KVM does not offer "
            "(%s): where it uses them it faults (#UD); restore it on a host that has them",
            "; ".join(missing),
        )


def _boot_cpuid(machine: Machine) -> list[CpuidEntry]:
    """The CPUID a vCPU booted here gets, as KVM reads it back: the table a restore compares
    the snapshot's with. Read back, not KVM_GET_SUPPORTED_CPUID: a host may answer
    KVM_GET_CPUID2 with other bits than it was set (PVM gives the host's own table,
    KVM-HERE.md), and a snapshot holds what KVM_GET_CPUID2 said. Set on vCPU 0 before its
    saved table replaces it (KVM takes a new one until the first KVM_RUN)."""
    vcpu = machine.vcpu_fds[0]
    cpuid.setup_cpuid(machine.kvm, vcpu, len(machine.vcpu_fds))
    return vcpu.get_cpuid()
