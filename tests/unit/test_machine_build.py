"""Machine.build's checks that come before anything is started (monitor/machine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitvmm.config import parse_config
from splitvmm.errors import BootError, ConfigError, SplitvmmError
from splitvmm.monitor.control import SOCKET_NAME
from splitvmm.monitor.machine import Machine
from splitvmm.monitor.rundir import MAX_SOCKET_PATH
from splitvmm.native.kvm import VmFd
from splitvmm.protocol.models import MODELS, PortWindow
from splitvmm.snapshot.format import SnapshotError
from splitvmm.snapshot.reader import Snapshot
from tests.unit.images import make_bzimage
from tests.unit.snapshot_support import VM_CONFIG, flip_byte, make_snapshot


class UnusedLauncher:
    def configure(self, rundir: object, models: object = (), device_user: object = None) -> None:
        raise AssertionError("the launcher was asked for the VM")

    def close(self) -> None:
        pass


def test_build_control_socket_path_too_long_fails_before_the_launcher_is_used(tmp_path):
    """The path used to be found too long by ControlServer's bind(), a traceback after every
    device had started; now `up` prints one line, as for a device's channel."""
    cfg = parse_config({"vm": {"name": "vm1"}, "boot": {"kernel": "bzImage"}}, tmp_path, False)
    # ROOT/vm1/control.sock one byte longer than sun_path takes
    root = tmp_path / (
        "r" * (MAX_SOCKET_PATH + 1 - len(f"{tmp_path}/") - len(f"/vm1/{SOCKET_NAME}"))
    )
    machine = Machine(cfg, runtime_root=root, launcher=UnusedLauncher())  # type: ignore[arg-type]
    try:
        with pytest.raises(SplitvmmError, match="control socket .* is longer than a UNIX socket"):
            machine.build()
    finally:
        machine.close()
    assert list(root.iterdir()) == []  # the runtime dir is gone


class IdleLauncher(UnusedLauncher):
    def configure(self, rundir: object, models: object = (), device_user: object = None) -> None:
        pass


@pytest.mark.kvm
def test_build_refuses_a_kernel_before_any_device_starts(tmp_path, monkeypatch):
    """A kernel the loader refuses ends the build before a device process is launched.
    Loaded after, it ended devices on their way up, and their words (a channel the monitor
    closed, a traceback of a refused connection) followed the error, now and then."""
    (tmp_path / "bzImage").write_bytes(make_bzimage(init_size=200 << 20))
    vm = {"name": "vm1", "memory": "64M"}
    assert (
        _launched_before_refusal(tmp_path, monkeypatch, vm, BootError, "kernel needs RAM up to")
        == []
    )


def _launched_before_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: dict[str, object], error: type, match: str
) -> list[bool]:
    """Build a VM of `vm` with the bzImage in tmp_path and a serial device, which must fail
    with `error` matching `match`: whether a device was launched first."""
    cfg = parse_config(
        {"vm": vm, "boot": {"kernel": "bzImage"},
         "device": [{"name": "serial0", "model": "serial", "output": "out.log"}]},
        tmp_path,
    )  # fmt: skip
    launched: list[bool] = []
    monkeypatch.setattr(Machine, "_launch_devices", lambda self: launched.append(True))
    machine = Machine(cfg, runtime_root=tmp_path / "run", launcher=IdleLauncher())  # type: ignore[arg-type]
    try:
        with pytest.raises(error, match=match):
            machine.build()
    finally:
        machine.close()
    return launched


@pytest.mark.kvm
@pytest.mark.parametrize(
    "mask,memory,message",
    [
        ("garbage", "64M", r"vm\.cpuid_mask: 'garbage' is not LEAF"),
        ("1.ecx:0x1ffffffff", "64M", r"vm\.cpuid_mask: .* does not fit in 32 bits"),
        ("1.ecx:0", "64M", r"vm\.cpuid_mask: .* clears no bits"),
        # MAXPHYADDR 32..63 keeps only bit 5: 32 bits, and 4 GiB of RAM ends past 4 GiB
        ("0x80000008.eax:0xdf", "4G", r"vm\.memory: .* past the 32-bit physical addresses"),
    ],
    ids=["syntax", "bits-too-wide", "clears-nothing", "physical-bits"],
)
def test_build_refuses_a_bad_cpuid_mask_before_any_device_starts(
    tmp_path, monkeypatch, mask, memory, message
):
    """Checked only in boot.prepare, after _launch_devices, these ended devices on their
    way up: `up` printed "device serial0: the monitor closed the channel" or a device's
    "Traceback (most recent call last):" beside its one-line error, now and then."""
    (tmp_path / "bzImage").write_bytes(make_bzimage())
    vm = {"name": "vm1", "memory": memory, "cpuid_mask": [mask]}
    assert _launched_before_refusal(tmp_path, monkeypatch, vm, ConfigError, message) == []


@pytest.mark.parametrize(
    ("second", "hint", "not_hint"),
    [
        ("serial", "it takes input from the keyboard only: configure it first", "unix:PATH"),
        ("virtio-console", "give it a unix:PATH output, whose peer types into it", "only"),
    ],
)
def test_second_console_on_stdio_is_told_how_its_model_takes_input(caplog, second, hint, not_hint):
    """The keyboard goes to the first console on stdio. The hint for another used to send an
    8250 to a unix: output, which its model reads nothing from (only virtio-console's peer
    types into it)."""
    machine = Machine.__new__(Machine)
    machine._console = None
    machine._take_console("serial0", MODELS["serial"])
    machine._take_console("tty1", MODELS[second])
    assert machine._console == "serial0"
    (record,) = caplog.records
    assert "device tty1: its output is stdio too, but the keyboard goes to device serial0" in (
        record.getMessage()
    )
    assert hint in record.getMessage() and not_hint not in record.getMessage()


@pytest.mark.kvm
def test_a_restore_starts_its_devices_without_guest_ram_before_the_ram_is_loaded(
    tmp_path, monkeypatch
):
    """The 8250 is handed no guest RAM: a restore asks for it before loading RAM (what it
    reads is its saved state), and holds its irqfd until the saved irqchip is set. RAM that
    fails its checksum as it loads then ends the build with none of the device's irqfds in
    KVM (an edge it sent meanwhile would have been overwritten by the saved irqchip) and no
    device that reads guest RAM asked for."""
    snap = make_snapshot(tmp_path / "snap")
    flip_byte(snap / "ram.bin", 32 + 16 + 100)  # inside the first page's data
    cfg = parse_config(VM_CONFIG, tmp_path, check_files=False)
    launched: list[tuple[bool | None, bool]] = []
    monkeypatch.setattr(
        Machine,
        "_launch_devices",
        lambda self, guest_ram=None, ahead=False: launched.append((guest_ram, ahead)),
    )
    gsis: list[int] = []
    register = VmFd.register_irqfd

    def registered(vm: VmFd, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        gsis.append(gsi)
        register(vm, eventfd, gsi, resample_fd)

    monkeypatch.setattr(VmFd, "register_irqfd", registered)
    machine = Machine(
        cfg,
        runtime_root=tmp_path / "run",
        snapshot=Snapshot.open(snap),
        launcher=IdleLauncher(),  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(SnapshotError, match=r"chunk ram .*checksum mismatch"):
            machine.build()
    finally:
        machine.close()
    serial = MODELS["serial"].transport
    assert isinstance(serial, PortWindow)
    assert launched == [(False, True)]  # asked for ahead: the RAM loads meanwhile
    assert serial.irq not in gsis


# A restore whose RAM load ends in a stop (`how` "stop", after `settle` s: a big RAM, the
# devices asked for ahead waiting for their channels) or an error (RAM refused by its
# checksum), the launcher's zygote slow to start by `delay` s (a new one's imports on a loaded
# host). In a process of its own: a real launcher is forked only from a single-threaded
# process (sandbox/launcher_start.py), which a test process after others may not be.
RAM_LOAD_ENDS = """
import json, sys, time
from pathlib import Path
from splitvmm.config import parse_config
from splitvmm.errors import SplitvmmError
from splitvmm.monitor import restore
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.machine import Machine
from splitvmm.sandbox import zygote
from splitvmm.snapshot.reader import Snapshot
from tests.unit.snapshot_support import VM_CONFIG, make_snapshot

tmp, how, settle, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if delay:
    slow = ("sh", "-c", f'sleep {delay}; exec "$@"', "sh", *zygote.ZYGOTE_COMMAND)
    zygote.Zygote.start.__func__.__defaults__ = (slow,)
snap = make_snapshot(tmp / "snap")
machine = Machine(parse_config(VM_CONFIG, tmp, check_files=False), runtime_root=tmp / "run",
                  snapshot=Snapshot.open(snap))

def apply(snapshot, states, m):
    snapshot.load_ram(m.mem)
    time.sleep(settle)
    if how == "error":
        raise SplitvmmError("ram: its checksum does not match")
    m.stop(Outcome(0, "a stop signal"))

restore.apply = apply
outcome = None
try:
    try:
        machine.build()
        outcome = machine.run().message
    except SplitvmmError:
        pass
finally:
    start = time.monotonic()
    machine.close()
print(json.dumps({
    "outcome": outcome,
    "slots": [[s.name, s.generation] for s in machine.slots],
    "close_s": time.monotonic() - start,
    "broken": machine.launcher._broken,
}))
"""


def _ram_load_ends(tmp_path: Path, how: str, settle: float, delay: float) -> tuple[dict, str]:
    """RAM_LOAD_ENDS's report, and its stderr."""
    ran = subprocess.run(
        [sys.executable, "-c", RAM_LOAD_ENDS, str(tmp_path), how, str(settle), str(delay)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout), ran.stderr


@pytest.mark.kvm
def test_a_stop_during_a_restores_ram_load_ends_the_devices_asked_for_ahead(tmp_path):
    """A stop while RAM loads gives up the launch requests sent ahead; the teardown takes
    their replies all the same, and each slot ends its device before its listening socket
    closes. Dropped with the launcher's socket instead, it reset the connection of a device
    waiting for its channel, which said "the monitor closed the channel" after the stop."""
    report, stderr = _ram_load_ends(tmp_path, "stop", 0.5, 0)
    assert report["outcome"] == "a stop signal"
    assert report["slots"] == [["serial0", 1], ["rtc", 1]]
    assert "closed the channel" not in stderr


@pytest.mark.kvm
@pytest.mark.parametrize(("how", "delay"), [("stop", 0), ("error", 3)])
def test_a_restore_whose_ram_load_ends_it_gives_up_the_devices_asked_for_ahead_at_once(
    tmp_path, how, delay
):
    """A stop right after the RAM load shuts our sending side before the launcher served the
    spawns sent ahead: it handed each to its zygote, whose wait ended at the hang-up, which
    killed it, and the next spawn said "the zygote ended (-9); starting a new one" after
    the stop. A build error (RAM refused by its checksum) gave up nothing: the teardown's take
    waited for a slow zygote's imports (3 s here), or for STOP_TIMEOUT_S and then broke the
    handle, to end devices nobody wanted."""
    report, stderr = _ram_load_ends(tmp_path, how, 0, delay)
    assert "splitvmm: launcher" not in stderr
    assert report["broken"] is None and report["close_s"] < 1.0
