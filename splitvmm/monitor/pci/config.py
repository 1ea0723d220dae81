"""The type 0 configuration header (PCI Local Bus 3.0 6.1) and the functions the monitor serves.

A ConfigSpace answers accesses that stay inside one dword of its configuration space
(offset + size <= the dword's end, size 1, 2 or 4); the root guarantees it, whatever
the guest sent.
"""

from __future__ import annotations

import threading
from typing import Protocol

# Header registers (6.1, figure 6-1), by byte offset.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # programming interface; sub-class at 0x0A, base class at 0x0B
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
BAR_END = BAR0 + 4 * BAR_COUNT
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C

CONFIG_SPACE_SIZE = 256  # conventional PCI; what mechanism #1 reaches
ECAM_FUNCTION_SIZE = 4096  # PCI Express extended space; what ECAM reaches

HEADER_TYPE_NORMAL = 0x00  # type 0, single function
# Command register bits a host bridge implements (6.2.2): I/O and memory space, bus master,
# parity error response and SERR# enable; the rest read as zero.
COMMAND_WRITABLE = 0x0147

# The host bridge's identity: Intel's 82441FX (440FX PMC), the host bridge QEMU's pc machine
# and crosvm show at 00:00.0. Linux has no quirk for it that would touch hardware we lack.
PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_82441 = 0x1237
PCI_CLASS_BRIDGE_HOST = 0x060000  # base class 06 (bridge), sub-class 00 (host), prog-if 00
HOST_BRIDGE_REVISION = 0x02  # what QEMU's i440FX reports


class ConfigSpace(Protocol):
    """A PCI function's configuration space, as the root sees it."""

    name: str

    def config_read(self, offset: int, size: int) -> bytes: ...
    def config_write(self, offset: int, data: bytes) -> None: ...


class HostBridge:
    """The host bridge at 00:00.0: a read-only type 0 header with no BARs, served here."""

    name = "pci-host-bridge"

    def __init__(self) -> None:
        regs = bytearray(CONFIG_SPACE_SIZE)
        regs[VENDOR_ID : VENDOR_ID + 2] = PCI_VENDOR_ID_INTEL.to_bytes(2, "little")
        regs[DEVICE_ID : DEVICE_ID + 2] = PCI_DEVICE_ID_INTEL_82441.to_bytes(2, "little")
        regs[REVISION_ID] = HOST_BRIDGE_REVISION
        regs[CLASS_CODE : CLASS_CODE + 3] = PCI_CLASS_BRIDGE_HOST.to_bytes(3, "little")
        regs[HEADER_TYPE] = HEADER_TYPE_NORMAL
        self._regs = regs
        # Bits the guest may change, byte by byte: the command register and the interrupt
        # line (a scratch byte for software, 6.2.4); everything else is read-only.
        writable = bytearray(CONFIG_SPACE_SIZE)
        writable[COMMAND : COMMAND + 2] = COMMAND_WRITABLE.to_bytes(2, "little")
        writable[INTERRUPT_LINE] = 0xFF
        self._writable = bytes(writable)
        self._lock = threading.Lock()  # vCPUs write concurrently; each access is atomic

    def config_read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE_SIZE:
            return bytes(size)  # no extended capabilities (PCIe 7.9.1: a zero header ends them)
        with self._lock:
            return bytes(self._regs[offset : offset + size])

    def config_write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE_SIZE:
            return
        with self._lock:
            for i, byte in enumerate(data):
                mask = self._writable[offset + i]
                old = self._regs[offset + i]
                self._regs[offset + i] = (old & ~mask) | (byte & mask)

    def saved(self) -> tuple[int, int]:
        """What the guest may have written: (command, interrupt line), for a snapshot."""
        with self._lock:
            command = int.from_bytes(self._regs[COMMAND : COMMAND + 2], "little")
            return command, self._regs[INTERRUPT_LINE]

    def restore(self, command: int, interrupt_line: int) -> None:
        """Put saved registers back as the guest's writes would (read-only bits stay)."""
        self.config_write(COMMAND, command.to_bytes(2, "little"))
        self.config_write(INTERRUPT_LINE, bytes([interrupt_line]))
