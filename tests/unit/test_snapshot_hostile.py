"""Hostile snapshots: each case is one attack on a real snapshot (a copy of the golden VM
snapshot, tests/conformance/goldens/vm/v1), run through `splitvmm restore` and `splitvmm up
--restore` in-process. Each must be refused with one clear line (no traceback, no raw control
characters, short), or restore harmlessly: with no host resource but the ones the operator
named. Nothing the snapshot names is ever created, connected to or read.

No KVM here: run_vm is replaced by everything the monitor does with a snapshot before KVM
(states decoded, RAM loaded into a memfd, each device state through its model's own restore,
as the device process does) plus the monitor's own code that opens host resources
(devicefds.open_output, loader.load_firmware) on the config it was given. The KVM end-to-end
cases are in tests/integration/test_snapshot_hostile_restore.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import splitvmm.devprocs.serial  # noqa: F401  (registers the model, as the device process does)
from splitvmm.cli import cli
from splitvmm.config import VmConfig
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.runtime import build_device
from splitvmm.devprocs.serial import UartState
from splitvmm.monitor import devicefds, loader, machine, restore
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.memory import GuestMemory
from splitvmm.protocol.models import MODELS, FdKind
from splitvmm.protocol.spec import MAX_SPEC, DeviceSpec
from splitvmm.sandbox.launcher import Launcher
from splitvmm.snapshot.format import SnapshotError
from splitvmm.snapshot.reader import Snapshot
from tests.fakes import FakeIrq
from tests.unit.snapshot_support import checksum_keys, edit_manifest

NEWER = UartState.VERSION + 1  # a serial state from a release after this one

GOLDEN = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "vm" / "v1"
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- hostile-suite-marker "
MAX_MESSAGE = 600  # characters: one line a person reads, however long the hostile value
OPERATOR_CONFIG = """[vm]
name = "op"
memory = "16M"
[boot]
kernel = "/nonexistent/counter.elf"
[[device]]
name = "serial0"
model = "serial"
output = "{output}"
"""


@dataclass
class Env:
    """Host things a hostile manifest may point at; none may be touched."""

    root: Path
    etc: Path  # stands in for /etc: must stay empty
    secret: Path  # 0600, a firmware-sized private file: must never be mapped
    sock: Path  # a listener: must never get a connection
    fifo: Path  # must never be opened (a blocking open would hang the test)
    oplog: Path  # the operator's own serial output
    listener: socket.socket = field(repr=False, default_factory=socket.socket)

    def untouched(self) -> None:
        assert list(self.etc.iterdir()) == []
        assert stat.S_ISFIFO(os.lstat(self.fifo).st_mode)
        with pytest.raises(BlockingIOError):
            self.listener.accept()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    secret = root / "id_ed25519"
    secret.write_bytes(SECRET.ljust(64 << 10, b"S"))
    secret.chmod(0o600)
    os.mkfifo(root / "fifo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "op.sock"))
    listener.listen(4)
    listener.setblocking(False)
    e = Env(root, root / "etc", secret, root / "op.sock", root / "fifo", root / "op.log", listener)
    yield e
    listener.close()


# --- what run_vm would do before KVM ------------------------------------------------------------


@dataclass
class Ran:
    cfg: VmConfig | None = None


def fake_run_vm(ran: Ran) -> Callable[[VmConfig, Snapshot | None], Outcome]:
    def run_vm(cfg: VmConfig, snap: Snapshot | None, launcher: object = None) -> Outcome:
        assert snap is not None
        restore.decode_states(snap)
        mem = GuestMemory(cfg.vm.memory)
        try:
            snap.load_ram(mem)
        finally:
            mem.close()
        for dev in cfg.devices:
            state = restore.saved_device_state(snap, dev.name)  # None: a default it predates
            spec = DeviceSpec(dev.name, dev.model, "ipc://unused", state=state)
            build_device(spec, DeviceContext(irq=FakeIrq()))
        m = machine.Machine(cfg, snapshot=snap)
        owned: list[devicefds.Closable] = []
        try:
            for dev in cfg.devices:
                for role in MODELS[dev.model].fds:
                    if role.kind is FdKind.OUTPUT:
                        devicefds.open_output(dev, role.option, owned)
            if cfg.boot.firmware is not None:
                loader.load_firmware(cfg.boot.firmware)
        finally:
            for c in owned:
                c.close()
            m.close()
        ran.cfg = cfg
        return Outcome(0, "restored (no KVM in this test)")

    return run_vm


# --- mutations ------------------------------------------------------------------------------------

Mutation = Callable[[Path, Env], object]


def manifest(edit: Callable[[dict[str, Any], Env], object]) -> Mutation:
    def mutate(snap: Path, env: Env) -> None:
        path = snap / "manifest.json"
        doc = json.loads(path.read_text())
        edit(doc, env)
        path.write_text(json.dumps(doc))

    return mutate


def config(edit: Callable[[dict[str, Any], Env], object]) -> Mutation:
    return manifest(lambda m, env: edit(m["vm_config"], env))


def device(**changes: Callable[[Env], object] | object) -> Mutation:
    def edit(c: dict[str, Any], env: Env) -> None:
        for key, value in changes.items():
            c["device"][0][key] = value(env) if callable(value) else value

    return config(edit)


def chunk(which: str, **changes: object) -> Mutation:
    def edit(m: dict[str, Any], env: Env) -> None:
        next(c for c in m["chunks"] if c["name"] == which).update(changes)

    return manifest(edit)


def raw_manifest(data: bytes) -> Mutation:
    return lambda snap, env: (snap / "manifest.json").write_bytes(data)


def rewrite_chunk(name: str, file: str, data: bytes) -> Mutation:
    """Replace a chunk's file and make the manifest agree: the checksums pass, so what is
    tested is whatever reads the content."""

    def mutate(snap: Path, env: Env) -> None:
        (snap / file).write_bytes(data)
        chunk(name, size=len(data), sha256=hashlib.sha256(data).hexdigest())(snap, env)

    return mutate


def serial_state(**fields: object) -> bytes:
    state = json.loads((GOLDEN / "serial0.json").read_text())
    state["state"].update(fields)
    return json.dumps(state).encode()


def replace_file(file: str, make: Callable[[Path, Env], object]) -> Mutation:
    def mutate(snap: Path, env: Env) -> None:
        (snap / file).unlink()
        make(snap / file, env)

    return mutate


def flip(file: str) -> Mutation:
    def mutate(snap: Path, env: Env) -> None:
        data = bytearray((snap / file).read_bytes())
        data[len(data) // 2] ^= 1
        (snap / file).write_bytes(bytes(data))

    return mutate


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def firmware_boot(c: dict[str, Any], env: Env) -> None:
    c["boot"] = {"firmware": str(env.secret)}


def add_device_chunk(m: dict[str, Any], env: Env) -> None:
    entry = dict(next(c for c in m["chunks"] if c["name"] == "serial0"), name="evil")
    m["chunks"].append(entry)


# --- the cases ------------------------------------------------------------------------------------

HARMLESS = None
SAME = "same as restore"


@dataclass(frozen=True)
class Case:
    mutate: Mutation
    refused: str | None  # a part of the one-line error, or HARMLESS
    up_refused: str | None = SAME  # for `up --restore` with the operator's config
    sets: tuple[str, ...] = ()  # the operator's --set for `restore`


def config_only(mutate: Mutation, refused: str | None) -> Case:
    """A stored-config attack: `up --restore` uses the operator's config and never reads it."""
    return Case(mutate, refused, up_refused=HARMLESS)


CASES: dict[str, Case] = {
    # -- host resources in the stored config: never used --
    "output-etc-file": config_only(device(output=lambda e: str(e.etc / "cron-evil")), HARMLESS),
    "output-dotdot": config_only(device(output="../../../../../../etc/cron.d/evil"), HARMLESS),
    "output-unix-socket": config_only(device(output=lambda e: f"unix:{e.sock}"), HARMLESS),
    "output-fifo": config_only(device(output=lambda e: str(e.fifo)), HARMLESS),
    "output-block-device": config_only(device(output="/dev/sda"), HARMLESS),
    "output-not-a-string": config_only(device(output=12345), HARMLESS),
    "output-with-operator-set": Case(
        device(output=lambda e: str(e.etc / "x")), HARMLESS, sets=("serial0.output={oplog}",)
    ),
    "kernel-secret": config_only(
        config(lambda c, e: c["boot"].update(kernel=str(e.secret))), HARMLESS
    ),
    "initrd-secret": config_only(
        config(lambda c, e: c["boot"].update(initrd=str(e.secret))), HARMLESS
    ),
    "kernel-fifo": config_only(config(lambda c, e: c["boot"].update(kernel=str(e.fifo))), HARMLESS),
    "firmware-secret": Case(
        config(firmware_boot), "--set boot.firmware=PATH", up_refused="booted firmware"
    ),
    "firmware-secret-next-to-kernel": Case(
        config(lambda c, e: c["boot"].update(firmware=str(e.secret))),
        "--set boot.firmware=PATH",
        up_refused="booted firmware",
    ),
    "firmware-secret-operator-set-fifo": Case(
        config(firmware_boot),
        "boot.firmware: ",
        up_refused="booted firmware",
        sets=("boot.firmware={fifo}",),
    ),
    # -- the stored config's shape and values --
    "boot-missing": config_only(config(lambda c, e: c.pop("boot")), "no [boot] table"),
    "boot-not-a-table": config_only(
        config(lambda c, e: c.update(boot="kernel")), "no [boot] table"
    ),
    "vm-config-not-object": Case(
        manifest(lambda m, e: m.update(vm_config=[])), "vm_config: expected an object, got an array"
    ),
    "model-unknown": Case(
        manifest(
            lambda m, e: (
                m["vm_config"]["device"][0].update(model="virtio-gpu"),
                next(c for c in m["chunks"] if c["name"] == "serial0").update(model="virtio-gpu"),
            )
        ),
        "unknown model 'virtio-gpu'",
        up_refused="saved model 'virtio-gpu', the config says 'serial'",
    ),
    "model-swapped-in-config": config_only(device(model="rng"), "unknown model 'rng'"),
    "model-swapped-in-chunk": Case(chunk("serial0", model="rng"), "saved model 'rng'"),
    "on-crash-garbage": config_only(device(on_crash="rm -rf /"), "on_crash: expected one of"),
    "on-crash-leave": config_only(device(on_crash="leave"), HARMLESS),
    "device-name-newline": config_only(device(name="serial0\nsplitvmm: ok"), "name must be"),
    "device-name-path": config_only(device(name="../../serial0"), "name must be"),
    "device-name-5000-chars": config_only(device(name="s" * 5000), "name must be"),
    "vm-name-newline": config_only(config(lambda c, e: c["vm"].update(name="a\nb")), "vm.name"),
    "vm-name-path": config_only(config(lambda c, e: c["vm"].update(name="../../etc")), "vm.name"),
    "vm-name-5000-chars": config_only(
        config(lambda c, e: c["vm"].update(name="v" * 5000)), "vm.name"
    ),
    "memory-5000-digit-string": config_only(
        config(lambda c, e: c["vm"].update(memory="9" * 5000)), "vm.memory: expected a size"
    ),
    "memory-5000-digit-number": Case(
        raw_manifest(
            b'{"format": "splitvmm-snapshot", "format_version": 1, "x": ' + b"9" * 5000 + b"}"
        ),
        "not valid JSON",
    ),
    "memory-other-size": config_only(config(lambda c, e: c["vm"].update(memory="64M")), "64 MiB"),
    "memory-negative": config_only(
        config(lambda c, e: c["vm"].update(memory=-(16 << 20))), "vm.memory"
    ),
    "vcpus-huge": config_only(config(lambda c, e: c["vm"].update(vcpus=10**9)), "vm.vcpus"),
    "vcpus-negative": config_only(config(lambda c, e: c["vm"].update(vcpus=-1)), "vm.vcpus"),
    "vcpus-bool": config_only(config(lambda c, e: c["vm"].update(vcpus=True)), "vm.vcpus"),
    "vcpus-more-than-saved": config_only(
        config(lambda c, e: c["vm"].update(vcpus=2)), "asks for 2"
    ),
    "device-name-twice": config_only(
        config(lambda c, e: c["device"].append(dict(c["device"][0]))), "the name is used twice"
    ),
    "device-extra-in-config": config_only(
        config(lambda c, e: c["device"].append({"name": "com2", "model": "serial"})),
        "only one serial",
    ),
    "unknown-key-vm": config_only(
        config(lambda c, e: c["vm"].update(evil=1)), "unknown key 'evil'"
    ),
    "unknown-key-device": config_only(device(path="/etc/shadow"), "unknown key 'path'"),
    "unknown-key-config": config_only(
        config(lambda c, e: c.update(net={"tap": "tap0"})), "unknown key 'net'"
    ),
    "cpuid-mask-escapes": config_only(
        config(lambda c, e: c["vm"].update(cpuid_mask=["\x1b[2J\x1b]0;x\x07"])), HARMLESS
    ),
    "cmdline-huge-escapes": config_only(
        config(lambda c, e: c["boot"].update(cmdline="\x1b[31m" * 20000)), HARMLESS
    ),
    "config-nested-900": Case(
        config(lambda c, e: c["vm"].update(vcpus=nested(900))), "nested too deeply"
    ),
    "cpuid-table-garbage": Case(manifest(lambda m, e: m.update(cpuid="\x1b[2J")), HARMLESS),
    # -- the manifest itself --
    "manifest-not-json": Case(raw_manifest(b"{not json"), "manifest.json: not valid JSON"),
    "manifest-empty": Case(raw_manifest(b""), "manifest.json: not valid JSON"),
    "manifest-binary": Case(raw_manifest(b"\xff\xfe\x00\x1b[2J"), "manifest.json: not valid JSON"),
    "manifest-nested-100000": Case(
        raw_manifest(b"[" * 100_000 + b"]" * 100_000), "manifest.json: JSON nested too deeply"
    ),
    "manifest-huge": Case(raw_manifest(b" " * (2 << 20) + b"{}"), "over the 1048576 cap"),
    "manifest-duplicate-key": Case(
        raw_manifest(b'{"format": "splitvmm-snapshot", "format": "x"}'), "duplicate key 'format'"
    ),
    "manifest-symlink": Case(
        replace_file("manifest.json", lambda p, e: p.symlink_to(GOLDEN / "manifest.json")),
        "manifest.json: is a symlink",
    ),
    "manifest-fifo": Case(
        replace_file("manifest.json", lambda p, e: os.mkfifo(p)), "manifest.json: is a FIFO"
    ),
    "manifest-missing": Case(
        lambda s, e: (s / "manifest.json").unlink(), "manifest.json: does not exist"
    ),
    "format-version-newer": Case(
        manifest(lambda m, e: m.update(format_version=99)), "version 99 is newer than this splitvmm"
    ),
    "format-version-zero": Case(
        manifest(lambda m, e: m.update(format_version=0)), "version 0 is not a positive integer"
    ),
    "format-version-string": Case(
        manifest(lambda m, e: m.update(format_version="1")), "version '1' is not a positive integer"
    ),
    "format-name-foreign": Case(
        manifest(lambda m, e: m.update(format="qemu-savevm")), "format is 'qemu"
    ),
    "producer-markup-escapes": Case(
        manifest(lambda m, e: m.update(producer="[/][bold]x\x1b[2J\x1b]0;pwned\x07")), HARMLESS
    ),
    "producer-5000-chars": Case(
        manifest(lambda m, e: m.update(producer="p" * 5000)),
        "producer: expected at most 200 characters, got 5000",
    ),
    "created-escapes": Case(
        manifest(lambda m, e: m.update(created="\x1b[31m" * 100)),
        "created: expected at most 64 characters, got 500",
    ),
    # -- chunks --
    "chunk-name-twice": Case(manifest(add_device_chunk), "name or file used twice"),
    "chunk-extra-device": Case(
        manifest(lambda m, e: (add_device_chunk(m, e), m["chunks"][-1].update(file="evil.json"))),
        "the snapshot has device 'evil'",
    ),
    "chunk-file-dotdot": Case(chunk("vcpu0", file="../vcpu0.json"), "is not a plain file name"),
    "chunk-file-absolute": Case(chunk("vcpu0", file="/etc/shadow"), "is not a plain file name"),
    "chunk-file-hidden": Case(chunk("vcpu0", file=".vcpu0.json"), "is not a plain file name"),
    "chunk-file-is-signature": Case(
        chunk("vcpu0", file="manifest.sig"), "is not a plain file name"
    ),
    "chunk-name-newline": Case(chunk("vm", name="vm\n"), "name: 'vm\\n' is not a name"),
    "chunk-kind-unknown": Case(
        chunk("vm", kind="exec"), "kind: 'exec' is not one of ram, vcpu, vm, device"
    ),
    "chunk-symlink-to-secret": Case(
        replace_file("vcpu0.json", lambda p, e: p.symlink_to(e.secret)), "vcpu0.json): is a symlink"
    ),
    "chunk-hardlink-to-secret": Case(
        replace_file("vm.json", lambda p, e: os.link(e.secret, p)), "chunk vm (vm.json): "
    ),
    "chunk-fifo": Case(replace_file("vm.json", lambda p, e: os.mkfifo(p)), "vm.json): is a FIFO"),
    "chunk-directory": Case(
        replace_file("ram.bin", lambda p, e: p.mkdir()), "ram.bin): is a directory"
    ),
    "chunk-missing": Case(
        lambda s, e: (s / "serial0.json").unlink(), "serial0.json): does not exist"
    ),
    "chunk-truncated": Case(
        lambda s, e: os.truncate(s / "ram.bin", 100), "chunk ram (ram.bin): truncated"
    ),
    "chunk-checksum-mismatch": Case(flip("vcpu0.json"), "vcpu0.json): checksum mismatch"),
    "chunk-size-negative": Case(chunk("vm", size=-1), "size: -1 is outside"),
    "chunk-size-huge": Case(chunk("ram", size=1 << 62), "is outside"),
    "chunk-sha-not-hex": Case(chunk("vm", sha256="\x1b" * 64), "is not 64 lowercase hex digits"),
    "ram-encoding-unknown": Case(
        chunk("ram", encoding="zstd"), "encoding: 'zstd' is not one of sparse-v1"
    ),
    "ram-chunk-twice": Case(
        manifest(lambda m, e: m["chunks"].append(dict(m["chunks"][0], name="ram2", file="r2"))),
        "exactly one ram chunk",
    ),
    "memory-regions-overlap": Case(
        manifest(
            lambda m, e: m["memory"].update(
                regions=[
                    {"gpa": 0, "size": 8 << 20, "offset": 0},
                    {"gpa": 0, "size": 8 << 20, "offset": 8 << 20},
                ]
            )
        ),
        "regions must tile",
    ),
    "vcpu-chunk-dropped": Case(
        manifest(lambda m, e: m.update(chunks=[c for c in m["chunks"] if c["name"] != "vcpu0"])),
        "snapshot has 0 vCPUs",
    ),
    "state-version-newer": Case(chunk("vcpu0", state_version=9), "state version 9 is newer"),
    "state-version-negative": Case(chunk("vm", state_version=-1), "state_version: -1 is outside"),
    "state-version-string": Case(
        chunk("vm", state_version="1"), "state_version: expected an integer, got a string"
    ),
    "vcpu-state-garbage": Case(
        rewrite_chunk("vcpu0", "vcpu0.json", b'{"regs": "\\u001b[2J"}'), "chunk vcpu0"
    ),
    "vm-state-not-object": Case(
        rewrite_chunk("vm", "vm.json", b"[1, 2]"), "expected a JSON object"
    ),
    "device-chunk-not-object": Case(
        rewrite_chunk("serial0", "serial0.json", b'"serial"'), "expected a JSON object"
    ),
    "device-state-not-object": Case(
        rewrite_chunk(
            "serial0", "serial0.json", b'{"model": "serial", "version": 1, "state": [1]}'
        ),
        "state: expected an object, got an array",
    ),
    "device-state-over-cap": Case(
        rewrite_chunk("serial0", "serial0.json", serial_state(rx="A" * (3 << 19))),  # 1.5 MiB
        "over the 1048576 cap",
    ),
    "device-state-version-newer": Case(
        lambda s, e: (
            rewrite_chunk(
                "serial0",
                "serial0.json",
                serial_state().replace(b'"version": 1', f'"version": {NEWER}'.encode()),
            )(s, e),
            chunk("serial0", state_version=NEWER)(s, e),
        ),
        f"version {NEWER} is newer than this splitvmm reads",
    ),
    "device-state-register-out-of-range": Case(
        rewrite_chunk("serial0", "serial0.json", serial_state(ier=1 << 40)), "is not a byte"
    ),
    "device-state-unknown-field": Case(
        rewrite_chunk("serial0", "serial0.json", serial_state(exec="/bin/sh")),
        "unknown key 'exec'",
    ),
    "device-state-rx-over-buffer": Case(
        rewrite_chunk("serial0", "serial0.json", serial_state(rx="QUFB" * 2000)),
        "rx buffer 6000 > 4096",
    ),
}


# --- running a case ---------------------------------------------------------------------------------


def prepare(tmp_path: Path, env: Env, name: str) -> Path:
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)
    CASES[name].mutate(snap, env)
    return snap


class NoLauncher:
    """What `up` starts before anything else (cli/up.py), here a process-free stand-in."""

    def close(self) -> None:
        pass


def invoke(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[Result, Ran]:
    ran = Ran()
    monkeypatch.setattr(machine, "run_vm", fake_run_vm(ran))
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))
    return CliRunner().invoke(cli, args), ran


def assert_refused_cleanly(result: Result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    line = result.stderr.rstrip("\n")
    assert line.startswith("splitvmm: error: ") and "\n" not in line, result.stderr
    assert line.isprintable() and len(line) < MAX_MESSAGE, line[:MAX_MESSAGE]
    assert expected in line, line
    assert "Traceback" not in result.output


def assert_only_operator_resources(ran: Ran, firmware: Path | None, output: str) -> None:
    assert ran.cfg is not None
    boot = ran.cfg.boot
    outputs = [d.options["output"] for d in ran.cfg.devices if "output" in d.options]
    assert (boot.kernel, boot.initrd, boot.firmware, outputs) == (None, None, firmware, [output])


def restore_args(snap: Path, env: Env, case: Case) -> list[str]:
    sets = [f"--set={s.format(oplog=env.oplog, fifo=env.fifo)}" for s in case.sets]
    return ["restore", str(snap), *sets]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_snapshot_restore_refused_or_harmless(tmp_path, env, monkeypatch, name):
    case = CASES[name]
    snap = prepare(tmp_path, env, name)

    result, ran = invoke(monkeypatch, restore_args(snap, env, case))

    if case.refused is not HARMLESS:
        assert_refused_cleanly(result, case.refused)
    else:
        assert result.exit_code == 0, result.output
        output = str(env.oplog) if case.sets else "stdio"
        assert_only_operator_resources(ran, None, output)
    env.untouched()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_snapshot_up_restore_uses_only_operator_config(tmp_path, env, monkeypatch, name):
    case = CASES[name]
    snap = prepare(tmp_path, env, name)
    cfg = tmp_path / "vm.toml"
    cfg.write_text(OPERATOR_CONFIG.format(output=env.oplog))

    result, ran = invoke(monkeypatch, ["up", str(cfg), "--restore", str(snap)])

    refused = case.refused if case.up_refused == SAME else case.up_refused
    if refused is not HARMLESS:
        assert_refused_cleanly(result, refused)
    else:
        assert result.exit_code == 0, result.output
        assert ran.cfg is not None and ran.cfg.boot.kernel == Path("/nonexistent/counter.elf")
        outputs = [d.options["output"] for d in ran.cfg.devices if "output" in d.options]
        assert outputs == [str(env.oplog)]
        assert stat.S_IMODE(env.oplog.stat().st_mode) == 0o600
    env.untouched()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_snapshot_inspect_prints_data_only(tmp_path, env, name):
    snap = prepare(tmp_path, env, name)

    result = CliRunner().invoke(cli, ["snapshot", "inspect", str(snap)])

    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not {"\x1b", "\x07", "\r"} & set(result.output)
    env.untouched()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_snapshot_verify_is_one_line(tmp_path, env, name):
    snap = prepare(tmp_path, env, name)

    result = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert len((result.stdout + result.stderr).splitlines()) == 1, result.output
    env.untouched()


def test_hostile_suite_has_fifty_distinct_attacks():
    assert len(CASES) >= 50


def restoring(command: str, snapshot: Path, tmp_path: Path, env: Env) -> list[str]:
    """The arguments of `up vm.toml --restore SNAPSHOT`, an operator's config written in
    `tmp_path`, or of `restore SNAPSHOT`."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text(OPERATOR_CONFIG.format(output=env.oplog))
    return (
        ["up", str(cfg), "--restore", str(snapshot)]
        if command == "up"
        else ["restore", str(snapshot)]
    )


@pytest.mark.parametrize("command", ["up", "restore"])
def test_restore_of_a_missing_directory_names_it(tmp_path, env, monkeypatch, command):
    missing = tmp_path / "no-such-snapshot"

    result, _ = invoke(monkeypatch, restoring(command, missing, tmp_path, env))

    assert_refused_cleanly(result, f"snapshot {missing}: does not exist")


@pytest.mark.parametrize("command", ["up", "restore"])
def test_restore_of_a_file_not_a_directory_names_it(tmp_path, env, monkeypatch, command):
    """Judged by the reader, as a missing one is: click's usage error exited 2, which `up`
    does not document, and named no snapshot (a non-root user's unreadable snapshot
    directory was refused the same way, by click's own readability check)."""
    not_dir = tmp_path / "snap.tar"
    not_dir.write_bytes(b"")

    result, _ = invoke(monkeypatch, restoring(command, not_dir, tmp_path, env))

    assert_refused_cleanly(result, f"snapshot {not_dir}: not a directory")


@pytest.mark.parametrize("command", [["restore"], ["snapshot", "verify"]])
def test_requiring_a_signature_with_a_directory_as_the_key_names_it(tmp_path, monkeypatch, command):
    """The key file is the signing code's to judge, as the snapshot directory is the
    reader's: click's dir_okay=False refused a directory with a usage error, exit 2."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)

    result, _ = invoke(monkeypatch, [*command, str(snap), "--require-signature", str(tmp_path)])

    assert_refused_cleanly(result, f"signing key: {tmp_path}")


def test_restore_of_a_bad_stored_config_names_the_snapshot(tmp_path, monkeypatch):
    """Its stored config's errors name which snapshot, as opening and checking it do."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)
    edit_manifest(snap, lambda m: m["vm_config"]["device"][0].update(fault="crash:after=1"))

    result, _ = invoke(monkeypatch, ["restore", str(snap)])

    assert_refused_cleanly(result, f"snapshot {snap}: manifest vm_config: device 'serial0' arms")


# -- refused by `snapshot verify` and before anything is built, not at a later step ----------
def _golden_copy(tmp_path: Path, name: str = "snap") -> Path:
    snap = tmp_path / name
    shutil.copytree(GOLDEN, snap)
    return snap


def _wide_serial_state(snap: Path) -> None:
    """A device chunk of 0.8 MiB, under the 1 MiB cap, of raw UTF-8: a spec carries it with
    \\u escapes, 2.4 MiB, over MAX_SPEC."""
    doc = json.loads((snap / "serial0.json").read_text())
    doc["state"]["\U0001f600" * 200_000] = 0
    data = json.dumps(doc, ensure_ascii=False).encode()
    (snap / "serial0.json").write_bytes(data)

    def rechecksum(m: dict[str, Any]) -> None:
        entry = next(c for c in m["chunks"] if c["name"] == "serial0")
        entry.update(checksum_keys(entry, data))

    edit_manifest(snap, rechecksum)


def test_device_state_no_spec_can_carry_is_refused_naming_its_chunk(tmp_path):
    snap = _golden_copy(tmp_path)
    _wide_serial_state(snap)
    with pytest.raises(SnapshotError, match=r"chunk serial0 \(serial0.json\): device state of"):
        restore.device_state(Snapshot.open(snap), "serial0")
    verified = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])
    assert verified.exit_code == 1 and "over the 1048576 cap" in verified.output


def test_a_state_at_the_cap_fits_the_spec_a_device_reads():
    """The cap is a device's own reply's (MAX_CONTROL, compact JSON): a state that large,
    of the widest JSON per byte of state (small numbers in a list), fits a spec."""
    fields = {"state": [0] * ((restore.MAX_DEVICE_STATE - 16) // 2)}
    assert len(json.dumps(fields, separators=(",", ":"))) <= restore.MAX_DEVICE_STATE
    spec = DeviceSpec("serial0", "serial", "ipc:///x", state={"fields": fields})
    assert len(spec.to_json().encode()) < MAX_SPEC


def test_ram_regions_no_vm_of_its_size_has_are_refused_before_anything_is_built(
    tmp_path, monkeypatch
):
    """`verify` said OK, and every restore refused it in load_ram, the VM built."""
    snap = _golden_copy(tmp_path)
    edit_manifest(
        snap,
        lambda m: m["memory"].update(regions=[{"gpa": 0x100000, "size": 16 << 20, "offset": 0}]),
    )
    verified = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])
    assert verified.exit_code == 1 and "are not those of a VM with" in verified.output
    assert "CONFIG's instead" not in verified.output  # the snapshot's own, whatever the config
    monkeypatch.setattr(restore, "decode_states", lambda s: pytest.fail("went on to build"))
    result, _ = invoke(monkeypatch, ["restore", str(snap)])
    assert_refused_cleanly(result, "chunk ram: RAM regions [(0x100000, 0x1000000)]")


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_error_naming_a_snapshot_directory_escapes_its_control_characters(
    tmp_path, monkeypatch, command
):
    snap = _golden_copy(tmp_path, "snap\x1b]0;title\x07")
    (snap / "manifest.json").unlink()
    if command == "restore":
        result, _ = invoke(monkeypatch, ["restore", str(snap)])
    else:
        result = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])
    assert result.exit_code == 1
    assert "\\x1b]0;title\\x07" in result.output and "\x1b" not in result.output


@pytest.mark.parametrize("given", [False, True], ids=["none-given", "operator-given"])
def test_restore_writes_only_where_the_operator_says(tmp_path, env, monkeypatch, given):
    """A stored config's vm.snapshot_dirs (env.etc here: a directory that exists) never
    reaches the VM the restore runs: only --snapshot-dir does."""
    snap = _golden_copy(tmp_path)
    edit_manifest(snap, lambda m: m["vm_config"]["vm"].update(snapshot_dirs=[str(env.etc)]))
    mine = tmp_path / "mine"
    mine.mkdir()

    args = ["restore", str(snap)] + (["--snapshot-dir", str(mine)] if given else [])
    result, ran = invoke(monkeypatch, args)

    assert result.exit_code == 0, result.output
    assert ran.cfg is not None and ran.cfg.vm.snapshot_dirs == ((mine,) if given else ())
