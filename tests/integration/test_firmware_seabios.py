"""SeaBIOS, a PC firmware nobody here wrote, boots from a virtio-blk disk through `splitvmm up`.

Debian's SeaBIOS (package seabios: /usr/share/seabios/bios.bin, the BIOS QEMU runs) finds no
fw_cfg here, so it takes the RAM's size from the CMOS NVRAM (devprocs/rtc.py), keeps its
variables in its shadow below 1 MiB (layout.FIRMWARE_SHADOW), enumerates PCI and places the
BARs itself, drives the virtio-blk function with its own virtio 1.x driver, and boots the
disk's first sector: tests/guests/mbr_sum.S, which reads the next 1 MiB through INT 13h and
prints its checksum. Independent code on both sides of the bus: a wrong BAR, capability,
feature or ring in the device and SeaBIOS finds no disk, reads wrong bytes, or boots nothing.
Suspended while it reads, the VM restores with SeaBIOS's state (in its shadow and the rest of
RAM), the device's queue and the boot sector's loop all where they were.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import run_up, vm_toml
from tests.integration.test_snapshot import snapshot_running
from tests.integration.vmproc import VmProcess, splitvmm

SEABIOS = Path("/usr/share/seabios/bios.bin")
SECTORS = 2048  # mbr_sum.S reads these after itself
DEBUG_EXIT_OK = (0x31 << 1) | 1

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not SEABIOS.is_file(), reason=f"no SeaBIOS at {SEABIOS} (seabios)"),
]


def mbr_sum(data: bytes) -> int:
    """mbr_sum.S's checksum: sum = rol(sum, 1) + dword, over the little-endian dwords."""
    total = 0
    for (dword,) in struct.iter_unpack("<I", data):
        total = (((total << 1) | (total >> 31)) + dword) & 0xFFFFFFFF
    return total


def disk_device(tmp_path: Path, boot_sector: Path) -> tuple[str, bytes]:
    """A virtio-blk disk of the boot sector and 1 MiB of random bytes: its [[device]] table
    and those bytes."""
    data = random.Random(0x5EAB).randbytes(SECTORS * 512)
    disk = tmp_path / "disk.img"
    disk.write_bytes(boot_sector.read_bytes() + data + bytes(64 << 10))
    return f'[[device]]\nname = "disk0"\nmodel = "virtio-blk"\npath = "{disk}"\n', data


def passes(text: str) -> list[tuple[int, str]]:
    """(pass, sum) of each whole line the boot sector printed."""
    found = re.findall(rf"^mbr-sum: pass ([0-9a-f]{{8}}) sectors={SECTORS} sum=([0-9a-f]{{8}})$",
                       text, re.M)  # fmt: skip
    return [(int(n, 16), total) for n, total in found]


def refused_with_another_bios(
    tmp_path: Path, config: Path, snapshot: Path
) -> subprocess.CompletedProcess[str]:
    """`up --restore` of `snapshot` with SeaBIOS one byte off: the snapshot names the image
    its ROM held (vm chunk v4), where the guest may still run it."""
    other = tmp_path / "other-bios.bin"
    data = bytearray(SEABIOS.read_bytes())
    data[0] ^= 0xFF
    other.write_bytes(data)
    other_config = tmp_path / "other.toml"
    other_config.write_text(config.read_text().replace(str(SEABIOS), str(other)))
    return splitvmm(tmp_path, "up", str(other_config), "--restore", str(snapshot))


def test_seabios_boots_from_virtio_blk_and_reads_the_disk_back(guests, tmp_path):
    device, data = disk_device(tmp_path, guests["mbr-sum"])

    run = run_up(tmp_path, f'firmware = "{SEABIOS}"', devices=device)

    assert run.status == DEBUG_EXIT_OK, run.serial + run.stderr
    assert passes(run.serial) == [(1, f"{mbr_sum(data):08x}")], run.serial


def test_seabios_suspended_while_it_reads_restores_and_reads_on(guests, tmp_path):
    device, data = disk_device(tmp_path, guests["mbr-sum-loop"])
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'firmware = "{SEABIOS}"', "64M", 1, serial) + device)
    expected = f"{mbr_sum(data):08x}"

    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^mbr-sum: pass 00000002 .*\n", timeout=60)
    before, _ = snapshot_running(vm, tmp_path / "s1", "suspend")
    assert vm.finish()[0] == 0
    done = passes(before)[-1][0]
    refused = refused_with_another_bios(tmp_path, config, tmp_path / "s1")
    vm2 = VmProcess(tmp_path, ["up", str(config), "--restore", str(tmp_path / "s1")], serial)
    try:
        vm2.wait_for(rf"^mbr-sum: pass {done + 2:08x} .*\n", timeout=60, after=len(before))
    finally:
        vm2.stop()

    assert "the VM was saved running firmware of" in refused.stderr, refused.stderr
    assert (refused.returncode, "Traceback" in refused.stderr) == (1, False), refused.stderr
    assert passes(before) == [(n, expected) for n in range(1, done + 1)]
    after = passes(vm2.text()[len(before) :])
    assert after[:2] == [(done + 1, expected), (done + 2, expected)], vm2.text()[-600:]
