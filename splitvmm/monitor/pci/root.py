"""Bus 0 and the two doors into its configuration space: mechanism #1 and ECAM.

Mechanism #1 (PCI Local Bus 3.0 3.2.2.3.2): a dword write to 0xCF8 latches an address
(bit 31 enable, bus, device, function, dword register); accesses to 0xCFC-0xCFF then reach
that dword, byte k of it at 0xCFC + k. Only a dword access is the address register; with
the enable bit clear the data ports are ordinary (absent) I/O. ECAM (PCI Express Base 4.0
7.2.2): one 4 KiB page per function, at bus << 20 | device << 15 | function << 12.

The byte at 0xCF9, inside mechanism #1's window but no part of it, is the chipset's reset
control register (Intel's RST_CNT, PIIX's RCR): Linux's reboot=pci writes RST_CPU there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from splitvmm.errors import ConfigError
from splitvmm.monitor.bus import aligned_pieces
from splitvmm.monitor.pci.config import (
    CONFIG_SPACE_SIZE,
    ECAM_FUNCTION_SIZE,
    ConfigSpace,
    HostBridge,
)
from splitvmm.protocol.models import MODELS, PciFunction

if TYPE_CHECKING:
    from splitvmm.config import DeviceSection

DEVICES = 32
FUNCTIONS = 8
HOST_BRIDGE_DEVICE = 0
BUS0 = 0

CONFIG_ADDRESS_ENABLE = 1 << 31
# 3.2.2.3.2: bits 30:24 are reserved and bits 1:0 read as zero.
CONFIG_ADDRESS_MASK = CONFIG_ADDRESS_ENABLE | 0x00FF_FFFC
CONFIG_DATA_OFFSET = 4  # 0xCFC within the 0xCF8 window
RESET_CONTROL_OFFSET = 1  # 0xCF9 within it
# Writing RST_CPU resets; bits 1 (SYS_RST) and 3 (FULL_RST) choose how hard, which makes no
# difference here (a reset ends the VM), so none is kept: the register reads 0.
RST_CPU = 1 << 2


def _absent(size: int) -> bytes:
    return b"\xff" * size


def device_numbers(devices: Iterable[DeviceSection]) -> dict[str, int]:
    """Each PCI device's number on bus 0, by name, of a config's `devices` (in its order): one
    after another past the host bridge's. Machine plugs them there, and a restore's saved PCI
    chunk must find each at its number (restore.check_compatible: `snapshot verify` too)."""
    names = (d.name for d in devices if isinstance(MODELS[d.model].transport, PciFunction))
    numbers: dict[str, int] = {}
    for device, name in enumerate(names, HOST_BRIDGE_DEVICE + 1):
        if device >= DEVICES:
            raise ConfigError(f"PCI bus 0 is full: {DEVICES} devices")
        numbers[name] = device
    return numbers


class PciRoot:
    """The function registry of bus 0; absent functions read all-ones, right here."""

    def __init__(self) -> None:
        self._functions: dict[tuple[int, int], ConfigSpace] = {}
        self.host_bridge = HostBridge()
        self.add(HOST_BRIDGE_DEVICE, 0, self.host_bridge)

    def add(self, device: int, function: int, space: ConfigSpace) -> None:
        if not (0 <= device < DEVICES and 0 <= function < FUNCTIONS):
            raise ConfigError(f"PCI function {space.name}: {device}.{function} is not on bus 0")
        if (device, function) in self._functions:
            raise ConfigError(f"PCI function {space.name}: 00:{device:02x}.{function} is taken")
        self._functions[(device, function)] = space

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> bytes:
        space = self._functions.get((device, function)) if bus == BUS0 else None
        if space is None:
            return _absent(size)
        if offset % size:  # inside one dword, but not aligned: a byte at a time
            return b"".join(space.config_read(offset + i, 1) for i in range(size))
        return space.config_read(offset, size)

    def config_write(self, bus: int, device: int, function: int, offset: int, data: bytes) -> None:
        space = self._functions.get((device, function)) if bus == BUS0 else None
        if space is None:
            return  # absent: the write goes nowhere (master abort)
        if offset % len(data):
            for i, byte in enumerate(data):
                space.config_write(offset + i, bytes([byte]))
            return
        space.config_write(offset, data)


def _in_one_dword(offset: int, size: int) -> bool:
    return size in (1, 2, 4) and offset % 4 + size <= 4


class ConfigPorts:
    """Mechanism #1: the port bus's window at 0xCF8-0xCFF. The address latch is VM state: a
    vCPU paused between its `out 0xCF8` and its `in 0xCFC` for a snapshot reads, once
    restored, the register it chose (monitor/pci/state.py)."""

    name = "pci-config-ports"

    def __init__(self, root: PciRoot, reset: Callable[[], None] | None = None) -> None:
        """`reset`: what a write of RST_CPU to 0xCF9 does (None: 0xCF9 is absent I/O)."""
        self.root = root
        self._reset = reset
        self._address = 0
        self._lock = threading.Lock()  # latch and use the address as one step, per access

    @property
    def address(self) -> int:
        with self._lock:
            return self._address

    def restore_address(self, value: int) -> None:
        """Latch a saved address as a dword write to 0xCF8 would (reserved bits dropped)."""
        self.write(0, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def read(self, offset: int, size: int) -> bytes:
        if offset < CONFIG_DATA_OFFSET < offset + size:
            return b"".join(self.read(at, n) for at, n in _cycles(offset, size))
        if offset == 0 and size == 4:
            return self._address.to_bytes(4, "little")
        if offset < CONFIG_DATA_OFFSET:  # 0xCF8-0xCFB but not the address register
            control = RESET_CONTROL_OFFSET if self._reset is not None else None
            return bytes(0 if at == control else 0xFF for at in range(offset, offset + size))
        target = self._target(offset, size)
        if target is None:
            return _absent(size)
        return self.root.config_read(*target, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < CONFIG_DATA_OFFSET < offset + len(data):
            for at, n in _cycles(offset, len(data)):
                self.write(at, data[at - offset : at - offset + n])
            return
        if offset == 0 and len(data) == 4:
            with self._lock:
                self._address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
            return
        if offset < CONFIG_DATA_OFFSET:  # 0xCF8-0xCFB but not the address register
            reset = self._reset
            for at, value in enumerate(data, offset):
                if reset is not None and at == RESET_CONTROL_OFFSET and value & RST_CPU:
                    reset()
            return
        target = self._target(offset, len(data))
        if target is not None:
            self.root.config_write(*target, data)

    def _target(self, offset: int, size: int) -> tuple[int, int, int, int] | None:
        """(bus, device, function, register offset) of a data-port access, or None when
        it is no config access (enable clear, or not inside 0xCFC-0xCFF)."""
        byte = offset - CONFIG_DATA_OFFSET
        with self._lock:
            address = self._address
        if byte < 0 or not _in_one_dword(byte, size) or not address & CONFIG_ADDRESS_ENABLE:
            return None
        bus, device = (address >> 16) & 0xFF, (address >> 11) & 0x1F
        function, register = (address >> 8) & 0x7, address & (CONFIG_SPACE_SIZE - 4)
        return bus, device, function, register + byte


def _cycles(offset: int, size: int) -> list[tuple[int, int]]:
    """(offset, size) of each cycle of an access that runs from 0xCF8-0xCFB into 0xCFC: the
    CPU splits a misaligned I/O access at the dword boundary (Intel SDM vol. 1, "I/O Address
    Space"), so the bytes from 0xCFC on are a data-port access, in the aligned pieces a
    function takes (3 bytes go as 2 and 1), as the bus splits an access at a window's edge."""
    below = CONFIG_DATA_OFFSET - offset
    return [(offset, below), *aligned_pieces(CONFIG_DATA_OFFSET, size - below)]


class Ecam:
    """ECAM: the MMIO bus's window, 1 MiB per bus from bus 0."""

    name = "pci-ecam"

    def __init__(self, root: PciRoot) -> None:
        self._root = root

    def read(self, offset: int, size: int) -> bytes:
        if not _in_one_dword(offset, size):
            return _absent(size)  # PCIe 7.2.2: an access may not cross a dword
        return self._root.config_read(*self._target(offset), size)

    def write(self, offset: int, data: bytes) -> None:
        if _in_one_dword(offset, len(data)):
            self._root.config_write(*self._target(offset), data)

    @staticmethod
    def _target(offset: int) -> tuple[int, int, int, int]:
        bus, device = offset >> 20, (offset >> 15) & 0x1F
        function, register = (offset >> 12) & 0x7, offset & (ECAM_FUNCTION_SIZE - 1)
        return bus, device, function, register
