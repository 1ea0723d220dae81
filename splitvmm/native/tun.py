"""A TAP device (Linux TUN/TAP driver, Documentation/networking/tuntap.rst): the backend of a
virtio-net device.

The monitor opens /dev/net/tun, attaches it to a TAP by name (the kernel makes the TAP if
none has that name and the caller may; it takes the existing one otherwise) with a virtio
net header in front of every frame (IFF_VNET_HDR), and hands the fd to the device process,
which reads and writes frames on it and changes its offloads as the guest negotiates them,
nothing else. The ioctl numbers and flags come from <linux/if_tun.h> through cffi (this is
the native layer: no number typed by hand).
"""

from __future__ import annotations

import fcntl
import os
import struct

from splitvmm.native._sys import ffi, lib

TUN_PATH = "/dev/net/tun"
IFNAMSIZ: int = lib.IFNAMSIZ
TUNSETOFFLOAD: int = lib.TUNSETOFFLOAD
TUN_F_CSUM: int = lib.TUN_F_CSUM  # the TAP may hand us frames with a partial checksum
TUN_F_TSO4: int = lib.TUN_F_TSO4  # ... TCP segments larger than the MTU (IPv4)
TUN_F_TSO6: int = lib.TUN_F_TSO6  # ... (IPv6)
TUN_F_TSO_ECN: int = lib.TUN_F_TSO_ECN  # ... with ECN (CWR) set on the large segment
# The virtio net header with VIRTIO_F_VERSION_1 (virtio 1.2 5.1.6): flags, gso_type,
# hdr_len, gso_size, csum_start, csum_offset, num_buffers.
VNET_HDR_SIZE = 12
_INT = struct.Struct("i")
ALL_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN  # what a guest may take


def open_tap(name: str) -> tuple[int, str, bool]:
    """An fd on TAP `name` (made if missing), non-blocking and close-on-exec, without the
    packet-information prefix, with a VNET_HDR_SIZE-byte virtio net header per frame and no
    offloads yet; the name the kernel attached it to; and whether it takes ALL_OFFLOADS
    (tried now, then cleared: offloads are the TAP's, not an fd's, so only the fd's opener,
    before any device uses it, may try them). OSError naming the call."""
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ or b"\0" in encoded or b"/" in encoded:
        raise ValueError(f"TAP name {name!r} is not 1-{IFNAMSIZ - 1} bytes of an interface name")
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        attached = ffi.new("char[]", IFNAMSIZ)
        flags = lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR
        if lib.sv_tun_set_iff(fd, encoded, flags, attached) < 0:
            raise OSError(ffi.errno, f"TUNSETIFF {name!r}: {os.strerror(ffi.errno)}")
        set_vnet_hdr_size(fd, VNET_HDR_SIZE)
        try:
            set_offload(fd, ALL_OFFLOADS)
            takes_offloads = True
        except OSError:  # EINVAL: a TAP without those offloads
            takes_offloads = False
        set_offload(fd, 0)
        return fd, ffi.string(attached).decode(), takes_offloads
    except BaseException:
        os.close(fd)
        raise


def set_vnet_hdr_size(fd: int, size: int) -> None:
    fcntl.ioctl(fd, lib.TUNSETVNETHDRSZ, _INT.pack(size))


def vnet_hdr_size(fd: int) -> int:
    """The TAP's virtio net header size; OSError (ENOTTY, EINVAL) if fd is no TAP."""
    raw = fcntl.ioctl(fd, lib.TUNGETVNETHDRSZ, bytes(_INT.size))
    return int(_INT.unpack(raw)[0])


def set_offload(fd: int, flags: int) -> None:
    """TUN_F_* offloads the TAP may hand us (the guest took them); OSError if it cannot."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
