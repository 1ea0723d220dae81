"""The VM config file (TOML) -> frozen dataclasses, with an error naming the key for every mistake.

[vm]      name, memory ("64M", "2G"), vcpus, cpuid_mask (list of "leaf[.sub].reg:bits")
[boot]    kernel (bzImage or ELF) [+ initrd, cmdline], or firmware (flat binary)
[[device]] name, model, on_crash, and the model's own options
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitvmm.errors import ConfigError

MAX_VCPUS = 255  # xAPIC IDs are 8 bits (and the MP table must fit below 1 MiB)
MIN_MEMORY = 16 << 20
MAX_MEMORY = 1 << 40
ON_CRASH = ("stop", "restart", "leave")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# At most 20 digits: int() refuses strings of over 4300 (a traceback), and 2^64 has 20.
SIZE_RE = re.compile(r"^(\d{1,20})\s*([KMGT]i?B?)?$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

# Each device model's options: name -> (type, default); None default means required.
MODEL_OPTIONS: dict[str, dict[str, tuple[type, object]]] = {
    "serial": {"output": (str, "stdio")},
}
ALWAYS_ALLOWED = {"name", "model", "on_crash"}

# Options that name a host resource (a file, socket, disk image, TAP). A snapshot is untrusted,
# so a restore never takes one from its manifest: the operator names each (the config given to
# `up --restore`, or `restore --set DEVICE.OPTION=VALUE`). Per model: option -> what `restore`
# uses when not --set, or None when the operator must name it (a disk image: no safe default).
# Every model in MODEL_OPTIONS has an entry, empty if it holds no host resource.
HOST_RESOURCES: dict[str, dict[str, str | None]] = {
    "serial": {"output": "stdio"},
}
# [boot] keys naming host files. A restore loads no kernel or initrd (guest RAM holds them);
# a firmware-booted VM maps its firmware again, from the path the operator --set.
BOOT_RESOURCES = ("kernel", "initrd", "firmware")


@dataclass(frozen=True, slots=True)
class VmSection:
    name: str
    memory: int  # bytes
    vcpus: int
    cpuid_mask: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BootSection:
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None


@dataclass(frozen=True, slots=True)
class DeviceSection:
    name: str
    model: str
    on_crash: str = "stop"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VmConfig:
    vm: VmSection
    boot: BootSection
    devices: tuple[DeviceSection, ...]
    source: Path | None = None


def parse_size(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = SIZE_RE.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f'{key}: expected a size such as "512M" or "2G", got {value!r}')
    return int(m.group(1)) * SIZE_UNITS[(m.group(2) or "")[:1].upper()]


def _get(table: dict[str, Any], key: str, where: str, kind: type, default: object = None) -> Any:
    if key not in table:
        if default is None:
            raise ConfigError(f"{where}.{key}: missing (expected {kind.__name__})")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _parse_vm(table: dict[str, Any]) -> VmSection:
    _reject_unknown(table, {"name", "memory", "vcpus", "cpuid_mask"}, "vm")
    name = _get(table, "name", "vm", str, "vm")
    if not NAME_RE.match(name):
        raise ConfigError(f"vm.name: {name!r} must be 1-63 letters, digits, '_', '.' or '-'")
    memory = parse_size(table.get("memory", "256M"), "vm.memory")
    if not MIN_MEMORY <= memory <= MAX_MEMORY or memory % 4096:
        raise ConfigError(f"vm.memory: {memory} bytes is not a multiple of 4 KiB in [16M, 1T]")
    vcpus = _get(table, "vcpus", "vm", int, 1)
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"vm.vcpus: {vcpus} is outside 1..{MAX_VCPUS}")
    mask = _get(table, "cpuid_mask", "vm", list, [])
    if not all(isinstance(m, str) for m in mask):
        raise ConfigError('vm.cpuid_mask: expected a list of strings like "1.ecx:0x80000000"')
    return VmSection(name, memory, vcpus, tuple(mask))


def _path(table: dict[str, Any], key: str, base: Path, check: bool) -> Path | None:
    if key not in table:
        return None
    value = _get(table, key, "boot", str)
    path = (base / value).expanduser() if not value.startswith("~") else Path(value).expanduser()
    if check and not path.is_file():
        raise ConfigError(f"boot.{key}: {path} does not exist or is not a file")
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


def _parse_device(table: dict[str, Any], where: str) -> DeviceSection:
    name = _get(table, "name", where, str)
    where = f"device {name!r}"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be 1-63 letters, digits, '_', '.' or '-'")
    model = _get(table, "model", where, str)
    if model not in MODEL_OPTIONS:
        raise ConfigError(
            f"{where}.model: unknown model {model!r} (known: {', '.join(MODEL_OPTIONS)})"
        )
    on_crash = _get(table, "on_crash", where, str, "stop")
    if on_crash not in ON_CRASH:
        raise ConfigError(
            f"{where}.on_crash: expected one of {', '.join(ON_CRASH)}, got {on_crash!r}"
        )
    spec = MODEL_OPTIONS[model]
    _reject_unknown(table, ALWAYS_ALLOWED | set(spec), where)
    options = {key: _get(table, key, where, kind, default) for key, (kind, default) in spec.items()}
    return DeviceSection(name, model, on_crash, options)


def parse_config(
    data: dict[str, Any], base: Path, check_files: bool = True, restored: bool = False
) -> VmConfig:
    """The config from its TOML tables; check_files=False for a restore, whose RAM
    already holds the kernel (only firmware is read again, when the VM maps it).
    restored=True: the config monitor/restore.py rebuilt from a snapshot, whose [boot]
    names no kernel (none is loaded) and a firmware only if the VM booted one."""
    _reject_unknown(data, {"vm", "boot", "device"}, "config")
    vm = _parse_vm(_get(data, "vm", "config", dict, {}))
    boot = _parse_boot(_get(data, "boot", "config", dict), base, check_files, restored)
    devices = tuple(
        _parse_device(_table(d, f"device[{i}]"), f"device[{i}]")
        for i, d in enumerate(_get(data, "device", "config", list, []))
    )
    names = [d.name for d in devices]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"device {name!r}: the name is used twice")
    if sum(d.model == "serial" for d in devices) > 1:
        raise ConfigError("device: only one serial device (COM1) is supported")
    return VmConfig(vm, boot, devices)


def load_config(path: Path, check_files: bool = True) -> VmConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = parse_config(data, path.parent, check_files)
    return VmConfig(cfg.vm, cfg.boot, cfg.devices, source=path)


def config_to_dict(cfg: VmConfig) -> dict[str, Any]:
    """The config as TOML-shaped plain data (absolute paths), which parse_config reads back."""
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
    devices = [
        {"name": d.name, "model": d.model, "on_crash": d.on_crash, **d.options} for d in cfg.devices
    ]
    return {"vm": vm, "boot": boot, "device": devices}
