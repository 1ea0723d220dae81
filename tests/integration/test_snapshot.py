"""Snapshots of running test guests, restored into fresh processes.

The counter guest counts in guest memory at CPL3 and prints `count=v sum=s`,
where s checks a 64 KiB buffer the guest rewrote from the previous count: a
restored guest must continue from the saved count with its RAM intact.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest

from splitvmm.monitor.memory import GuestMemory
from splitvmm.snapshot.reader import Snapshot
from splitvmm.snapshot.writer import STALE_AFTER_S, WRITEBACK_STEP
from tests.integration.conftest import vm_toml
from tests.integration.vmproc import VmProcess, splitvmm

pytestmark = pytest.mark.kvm

PERIOD = 1_000_000
LINE = re.compile(r"^count=(\d+) sum=([0-9a-f]{16})$", re.M)
M64 = (1 << 64) - 1


def counter_sum(v: int) -> int:
    """The guest's checksum of its buffer filled for count v (tests/guests/README.md)."""
    h = 0
    for i in range(8192):
        x = ((v * 8192 + i + 1) * 0x9E3779B97F4A7C15) & M64
        h = ((h ^ (x ^ (x >> 31))) * 0x100000001B3) & M64
    return h


def counter_config(tmp_path: Path, guests, serial: Path) -> Path:
    return guest_config(tmp_path, guests["counter"], f"period={PERIOD} check=1", serial)


def guest_config(tmp_path: Path, guest: Path, cmdline: str, serial: Path) -> Path:
    """tmp_path/vm.toml: a 64 MiB VM of one vCPU booting `guest` with `cmdline`."""
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{guest}"\ncmdline = "{cmdline}"', "64M", 1, serial))
    return config


def lines(text: str) -> list[tuple[int, int]]:
    return [(int(c), int(s, 16)) for c, s in LINE.findall(text)]


def assert_counts_continue(text: str, saved: int) -> None:
    """Restored output: the next count after `saved`, every sum checks RAM, no gaps."""
    got = lines(text)
    assert got, text[-300:]
    # The line after `saved` may have been half printed at the snapshot: its tail comes out
    # first after the restore, so the first whole line is one or two periods on.
    assert got[0][0] in (saved + PERIOD, saved + 2 * PERIOD), (saved, got[:3])
    for (count, digest), (prev, _) in zip(got[1:], got, strict=False):
        assert count == prev + PERIOD
        assert digest == counter_sum(count - PERIOD)


def saved_count(snapshot: Path, serial_text_at_snapshot: str) -> int:
    """The last complete count line printed before the snapshot was taken."""
    return lines(serial_text_at_snapshot)[-1][0]


def snapshot_running(vm: VmProcess, target: Path, verb: str = "snapshot") -> tuple[str, str]:
    """Snapshot (or suspend) a running VM; returns the serial output as of the snapshot.

    Paused first, so that what the file holds when we read it is exactly what the guest
    had written at the snapshot (the snapshot quiesces the device: its writes are done).
    """
    assert vm.ctl("pause").returncode == 0
    r = vm.ctl(verb, str(target), "--json")
    assert r.returncode == 0, r.stderr
    text = vm.text()
    if verb == "snapshot":
        assert vm.ctl("resume").returncode == 0
    return text, r.stdout


def test_snapshot_restore_counter_continues_from_saved_count_twice(guests, tmp_path):
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["up", str(counter_config(tmp_path, guests, serial))], serial)
    vm.wait_for(r"^count=\d+ sum=")
    before, reply = snapshot_running(vm, tmp_path / "s1")
    assert json.loads(reply)["pause_ms"] > 0
    vm.wait_for(r"^count=\d+ sum=", after=len(before) + 1)  # it runs on after the snapshot
    assert vm.ctl("suspend", str(tmp_path / "s-unused")).returncode == 0
    assert vm.finish()[0] == 0
    saved = saved_count(tmp_path / "s1", before)

    # First restore, then a snapshot of the restored VM, then a second restore.
    serial2 = tmp_path / "serial2.log"
    vm2 = VmProcess(
        tmp_path,
        ["restore", str(tmp_path / "s1"), "--set", f"serial0.output={serial2}"]
        + ["--snapshot-dir", str(tmp_path)],
        serial2,
    )
    vm2.wait_for(r"^count=\d+ sum=.*\n(?:.*\n)?count=\d+ sum=")
    before2, _ = snapshot_running(vm2, tmp_path / "s2", "suspend")
    assert vm2.finish()[0] == 0
    assert_counts_continue(before2, saved)

    serial3 = tmp_path / "serial3.log"
    vm3 = VmProcess(
        tmp_path, ["restore", str(tmp_path / "s2"), "--set", f"serial0.output={serial3}"], serial3
    )
    vm3.wait_for(r"^count=\d+ sum=.*\n(?:.*\n)?count=\d+ sum=")
    vm3.proc.terminate()
    vm3.finish()
    assert_counts_continue(vm3.text(), saved_count(tmp_path / "s2", before2))


# The guest fills 40 MiB and rewrites the first 8 for ever, its generation in the last page:
# a copy made while it runs takes the 8 first, the generation last.
SWEEP_START, FILL_MIB, SWEEP_MIB = 16 << 20, 40, 8


def sweep_generations(snapshot: Path) -> tuple[int, list[int]]:
    """The sweeping dirty guest's generation and the first u64 of each page it sweeps, as
    the snapshot holds them (loaded as a restore loads them: snapshot/ram.py)."""
    snap = Snapshot.open(snapshot)
    mem = GuestMemory(snap.manifest.memory.size)
    try:
        snap.load_ram(mem)
        at = SWEEP_START + (FILL_MIB << 20) - 4096
        generation = int.from_bytes(mem.map[at : at + 8], "little")
        return generation, [
            int.from_bytes(mem.map[a : a + 8], "little")
            for a in range(SWEEP_START, SWEEP_START + (SWEEP_MIB << 20), 4096)
        ]
    finally:
        mem.close()


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_live_snapshot_of_a_guest_writing_all_the_time_holds_one_instant(guests, tmp_path, tracked):
    """`ctl snapshot` of a running VM whose guest rewrites every page of 8 MiB for ever, three
    times. With vm.track_dirty_pages its RAM is copied while it runs and what it wrote
    meanwhile again in the pause (sparse-v2): a page missed by KVM's dirty log, or put at the
    wrong offset, would hold an older generation than the one the guest was at. Without, it is
    all copied in the pause."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    line = f"mib={FILL_MIB} start={SWEEP_START} sweep={SWEEP_MIB}"
    boot = f'kernel = "{guests["dirty"]}"\ncmdline = "{line}"'
    extra = "track_dirty_pages = true" if tracked else ""
    config.write_text(vm_toml(boot, "64M", 1, serial, vm_extra=extra))
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^dirty: sweeping$")
    for i in range(3):
        r = vm.ctl("snapshot", str(tmp_path / f"live{i}"), "--json")
        assert r.returncode == 0, r.stderr
    assert vm.ctl("status").returncode == 0  # it runs on
    vm.proc.terminate()
    vm.finish()

    for i in range(3):
        manifest = json.loads((tmp_path / f"live{i}" / "manifest.json").read_text())
        (ram,) = [c for c in manifest["chunks"] if c["kind"] == "ram"]
        assert ram["encoding"] == ("sparse-v2" if tracked else "sparse-v1")
        g, gens = sweep_generations(tmp_path / f"live{i}")
        k = gens.index(g - 1) if g - 1 in gens else len(gens)
        assert g >= 1 and gens == [g] * k + [g - 1] * (len(gens) - k), (i, g, sorted(set(gens))[:8])


@pytest.mark.parametrize("paused", [False, True], ids=["suspend", "paused VM"])
def test_a_stopped_vms_snapshot_writes_its_ram_back_under_the_monitors_filter(
    guests, tmp_path, paused
):
    """A suspend's RAM file, or a paused VM's, starts its writeback every WRITEBACK_STEP bytes
    (snapshot/writer.py), by sync_file_range from the confined monitor: a RAM file of several
    steps, as the counter guest's (under 100 KiB) is not, so that the call is made at all."""
    serial = tmp_path / "serial.log"
    config = guest_config(tmp_path, guests["dirty"], f"mib={FILL_MIB}", serial)
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^dirty: \d+ MiB written$")
    if paused:
        assert vm.ctl("pause").returncode == 0
    r = vm.ctl("snapshot" if paused else "suspend", str(tmp_path / "s"))
    if paused:
        vm.ctl("suspend", str(tmp_path / "end"))
    status, err = vm.finish()

    assert (r.returncode, status) == (0, 0), (r.stderr, err)
    assert (tmp_path / "s" / "ram.bin").stat().st_size > 2 * WRITEBACK_STEP


def test_snapshot_removes_what_a_killed_writer_left(guests, tmp_path):
    """A monitor killed while it wrote a snapshot leaves its temporary directory, a copy of
    guest RAM: the confined monitor's next snapshot into that directory removes it."""
    left = tmp_path / ".s0.tmp-1"
    left.mkdir()
    (left / "ram.bin").write_bytes(b"guest memory")
    made = time.monotonic()
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["up", str(counter_config(tmp_path, guests, serial))], serial)
    vm.wait_for(r"^count=\d+ sum=")
    time.sleep(max(0.0, made + STALE_AFTER_S + 0.2 - time.monotonic()))

    snapshot_running(vm, tmp_path / "s1")
    status, err = vm.stop()

    assert (status, left.exists(), (tmp_path / "s1" / "manifest.json").exists()) == (
        128 + 15,
        False,
        True,
    ), err
    assert f"removed {left}, left by a snapshot writer that died" in err


def test_suspend_restores_serial_registers_and_unread_input(guests, tmp_path):
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"  # output = "stdio": input comes from our stdin
    config.write_text(vm_toml(f'kernel = "{guests["counter"]}"\ncmdline = "period={PERIOD}"'))
    vm = VmProcess(tmp_path, ["up", str(config)], serial, stdio=True)
    vm.wait_for(r"^count=\d+$")  # the guest has set its UART up (FCR clears the receiver)
    vm.send(b"typed but never read")
    snapshot_running(vm, tmp_path / "s1", "suspend")
    status, stderr = vm.finish()
    assert status == 0 and "suspended to" in stderr
    first = json.loads((tmp_path / "s1" / "serial0.json").read_text())["state"]
    assert base64.b64decode(first["rx"]) == b"typed but never read"

    # Restore it (up --restore), snapshot again at once: the device state must be the same.
    vm2 = VmProcess(
        tmp_path, ["up", str(config), "--restore", str(tmp_path / "s1")], serial, stdio=True
    )
    vm2.wait_for(r"^count=\d+$", after=len(vm.text()))
    snapshot_running(vm2, tmp_path / "s2", "suspend")
    assert vm2.finish()[0] == 0
    second = json.loads((tmp_path / "s2" / "serial0.json").read_text())["state"]
    assert second == first


def test_snapshot_during_forwarded_reads_loses_nothing(guests, tmp_path):
    # pio-loop spends nearly all its time in `in` exits served by the device process,
    # so the snapshot lands while a vCPU is in the middle of one. Its reads go to IIR: the
    # monitor answers SCR reads (the default port) from the serial's register mirror.
    serial = tmp_path / "serial.log"
    config = guest_config(tmp_path, guests["pio-loop"], "count=3000 in_port=0x3fa", serial)
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"pio-loop: count=")
    snapshot_running(vm, tmp_path / "s1", "suspend")
    assert vm.finish()[0] == 0
    assert "pio-loop: done" not in vm.text()
    vm2 = VmProcess(tmp_path, ["up", str(config), "--restore", str(tmp_path / "s1")], serial)
    status, stderr = vm2.finish(timeout=120)
    assert status == 1, stderr
    assert re.search(r"pio-loop: in median=\d+ p99=\d+\npio-loop: out median=", vm2.text())
    assert "pio-loop: done" in vm2.text()


def test_ctl_errors_are_one_sentence_and_nonzero(guests, tmp_path):
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["up", str(counter_config(tmp_path, guests, serial))], serial)
    vm.wait_for(r"^count=")
    assert vm.ctl("pause").returncode == 0
    again = vm.ctl("pause")
    (tmp_path / "exists").mkdir()
    existing = vm.ctl("snapshot", str(tmp_path / "exists"))
    assert vm.ctl("resume").returncode == 0
    from splitvmm.monitor.control import ControlError, request

    socket_path = tmp_path / "run" / "splitvmm" / "test" / "control.sock"
    with pytest.raises(ControlError, match="holds a NUL byte"):
        request(socket_path, "snapshot", {"path": str(tmp_path / "nul\0byte")})
    status = vm.ctl("status", "--json")  # the control socket still answers
    vm.proc.terminate()
    vm.finish()
    missing = splitvmm(tmp_path, "ctl", "--vm", "nope", "status")
    assert (again.returncode, again.stderr.strip()) == (1, "Error: VM 'test' is already paused")
    assert existing.returncode == 1 and "already exists" in existing.stderr
    assert json.loads(status.stdout)["state"] == "running"
    assert missing.returncode == 1 and "no VM is listening" in missing.stderr


def test_snapshot_verify_of_a_vm_with_two_writable_disks_is_ok(guests, tmp_path):
    """verify parses the stored config with a stand-in path for each disk: one for all made
    two writable disks share an image, and verify failed on a valid snapshot."""
    serial = tmp_path / "serial.log"
    disks = ""
    for name in ("disk0", "disk1"):
        image = tmp_path / f"{name}.img"
        image.write_bytes(bytes(1 << 20))
        disks += f'[[device]]\nname = "{name}"\nmodel = "virtio-blk"\npath = "{image}"\n'
    config = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=1000000"'
    config.write_text(vm_toml(boot, "64M", 1, serial) + disks)
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^count=\d+$")
    assert vm.ctl("suspend", str(tmp_path / "snap")).returncode == 0
    assert vm.finish()[0] == 0

    r = splitvmm(tmp_path, "snapshot", "verify", str(tmp_path / "snap"))

    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert "OK" in r.stdout


def test_suspend_to_a_directory_named_with_a_newline_ends_in_one_escaped_line(guests, tmp_path):
    """A snapshot directory may be named with any character but NUL and '/': `up`'s last
    line quoted it raw, so a newline split it and an escape sequence reached the terminal,
    as its errors did before they were escaped (b04b7e5)."""
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["up", str(counter_config(tmp_path, guests, serial))], serial)
    vm.wait_for(r"^count=\d+ sum=")
    snapshot_running(vm, tmp_path / "s\n\x1b[2Jx", "suspend")
    status, stderr = vm.finish()

    assert status == 0, stderr
    assert stderr.rstrip().splitlines()[-1] == f"splitvmm: suspended to {tmp_path}/s\\n\\x1b[2Jx"


def ged_events(snapshot: Path) -> int:
    return int(json.loads((snapshot / "vm.json").read_text())["ged_events"])


def test_power_button_pressed_before_a_snapshot_is_still_pending_once_restored(guests, tmp_path):
    """`ctl power-button` in the confined monitor (its irqfd write): the counter guest never
    reads the GED's register, so the event waits there, is saved with the vm chunk, and is
    there again in the restored VM, which saves it again."""
    serial = tmp_path / "serial.log"
    vm = VmProcess(tmp_path, ["up", str(counter_config(tmp_path, guests, serial))], serial)
    try:  # a VM left running by a failed assertion spins its guest for good
        vm.wait_for(r"^count=\d+ sum=")
        pressed = vm.ctl("power-button")
        assert (pressed.returncode, pressed.stdout) == (0, "power button pressed\n"), pressed.stderr
        assert vm.ctl("suspend", str(tmp_path / "s1")).returncode == 0
        assert vm.finish()[0] == 0
    finally:
        vm.kill_if_running()
    assert ged_events(tmp_path / "s1") == 2  # platform.py GED_POWER_BUTTON

    serial2 = tmp_path / "serial2.log"
    restore = ["restore", str(tmp_path / "s1"), "--set", f"serial0.output={serial2}"]
    vm2 = VmProcess(tmp_path, [*restore, "--snapshot-dir", str(tmp_path)], serial2)
    try:
        vm2.wait_for(r"^count=\d+ sum=")
        assert vm2.ctl("suspend", str(tmp_path / "s2")).returncode == 0
        assert vm2.finish()[0] == 0
    finally:
        vm2.kill_if_running()
    assert ged_events(tmp_path / "s2") == 2


def test_power_button_of_a_firmware_vm_is_refused_in_one_sentence(guests, tmp_path):
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'firmware = "{guests["firmware-idle"]}"', "16M", 1, serial))
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    try:
        vm.wait_for("firmware-idle: halted")
        refused = vm.ctl("power-button")
    finally:
        vm.proc.terminate()
        vm.finish()
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: power-button: VM 'test' booted a firmware")
    assert refused.stderr.count("\n") == 1
