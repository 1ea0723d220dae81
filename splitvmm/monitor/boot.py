"""Boot: put the kernel or firmware in guest memory and the vCPUs in their start state."""

from __future__ import annotations

import mmap
import os

from splitvmm.config import VmConfig
from splitvmm.errors import BootError
from splitvmm.monitor import layout
from splitvmm.monitor.memory import GuestMemory
from splitvmm.native.kvm import Kvm, VcpuFd, VmFd
from splitvmm.native.mem import mapping_address

FIRMWARE_SLOT_BASE = 16  # memslots after RAM's


def memory_holes(cfg: VmConfig) -> list[tuple[int, int]]:
    """Guest-physical ranges where RAM must not be mapped (firmware's low alias)."""
    if cfg.boot.firmware is None:
        return []
    size = cfg.boot.firmware.stat().st_size
    low = min(size, layout.FIRMWARE_LOW_ALIAS)
    return [(layout.HIMEM_START - low, low)]


def prepare(cfg: VmConfig, kvm: Kvm, vm: VmFd, mem: GuestMemory, vcpus: list[VcpuFd]) -> None:
    if cfg.boot.firmware is not None:
        _map_firmware(vm, cfg.boot.firmware)
        return
    raise BootError("kernel boot not wired yet")


def _map_firmware(vm: VmFd, path) -> None:
    data = path.read_bytes()
    size = len(data)
    if not 0 < size <= layout.FIRMWARE_MAX or size % (64 * 1024):
        raise BootError(
            f"{path}: firmware must be a multiple of 64 KiB up to 16 MiB, is {size} bytes"
        )
    fd = os.memfd_create("firmware", os.MFD_CLOEXEC)
    os.write(fd, data)
    fw = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    global _firmware_map
    _firmware_map = fw  # keep the mapping alive as long as the process
    vm.set_user_memory_region(
        FIRMWARE_SLOT_BASE, layout.FOUR_GIB - size, size, mapping_address(fw), readonly=True
    )
    low = min(size, layout.FIRMWARE_LOW_ALIAS)
    vm.set_user_memory_region(
        FIRMWARE_SLOT_BASE + 1,
        layout.HIMEM_START - low,
        low,
        mapping_address(fw, size - low),
        readonly=True,
    )


_firmware_map = None
