"""A virtio function's PCI configuration space: a type 0 header and its capabilities.

PCI Local Bus 3.0 6.1 (header), 6.7 (capability list), 6.8.2 (MSI-X); virtio 1.2 4.1.4
(virtio_pci_cap for the common, notify, ISR and device configuration structures). The image
is built on each read (enumeration is rare); writes go byte by byte to the few writable
bits: the command register, the interrupt line and MSI-X's enable and function mask. The
BAR registers (0x10-0x27) are the monitor's: it never forwards them, and here they read 0.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from splitvmm.devprocs.virtio.msix import PBA_OFFSET
from splitvmm.protocol.models import VIRTIO_NOTIFY_MULTIPLIER, VIRTIO_PCI_VENDOR_ID
from splitvmm.record import Struct

if TYPE_CHECKING:
    from splitvmm.devprocs.virtio.pci import VirtioPciDevice

# BAR 0 (the contract's layout): each structure's offset, as the capabilities announce them
COMMON_SIZE = 0x3C  # struct virtio_pci_common_cfg with queue_notify_data and queue_reset
ISR_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_SIZE = 0x1000
CAP_START = 0x40
COMMAND = 0x04
STATUS = 0x06
INTERRUPT_LINE = 0x3C
# Command bits a driver may set (PCI 3.0 6.2.2): memory space, bus master, parity error
# response, SERR#, interrupt disable. No I/O BAR, so no I/O space bit.
COMMAND_MEMORY, COMMAND_MASTER = 0x0002, 0x0004
COMMAND_INTX_DISABLE = 0x0400
COMMAND_WRITABLE = COMMAND_MEMORY | COMMAND_MASTER | 0x0040 | 0x0100 | COMMAND_INTX_DISABLE
STATUS_INTERRUPT = 0x0008  # an interrupt pending (asserted on INTA# unless disabled)
SUBSYSTEM_ID_BASE = 0x40
STATUS_CAP_LIST = 0x0010

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
# virtio_pci_cap cfg_type (virtio 1.2 4.1.4)
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG = 1, 2, 3, 4, 5
# Where the PCI_CFG capability (the last before MSI-X) sits: after the four structures'
PCI_CFG_CAP = CAP_START + 16 + 20 + 16 + 16
PCI_CFG_DATA = PCI_CFG_CAP + 16  # pci_cfg_data[4]
VIRTIO_CAP = struct.Struct("<BBBBBBxxII")  # vndr, next, len, type, bar, id, offset, length
MSIX_CAP = struct.Struct("<BBHII")  # id, next, message control, table, PBA (offset | BIR)
MSIX_BAR = 1


def _caps(dev: VirtioPciDevice) -> list[bytes]:
    """The capabilities in list order, without their next pointers."""
    notify = dev.function.notify
    assert notify is not None  # checked by VirtioPciDevice
    length = notify.queues * notify.multiplier
    ctl = dev.msix.vectors - 1
    ctl |= (MSIX_ENABLE if dev.msix.enabled else 0) | (
        MSIX_FUNCTION_MASK if dev.msix.function_mask else 0
    )
    return [
        VIRTIO_CAP.pack(PCI_CAP_ID_VNDR, 0, 16, COMMON_CFG, 0, 0, 0, COMMON_SIZE),
        VIRTIO_CAP.pack(PCI_CAP_ID_VNDR, 0, 20, NOTIFY_CFG, notify.bar, 0, notify.offset, length)
        + struct.pack("<I", VIRTIO_NOTIFY_MULTIPLIER),
        VIRTIO_CAP.pack(PCI_CAP_ID_VNDR, 0, 16, ISR_CFG, 0, 0, ISR_OFFSET, 1),
        VIRTIO_CAP.pack(
            PCI_CAP_ID_VNDR, 0, 16, DEVICE_CFG, 0, 0, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE
        ),
        VIRTIO_CAP.pack(PCI_CAP_ID_VNDR, 0, 20, PCI_CFG, *dev.cfg_access.fields()) + bytes(4),
        MSIX_CAP.pack(PCI_CAP_ID_MSIX, 0, ctl, 0 | MSIX_BAR, PBA_OFFSET | MSIX_BAR),
    ]


class CfgAccess(Struct):
    """VIRTIO_PCI_CAP_PCI_CFG (virtio 1.2 4.1.4.9): a window onto BAR 0 or 1 through
    configuration space, for a driver that cannot map the BARs yet. The driver sets bar,
    offset and length in the capability, then reads or writes pci_cfg_data."""

    bar: int = 0
    offset: int = 0
    length: int = 0

    def fields(self) -> tuple[int, int, int, int]:
        """(bar, id, offset, length) as the capability shows them."""
        return self.bar, 0, self.offset, self.length

    def write_byte(self, at: int, byte: int) -> None:
        """A byte of the capability's bar, offset or length fields."""
        if at == 4:
            self.bar = byte
        elif 8 <= at < 16:
            name = "offset" if at < 12 else "length"
            shift = 8 * (at % 4)
            setattr(self, name, getattr(self, name) & ~(0xFF << shift) | byte << shift)

    def target(self, dev: VirtioPciDevice) -> int | None:
        """The window offset the access selects; None if it selects nothing the device has."""
        if self.bar not in (0, 1) or self.length not in (1, 2, 4) or self.offset % self.length:
            return None
        region = dev.function.region_of_bar(self.bar)
        if self.offset + self.length > region.size:
            return None
        return region.start + self.offset


def _cfg_data_write(dev: VirtioPciDevice, target: int, start: int, data: bytes) -> None:
    """A write to pci_cfg_data (byte `start` of it on): the device writes the first
    cap.length bytes of pci_cfg_data at the target (4.1.4.9.1). pci_cfg_data is read-write,
    so a write of part of it keeps the rest: here the rest is the target as it reads now,
    which is what pci_cfg_data holds after the driver's read of it (a read loads it), and
    a 32-bit register written as two halves or four bytes ends up whole. A write past the
    first cap.length bytes changes none of them and writes nothing."""
    length = dev.cfg_access.length
    if start >= length:
        return
    if start == 0 and len(data) >= length:
        dev.write(target, data[:length])
        return
    value = bytearray((dev._read(target, length) or b"").ljust(length, b"\0"))
    value[start : start + len(data)] = data
    dev.write(target, bytes(value[:length]))


def _cfg_data_read(dev: VirtioPciDevice) -> bytes:
    at = dev.cfg_access.target(dev)
    value = None if at is None else dev._read(at, dev.cfg_access.length)
    return (value or b"").ljust(4, b"\0")


def image(dev: VirtioPciDevice) -> bytearray:
    """The first 256 bytes of configuration space as the guest reads them now."""
    img = bytearray(256)
    status = STATUS_CAP_LIST | (STATUS_INTERRUPT if dev.interrupt_status() else 0)
    struct.pack_into("<HHHHB", img, 0, VIRTIO_PCI_VENDOR_ID, 0x1040 + dev.DEVICE_ID,
                     dev.command, status, 1)  # fmt: skip
    img[0x09:0x0C] = dev.CLASS_CODE.to_bytes(3, "little")  # prog-if, subclass, class
    # Subsystem: a non-transitional device's ID SHOULD be 0x40 or more (virtio 1.2 4.1.2.1),
    # below which a legacy driver reads the device type.
    struct.pack_into("<HH", img, 0x2C, VIRTIO_PCI_VENDOR_ID, SUBSYSTEM_ID_BASE + dev.DEVICE_ID)
    img[0x34] = CAP_START
    img[INTERRUPT_LINE], img[0x3D] = dev.interrupt_line, 1  # INTA#
    at = CAP_START
    caps = _caps(dev)
    for i, cap in enumerate(caps):
        img[at : at + len(cap)] = cap
        at += len(cap)
        img[at - len(cap) + 1] = at if i + 1 < len(caps) else 0  # next pointer
    return img


def msix_cap_offset(dev: VirtioPciDevice) -> int:
    return CAP_START + sum(len(c) for c in _caps(dev)[:-1])


def read(dev: VirtioPciDevice, offset: int, size: int) -> bytes | None:
    if size not in (1, 2, 4) or offset % size:
        return None
    if offset >= 256:
        return bytes(size)  # no extended capabilities
    if PCI_CFG_DATA <= offset < PCI_CFG_DATA + 4:  # the access runs on a read of the data
        return _cfg_data_read(dev)[offset - PCI_CFG_DATA :][:size]
    return bytes(image(dev)[offset : offset + size])


def write(dev: VirtioPciDevice, offset: int, data: bytes) -> bool:
    if len(data) not in (1, 2, 4) or offset % len(data):
        return False
    if PCI_CFG_DATA <= offset < PCI_CFG_DATA + 4:
        target = dev.cfg_access.target(dev)
        if target is not None:
            _cfg_data_write(dev, target, offset - PCI_CFG_DATA, data)
        return target is not None
    control = msix_cap_offset(dev) + 2
    for at, byte in enumerate(data, offset):
        if PCI_CFG_CAP <= at < PCI_CFG_DATA:
            dev.cfg_access.write_byte(at - PCI_CFG_CAP, byte)
        elif at in (COMMAND, COMMAND + 1):
            shift = 8 * (at - COMMAND)
            dev.set_command((dev.command & ~(0xFF << shift) | byte << shift) & COMMAND_WRITABLE)
        elif at == INTERRUPT_LINE:
            dev.interrupt_line = byte
        elif at == control + 1:  # bits 15 (enable) and 14 (function mask)
            dev.msix.set_control(bool(byte & 0x80), bool(byte & 0x40))
    dev.intx.update()  # INTx enabled again, or MSI-X turned off, with the ISR set
    return True
