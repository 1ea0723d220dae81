"""The kernel in an unpacked linux-image package: its release, its bzImage, its modules."""

from __future__ import annotations

import struct
from pathlib import Path

from splitvmm.guestkit.errors import GuestKitError
from splitvmm.record import Struct

# Linux Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header".
SETUP_HEADER_MAGIC = b"HdrS"
SETUP_HEADER_MAGIC_OFFSET = 0x202
SETUP_VERSION_OFFSET = 0x206  # u16 boot protocol version, 0x020f = 2.15
SETUP_XLOADFLAGS_OFFSET = 0x236  # u16, protocol 2.12+
SETUP_HEADER_END = 0x268
XLF_KERNEL_64 = 1 << 0  # has the 64-bit entry point at 0x200 past the protected-mode code
MIN_BOOT_PROTOCOL = 0x020C  # xloadflags and the 64-bit entry need 2.12

# Debian 12 keeps modules in /lib/modules; merged-/usr releases move them to /usr/lib/modules.
MODULE_ROOTS = ("lib/modules", "usr/lib/modules")


class BzImageInfo(Struct, frozen=True):
    protocol: int  # e.g. 0x020f
    xloadflags: int

    @property
    def protocol_text(self) -> str:
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"


def bzimage_info(head: bytes) -> BzImageInfo:
    """Check the setup header of a bzImage (its first bytes) and read what the loader needs."""
    if len(head) < SETUP_HEADER_END:
        raise GuestKitError(f"kernel image is {len(head)} bytes, too short to be a bzImage")
    magic = head[SETUP_HEADER_MAGIC_OFFSET : SETUP_HEADER_MAGIC_OFFSET + 4]
    if magic != SETUP_HEADER_MAGIC:
        raise GuestKitError("kernel image has no 'HdrS' setup header: not a bzImage")
    (protocol,) = struct.unpack_from("<H", head, SETUP_VERSION_OFFSET)
    (xloadflags,) = struct.unpack_from("<H", head, SETUP_XLOADFLAGS_OFFSET)
    if protocol < MIN_BOOT_PROTOCOL or not xloadflags & XLF_KERNEL_64:
        raise GuestKitError(
            f"bzImage speaks boot protocol {protocol:#06x} with xloadflags {xloadflags:#x};"
            " splitvmm needs 2.12+ with a 64-bit entry point"
        )
    return BzImageInfo(protocol, xloadflags)


class UnpackedKernel(Struct, frozen=True):
    release: str  # uname -r, e.g. 6.1.0-50-cloud-amd64
    vmlinuz: Path
    moddir: Path


def find_kernel(root: Path) -> UnpackedKernel:
    """The one kernel under `root` (where dpkg-deb -x put a linux-image package)."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise GuestKitError(
            f"expected one boot/vmlinuz-* in the kernel package, found {len(images)}"
        )
    release = images[0].name.removeprefix("vmlinuz-")
    for modules in MODULE_ROOTS:
        moddir = root / modules / release
        if moddir.is_dir():
            return UnpackedKernel(release, images[0], moddir)
    raise GuestKitError(f"the kernel package has no modules directory for {release}")
