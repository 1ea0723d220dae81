"""SeaBIOS, a PC firmware nobody here wrote, boots from a virtio-blk disk through `splitvmm up`.

Debian's SeaBIOS (package seabios: /usr/share/seabios/bios.bin, the BIOS QEMU runs) finds no
fw_cfg here, so it takes the RAM's size from the CMOS NVRAM (devprocs/rtc.py), keeps its
variables in its shadow below 1 MiB (layout.FIRMWARE_SHADOW), enumerates PCI and places the
BARs itself, drives the virtio-blk function with its own virtio 1.x driver, and boots the
disk's first sector: tests/guests/mbr_sum.S, which reads the next 1 MiB through INT 13h and
prints its checksum. Independent code on both sides of the bus: a wrong BAR, capability,
feature or ring in the device and SeaBIOS finds no disk, reads wrong bytes, or boots nothing.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from tests.integration.conftest import run_up

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


def test_seabios_boots_from_virtio_blk_and_reads_the_disk_back(guests, tmp_path):
    data = random.Random(0x5EAB).randbytes(SECTORS * 512)
    disk = tmp_path / "disk.img"
    disk.write_bytes(guests["mbr-sum"].read_bytes() + data + bytes(64 << 10))
    device = f'[[device]]\nname = "disk0"\nmodel = "virtio-blk"\npath = "{disk}"\n'

    run = run_up(tmp_path, f'firmware = "{SEABIOS}"', devices=device)

    assert run.status == DEBUG_EXIT_OK, run.serial + run.stderr
    assert f"mbr-sum: sectors={SECTORS} sum={mbr_sum(data):08x}\n" in run.serial
