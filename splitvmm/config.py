"""The VM config file (TOML) -> frozen records (msgspec Structs), with an error naming the key for every mistake.

[vm]      name, memory ("64M", "2G"), vcpus, cpuid_mask (list of "leaf[.sub].reg:bits"),
          snapshot_dirs (where `ctl snapshot` may write: the monitor can reach nothing else),
          track_dirty_pages (KVM logs the guest's writes, so that `ctl snapshot` pauses only
          for what it wrote while its RAM was copied: monitor/dirtylog.py)
          device_uid and device_gid (the host user and group every device process runs as,
          outside its user namespace: a monitor run as root otherwise runs them as root)
[boot]    kernel (bzImage or ELF) [+ initrd, cmdline], or firmware (flat binary)
[[device]] name, model, on_crash ("stop", "restart" or "leave"), max_restarts and
          restart_window (the restart budget: at most max_restarts restarts within any
          restart_window, seconds or "10s"/"500ms"; then the VM stops), and the model's own
          options
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from splitvmm import hostpath
from splitvmm.errors import ConfigError, escaped
from splitvmm.protocol import faults
from splitvmm.protocol.models import (
    MODELS,
    UNIX_OUTPUT,
    FdKind,
    PortWindow,
    unix_output_path,
)
from splitvmm.protocol.spec import HOST_IDS, MAX_DEVICES, NAME_RE, NAME_RULE, RUNTIME_DIR_NAMES
from splitvmm.record import Struct, field

# xAPIC IDs are 8 bits and 0xFF is broadcast; cloud-hypervisor's limit too. (It once left an
# ID after the vCPUs' for the IOAPIC, which now has ID 0, the one its register holds:
# monitor/layout.py IOAPIC_ID.) The one limit: monitor/cpuid.py and monitor/mptable.py check
# against it.
MAX_VCPUS = 254
MIN_MEMORY = 16 << 20
MAX_MEMORY = 1 << 40
ON_CRASH = ("stop", "restart", "leave")
# The restart budget's defaults are systemd's (StartLimitBurst=5 in StartLimitIntervalSec=10s).
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 10.0
MAX_RESTARTS = 1_000_000
MAX_RESTART_WINDOW_S = 86400.0
DURATION_RE = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m)?$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
# A VM's or a device's name: NAME_RE, from protocol/spec.py (the launcher checks it too).
# A snapshot's chunks are named by device name, beside the monitor's own and its manifest: no
# device may take one of theirs (the writer would refuse it only once guest RAM is copied).
RESERVED_NAME_RE = re.compile(r"ram|vm|pci|vcpu[0-9]+|manifest")
# At most 16 digits: 1T in bytes has 13, and int() of a 5000-digit string raises ValueError.
SIZE_RE = re.compile(r"^(\d{1,16})\s*([KMGT]i?B?)?$", re.IGNORECASE)
# A config is a few hundred bytes; the cap keeps a huge or stack-deep file from reaching tomllib.
MAX_CONFIG_BYTES = 1 << 20
MAX_SNAPSHOT_DIRS = 16  # each is a Landlock rule of the monitor's
MAX_CPUID_MASKS = 64  # more leaves than any CPU reports
MAX_CPUID_MASK_CHARS = 64  # "0x80000008.0xffffffff.ecx:0xffffffff" is 36
MAX_SHOWN = 40  # characters of a bad value quoted in an error message
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

# Each device model's options: name -> (type, default), from its descriptor (protocol/models.py).
MODEL_OPTIONS: dict[str, dict[str, tuple[type, object]]] = {
    m.name: {o.name: (o.kind, o.default) for o in m.options} for m in MODELS.values()
}
ALWAYS_ALLOWED = {"name", "model", "on_crash", "max_restarts", "restart_window", "fault"}

# Options that name a host resource (a file, socket, disk image, TAP). A snapshot is untrusted,
# so a restore never takes one from its manifest: the operator names each (the config given to
# `up --restore`, or `restore --set DEVICE.OPTION=VALUE`). Per model: option -> what `restore`
# uses when not --set, or None when the operator must name it (a disk image: no safe default).
# Every model has an entry, empty if it holds no host resource.
HOST_RESOURCES: dict[str, dict[str, str | None]] = {
    m.name: {o.name: o.restore_default for o in m.options if o.host_resource}
    for m in MODELS.values()
}
# Models every VM has unless `[vm] <model> = false` (the PC's RTC): model -> device name.
DEFAULT_DEVICES = {m.name: m.default_device for m in MODELS.values() if m.default_device}
# [boot] keys naming host files. A restore loads no kernel or initrd (guest RAM holds them);
# a firmware-booted VM maps its firmware again, from the path the operator --set.
BOOT_RESOURCES = ("kernel", "initrd", "firmware")


class VmSection(Struct, frozen=True):
    name: str
    memory: int  # bytes
    vcpus: int
    cpuid_mask: tuple[str, ...] = ()
    # Host directories `ctl snapshot`/`suspend` may write into (Landlock grants only these).
    snapshot_dirs: tuple[Path, ...] = ()
    # KVM logs the vCPUs' writes to RAM for the VM's life (monitor/dirtylog.py)
    track_dirty_pages: bool = False
    # The host (uid, gid) its devices run as (sandbox/device.py); None: the monitor's own.
    device_user: tuple[int, int] | None = None


class BootSection(Struct, frozen=True):
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None


class DeviceSection(Struct, frozen=True):
    name: str
    model: str
    on_crash: str = "stop"
    options: dict[str, Any] = field(default_factory=dict)
    max_restarts: int = DEFAULT_MAX_RESTARTS  # on_crash = "restart": its budget
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    fault: dict[str, Any] | None = None  # crash testing (protocol/faults.py): first process only


class VmConfig(Struct, frozen=True):
    vm: VmSection
    boot: BootSection
    devices: tuple[DeviceSection, ...]
    source: Path | None = None


def shown(value: object) -> str:
    """repr(value) cut to MAX_SHOWN characters: an error message stays one short line."""
    if isinstance(value, int) and abs(value) >= 10**MAX_SHOWN:  # str() of a huge int is slow
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def parse_size(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f'{key}: expected a size such as "512M" or "2G", got {shown(value)}')
    return int(m.group(1)) * SIZE_UNITS[(m.group(2) or "")[:1].upper()]


def _get(table: dict[str, Any], key: str, where: str, kind: type, default: object = None) -> Any:
    if key not in table:
        if default is None:
            raise ConfigError(f"{where}.{key}: missing (expected {kind.__name__})")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {shown(value)}"
        )
    return value


def _int(table: dict[str, Any], key: str, where: str, bounds: range, default: int) -> int:
    value: int = _get(table, key, where, int, default)
    if value not in bounds:
        raise ConfigError(
            f"{where}.{key}: {shown(value)} is outside {bounds.start}..{bounds.stop - 1}"
        )
    return value


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {shown(value)}")
    return value


def _reject_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {shown(unknown[0])} (allowed: {', '.join(sorted(allowed))})"
        )


VM_KEYS = {
    "name", "memory", "vcpus", "cpuid_mask", "snapshot_dirs", "track_dirty_pages",
    "device_uid", "device_gid", *DEFAULT_DEVICES,
}  # fmt: skip


def _parse_vm(table: dict[str, Any], base: Path) -> VmSection:
    _reject_unknown(table, VM_KEYS, "vm")
    name = _get(table, "name", "vm", str, "vm")
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"vm.name: {shown(name)} must be {NAME_RULE}")
    memory = parse_size(table.get("memory", "256M"), "vm.memory")
    if not MIN_MEMORY <= memory <= MAX_MEMORY or memory % 4096:
        raise ConfigError(
            f"vm.memory: expected a multiple of 4 KiB from 16M to 1T, got {shown(memory)} (bytes)"
        )
    vcpus = _int(table, "vcpus", "vm", range(1, MAX_VCPUS + 1), 1)
    mask = _get(table, "cpuid_mask", "vm", list, [])
    if len(mask) > MAX_CPUID_MASKS or not all(
        isinstance(m, str) and len(m) <= MAX_CPUID_MASK_CHARS for m in mask
    ):
        raise ConfigError(
            f'vm.cpuid_mask: expected at most {MAX_CPUID_MASKS} strings like "1.ecx:0x80000000"'
        )
    tracked = _get(table, "track_dirty_pages", "vm", bool, False)
    return VmSection(
        name, memory, vcpus, tuple(mask), _snapshot_dirs(table, base), tracked, _device_user(table)
    )


def _device_user(table: dict[str, Any]) -> tuple[int, int] | None:
    """vm.device_uid and vm.device_gid, both or neither: a device whose uid is dropped but
    whose gid stays the monitor's (root's group) would keep what that group may reach."""
    given = [key for key in ("device_uid", "device_gid") if key in table]
    if not given:
        return None
    if len(given) == 1:
        other = "device_gid" if given[0] == "device_uid" else "device_uid"
        raise ConfigError(f"vm.{given[0]}: vm.{other} must be set with it")
    uid = _int(table, "device_uid", "vm", HOST_IDS, 0)
    gid = _int(table, "device_gid", "vm", HOST_IDS, 0)
    return uid, gid


def _snapshot_dirs(table: dict[str, Any], base: Path) -> tuple[Path, ...]:
    raw = _get(table, "snapshot_dirs", "vm", list, [])
    if len(raw) > MAX_SNAPSHOT_DIRS or not all(isinstance(d, str) and d for d in raw):
        raise ConfigError(
            f"vm.snapshot_dirs: expected a list of at most {MAX_SNAPSHOT_DIRS} directory paths"
        )
    return snapshot_dirs(raw, base)


def snapshot_dirs(
    paths: Sequence[str], base: Path, where: str = "vm.snapshot_dirs"
) -> tuple[Path, ...]:
    """The directories `ctl snapshot` may write to, resolved against `base`, as the monitor's
    Landlock rules will name them: each must be a directory (a FIFO, a socket or a device
    made landlock_add_rule fail once the devices were on their way up), for a restore's
    --snapshot-dir too. ConfigError naming `where`."""
    dirs = tuple(_host_path(base, d, where, resolve=True) for d in paths)
    for d in dirs:
        if not stat.S_ISDIR(_mode(d, where)):
            raise ConfigError(f"{where}: {d} does not exist or is not a directory")
    return dirs


def _host_path(base: Path, value: str, where: str, resolve: bool = False) -> Path:
    """`value` (~ expanded) relative to the config's directory; a ConfigError naming `where`
    for what no path can be (a NUL byte, an unknown ~user, a symlink loop)."""
    if not value:  # pathlib takes it as ".": the config's directory, named as the culprit
        raise ConfigError(f"{where}: an empty path")
    if "\0" in value:  # pathlib takes it; every system call would refuse it
        raise ConfigError(f"{where}: {shown(value)} is no usable path: it holds a NUL byte")
    try:
        path = base / Path(value).expanduser()
        return path.resolve() if resolve else path
    except (ValueError, RuntimeError, OSError) as e:  # NUL; ~nobody, symlink loop; ELOOP
        raise ConfigError(f"{where}: {shown(value)} is no usable path: {e}") from None


def _mode(path: Path, where: str) -> int:
    """path's st_mode (symlinks followed), 0 if nothing is there. A ConfigError naming `where`
    where stat() fails otherwise (a name too long, a directory on the way not searchable),
    which Path.is_file() and is_dir() raise as a bare OSError."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0
    except OSError as e:
        raise ConfigError(f"{where}: {shown(str(path))} cannot be used: {e.strerror}") from None


def _option_path(base: Path, value: str, key: str, output: bool) -> str:
    """A device's path option from the config's directory (an output's after "unix:"). Only
    an output's "stdio" and "unix:" are not file names: a disk image named so is a file."""
    if not output:
        return str(_host_path(base, value, key))
    if value == "stdio":
        return value
    unix = unix_output_path(value)
    rest = value if unix is None else unix
    return ("" if unix is None else UNIX_OUTPUT) + str(_host_path(base, rest, key))


def _path(table: dict[str, Any], key: str, base: Path, check: bool) -> Path | None:
    if key not in table:
        return None
    value = _get(table, key, "boot", str)
    path = _host_path(base, value, f"boot.{key}")
    if check and not stat.S_ISREG(_mode(path, f"boot.{key}")):
        raise ConfigError(f"boot.{key}: {escaped(str(path))} does not exist or is not a file")
    return path


def _parse_boot(table: dict[str, Any], base: Path, check: bool, restored: bool) -> BootSection:
    _reject_unknown(table, {"kernel", "initrd", "cmdline", "firmware"}, "boot")
    kernel, firmware = _path(table, "kernel", base, check), _path(table, "firmware", base, check)
    if restored and (kernel is not None or "initrd" in table):
        raise ConfigError("boot: a restore loads no kernel or initrd (guest RAM holds them)")
    if (kernel is None) == (firmware is None) and not (restored and firmware is None):
        raise ConfigError("boot: give exactly one of kernel (bzImage or ELF) or firmware")
    if firmware is not None and ("initrd" in table or "cmdline" in table):
        raise ConfigError("boot: initrd and cmdline go with kernel, not firmware")
    return BootSection(
        kernel=kernel,
        initrd=_path(table, "initrd", base, check),
        cmdline=_get(table, "cmdline", "boot", str, ""),
        firmware=firmware,
    )


def device_name_problem(name: object) -> str | None:
    """Why `name` cannot name a device, or None: the rule a config's device names follow
    (a restore's stored config too: monitor/restore.py)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return f"name must be {NAME_RULE}"
    if RESERVED_NAME_RE.fullmatch(name):
        return "the name is reserved (a snapshot names its own chunks so)"
    if name in RUNTIME_DIR_NAMES:
        return f"the name is reserved (the VM's control socket is {name}.sock)"
    return None


def _parse_device(
    table: dict[str, Any], where: str, vm_name: str, base: Path, keep_empty: bool = False
) -> DeviceSection:
    """`keep_empty`: an option that is derived when not given (a NIC's mac) keeps a "" given
    (a stored config's: its saved device took the model's own from it), else "" is derived."""
    name = _get(table, "name", where, str)
    where = f"device {shown(name)}"
    if (problem := device_name_problem(name)) is not None:
        raise ConfigError(f"{where}: {problem}")
    model = _get(table, "model", where, str)
    if model not in MODEL_OPTIONS:
        raise ConfigError(
            f"{where}.model: unknown model {shown(model)} (known: {', '.join(MODEL_OPTIONS)})"
        )
    on_crash = _get(table, "on_crash", where, str, "stop")
    if on_crash not in ON_CRASH:
        raise ConfigError(
            f"{where}.on_crash: expected one of {', '.join(ON_CRASH)}, got {shown(on_crash)}"
        )
    spec = MODEL_OPTIONS[model]
    _reject_unknown(table, ALWAYS_ALLOWED | set(spec), where)
    for key, (kind, default) in spec.items():
        if default is None and key not in table:  # an option without a default is required
            raise ConfigError(
                f"{where}.{key}: missing; a {model} device needs it (expected {kind.__name__})"
            )
    options = {key: _get(table, key, where, kind, default) for key, (kind, default) in spec.items()}
    fds = MODELS[model].fds
    for option in MODELS[model].options:
        given = option.name in table and (keep_empty or options[option.name] != option.default)
        if option.derive is not None and not given:
            options[option.name] = option.derive(vm_name, name)
        if option.path and option.name in table:
            key = f"{where}.{option.name}"
            output = any(r.kind is FdKind.OUTPUT and r.option == option.name for r in fds)
            options[option.name] = _option_path(base, str(options[option.name]), key, output)
        problem = option.check(options[option.name]) if option.check is not None else None
        if problem is not None:
            raise ConfigError(f"{where}.{option.name}: {shown(options[option.name])} {problem}")
        if option.choices and options[option.name] not in option.choices:
            allowed = ", ".join(map(str, option.choices))
            raise ConfigError(
                f"{where}.{option.name}: expected one of {allowed}, got {shown(options[option.name])}"
            )
    max_restarts = _int(
        table, "max_restarts", where, range(0, MAX_RESTARTS + 1), DEFAULT_MAX_RESTARTS
    )
    window = _duration(table, "restart_window", where, DEFAULT_RESTART_WINDOW_S)
    budget = [key for key in ("max_restarts", "restart_window") if key in table]
    if on_crash != "restart" and budget:
        raise ConfigError(
            f'{where}.{budget[0]}: a restart budget needs on_crash = "restart", not {on_crash!r}'
        )
    fault = faults.parse(table["fault"], f"{where}.fault") if "fault" in table else None
    if fault is not None:
        faults.check_model(fault, model, f"{where}.fault", ConfigError)
    return DeviceSection(name, model, on_crash, options, max_restarts, window, fault)


def _duration(table: dict[str, Any], key: str, where: str, default: float) -> float:
    """Seconds, as a number or a string with a unit ("10s", "500ms", "1m")."""
    value = table.get(key, default)
    if isinstance(value, str):
        m = DURATION_RE.fullmatch(value.strip())
        if m is None:
            raise ConfigError(
                f'{where}.{key}: {shown(value)} is not a duration (seconds, or "10s", '
                '"500ms", "1m")'
            )
        seconds = float(m.group(1)) * DURATION_UNITS[m.group(2)]
    elif isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value <= MAX_RESTART_WINDOW_S:  # before float(): a huge int overflows it
            raise ConfigError(
                f"{where}.{key}: {shown(value)} is outside 0..{MAX_RESTART_WINDOW_S:g} s"
            )
        seconds = float(value)
    elif isinstance(value, float):
        seconds = value
    else:
        raise ConfigError(
            f"{where}.{key}: expected seconds or a duration string, got "
            f"{type(value).__name__} {shown(value)}"
        )
    if not 0 < seconds <= MAX_RESTART_WINDOW_S:
        raise ConfigError(f"{where}.{key}: {shown(value)} is outside 0..{MAX_RESTART_WINDOW_S:g} s")
    return seconds


def _check_shared_disks(devices: tuple[DeviceSection, ...], boot: BootSection) -> None:
    """Two devices may share a disk image only read-only: two writers (two guest drivers,
    each caching what it wrote) corrupt it. Named here, by its path; the image's lock
    (monitor/devicefds.py lock_disk) catches one reached by two paths, and other VMs. No
    device's output may be a disk image of the VM either: the guest's console would be
    appended to the disk (`output = "disk.img"` for `path = "disk.img"`), and no lock keeps
    an output off it; monitor/slot.py refuse_outputs_on_disks catches one by another path.
    Nor a file the VM boots from: a firmware grown past a multiple of 64 KiB boots no more."""
    seen: dict[str, tuple[str, bool]] = {}  # path -> (first device, writable)
    outputs: list[tuple[str, str, str]] = []  # (device, option, path)
    for dev in devices:
        for role in MODELS[dev.model].fds:
            if role.kind is FdKind.OUTPUT:
                outputs.append((dev.name, role.option, str(dev.options[role.option])))
            if role.kind is not FdKind.DISK:
                continue
            path = str(dev.options[role.option])
            writable = not dev.options.get(role.readonly_option, False)
            if path in seen and (writable or seen[path][1]):
                raise ConfigError(
                    f"device {shown(dev.name)}.{role.option}: {shown(path)} is also the disk of "
                    f"device {shown(seen[path][0])}; two devices may share an image only read-only"
                )
            seen.setdefault(path, (dev.name, writable))
    booted = {str(path): key for key in BOOT_RESOURCES if (path := getattr(boot, key))}
    # ... and by (st_dev, st_ino): no check at run time catches a boot file by another path
    # (a symlinked directory, "..", a hard link), as slot.py does a disk image
    booted_files = {_file_id(path): key for path, key in booted.items()}
    booted_files.pop(None, None)  # (a boot file not there: a restore's, unchecked)
    for name, option, path in outputs:
        a_file = path != "stdio" and unix_output_path(path) is None
        key = booted.get(path) or (booted_files.get(_file_id(path)) if a_file else None)
        if key is not None:
            raise ConfigError(
                f"device {shown(name)}.{option}: {shown(path)} is the VM's boot.{key}; "
                "the device's output would be appended to it"
            )
        if path in seen:
            raise ConfigError(
                f"device {shown(name)}.{option}: {shown(path)} is the disk image of device "
                f"{shown(seen[path][0])}; the device's output would be appended to it"
            )


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`; None where none is, or it cannot be asked."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def parse_config(
    data: dict[str, Any],
    base: Path,
    check_files: bool = True,
    restored: bool = False,
    kept_empty: Collection[str] = (),
) -> VmConfig:
    """The config from its TOML tables; check_files=False for a restore, whose RAM
    already holds the kernel (only firmware is read again, when the VM maps it).
    restored=True: the config monitor/restore.py rebuilt from a snapshot, whose [boot]
    names no kernel (none is loaded) and a firmware only if the VM booted one.
    kept_empty: the devices whose "" (mac) stays "", as a stored config's does: `up
    --restore` of a snapshot whose stored config has it so (restore.stored_empty)."""
    _reject_unknown(data, {"vm", "boot", "device"}, "config")
    vm = _parse_vm(_get(data, "vm", "config", dict, {}), base)
    boot = _parse_boot(_get(data, "boot", "config", dict), base, check_files, restored)
    tables = _get(data, "device", "config", list, [])
    if len(tables) > MAX_DEVICES:  # before any is parsed: a stored config may list thousands
        raise ConfigError(f"device: {len(tables)} devices; a VM has at most {MAX_DEVICES}")
    devices = tuple(
        _parse_device(
            table := _table(d, f"device[{i}]"),
            f"device[{i}]",
            vm.name,
            base,
            restored or table.get("name") in kept_empty,
        )
        for i, d in enumerate(tables)
    )
    devices += _default_devices(_get(data, "vm", "config", dict, {}), devices)
    names: set[str] = set()
    for d in devices:
        if d.name in names:
            raise ConfigError(f"device {shown(d.name)}: the name is used twice")
        names.add(d.name)
    _check_shared_disks(devices, boot)
    for model in MODELS.values():  # a PCI function takes a free slot: any number of them
        if (
            isinstance(model.transport, PortWindow)
            and sum(d.model == model.name for d in devices) > 1
        ):
            raise ConfigError(
                f"device: only one {model.name} device is supported (it sits at fixed ports "
                f"{model.transport.base:#x}-{model.transport.base + model.transport.size - 1:#x})"
            )
    return VmConfig(vm, boot, devices)


def _default_devices(
    vm: dict[str, Any], devices: tuple[DeviceSection, ...]
) -> tuple[DeviceSection, ...]:
    """The devices every VM has (a PC's RTC) that the config neither lists nor turns off
    with `[vm] <model> = false`; with their options' defaults."""
    added = []
    for model, name in DEFAULT_DEVICES.items():
        if _get(vm, model, "vm", bool, True) and not any(d.model == model for d in devices):
            if any(d.name == name for d in devices):
                raise ConfigError(
                    f"device {shown(name)}: the name is the built-in {model} device's; "
                    f"rename it, or turn that device off with [vm] {model} = false (vm.{model})"
                )
            options = {key: default for key, (_, default) in MODEL_OPTIONS[model].items()}
            added.append(DeviceSection(name, model, "stop", options))
    return tuple(added)


def _read_config(path: Path) -> tuple[bytes, int]:
    """The file's first MAX_CONFIG_BYTES + 1 bytes: a regular file's, or a pipe's up to its
    end (`make-config | splitvmm up /dev/stdin`; not `<(make-config)`, whose fd `up` closed
    as inherited: cli/early.py). Opened without blocking, as open() of a FIFO waits for a
    writer, for ever if none comes: a FIFO nobody has open for writing then reads as empty
    at once, and is refused as such. Also the file's st_mode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        mode = os.fstat(fd).st_mode
        # Checked before open(fd), which has an error of its own for a directory
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            os.close(fd)
            raise ConfigError(f"{path}: cannot read the config: {hostpath.not_regular(mode)}")
        os.set_blocking(fd, True)  # a pipe's writer may not have written yet
        with open(fd, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    if not raw and stat.S_ISFIFO(mode):
        raise ConfigError(f"{path}: cannot read the config: a FIFO or pipe nobody writes to")
    return raw, mode


# Where a path names an open file rather than where it lies: /dev/stdin, /dev/fd/N,
# /proc/self/fd/N
_FD_ALIAS_DIR = re.compile(r"/dev|/dev/fd|/proc/(self|thread-self|\d+)/fd")


def _config_dir(path: Path, mode: int) -> Path:
    """Where the config's relative paths are taken from: the directory of the file. A pipe
    (`make-config | splitvmm up /dev/stdin`) has none, so the working directory, as the
    shell's paths are; a file given as an open fd (`/dev/stdin < conf/vm.toml`) is the
    file's own, not /dev's."""
    if not stat.S_ISREG(mode):
        return Path.cwd()
    # a link to a config (`ln -s ~/.cache/splitvmm/guest/debian.toml`) is the target's: the
    # files it names lie beside it
    if path.is_symlink() or _FD_ALIAS_DIR.fullmatch(str(path.absolute().parent)):
        return Path(os.path.realpath(path)).parent
    return path.parent


def load_config(path: Path, check_files: bool = True, kept_empty: Collection[str] = ()) -> VmConfig:
    raw, mode = _read_config(path)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES >> 20} MiB, too large for a VM config")
    if raw.startswith(b"\xef\xbb\xbf"):  # tomllib reads it as a stray character at 1:1
        raise ConfigError(f"{path}: starts with a UTF-8 byte-order mark, which TOML forbids")
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except ValueError:  # int() refuses an integer of over 4300 digits (CVE-2020-10735)
        raise ConfigError(f"{path}: not valid TOML: an integer has too many digits") from None
    cfg = parse_config(data, _config_dir(path, mode), check_files, kept_empty=kept_empty)
    return VmConfig(cfg.vm, cfg.boot, cfg.devices, source=path)


def config_to_dict(cfg: VmConfig) -> dict[str, Any]:
    """The config as TOML-shaped plain data (absolute paths), which parse_config reads back.

    Leaves out vm.snapshot_dirs and vm.device_uid/device_gid: what the monitor may write to
    and which host user its devices run as are the operator's to say each time it starts,
    never a snapshot's."""
    boot: dict[str, Any] = {}
    for key in ("kernel", "initrd", "firmware"):
        value = getattr(cfg.boot, key)
        if value is not None:
            boot[key] = str(value.resolve())
    if cfg.boot.firmware is None:  # a restored VM's config has no kernel, but its cmdline
        boot["cmdline"] = cfg.boot.cmdline
    vm = {"name": cfg.vm.name, "memory": cfg.vm.memory, "vcpus": cfg.vm.vcpus}
    if cfg.vm.cpuid_mask:
        vm["cpuid_mask"] = list(cfg.vm.cpuid_mask)
    if cfg.vm.track_dirty_pages:
        vm["track_dirty_pages"] = True
    for model in DEFAULT_DEVICES:  # left out on purpose: it stays out when read back
        if not any(d.model == model for d in cfg.devices):
            vm[model] = False
    devices = [_device_table(d) for d in cfg.devices]
    return {"vm": vm, "boot": boot, "device": devices}


def _device_table(d: DeviceSection) -> dict[str, Any]:
    table: dict[str, Any] = {"name": d.name, "model": d.model, "on_crash": d.on_crash}
    if d.on_crash == "restart":
        table |= {"max_restarts": d.max_restarts, "restart_window": d.restart_window_s}
    return table | d.options
