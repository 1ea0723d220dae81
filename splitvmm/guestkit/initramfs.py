"""A writer for the cpio "newc" format, the one format Linux unpacks as an initramfs.

Format (cpio(5), "New ASCII Format"; Linux Documentation/driver-api/early-userspace/
buffer-format.rst): each member is a 110-byte header of ASCII hex fields, then the path name
with its NUL, padded to a multiple of 4 bytes, then the data, padded to a multiple of 4. The
archive ends with a member named "TRAILER!!!".

Written here rather than with libarchive-c so that the kit needs no C library and no extra
dependency, and so the archive is byte-for-byte reproducible: inode numbers are assigned in
order and every mtime, uid and gid is fixed.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from typing import IO, Protocol

from splitvmm.record import Struct

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110  # 6 bytes of magic + 13 fields of 8 hex digits
NEWC_TRAILER = "TRAILER!!!"
NEWC_ALIGN = 4


class ByteSink(Protocol):
    """Where an archive goes: a file, a GzipFile, a BytesIO."""

    def write(self, data: bytes, /) -> object: ...


class CpioEntry(Struct, frozen=True):
    """One archive member. `name` has no leading "/": the kernel unpacks relative to rootfs."""

    name: str
    mode: int  # file type bits (stat.S_IF*) | permission bits
    data: bytes = b""  # file contents, or the target of a symlink
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular_file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    # Device nodes exist only inside the archive: building one needs no root on the host.
    return CpioEntry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % NEWC_ALIGN)


def _header(entry: CpioEntry, ino: int, mtime: int) -> bytes:
    name_size = len(entry.name.encode()) + 1  # namesize counts the terminating NUL
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid: root
        0,  # gid: root
        nlink,
        mtime,
        len(entry.data),
        0,  # devmajor of the (nonexistent) file system the member came from
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check: only used by the 070702 (CRC) variant
    )
    return NEWC_MAGIC + b"".join(b"%08x" % field for field in fields)


def _member(entry: CpioEntry, ino: int, mtime: int) -> bytes:
    name = entry.name.encode() + b"\0"
    head = _header(entry, ino, mtime) + name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def write_newc(entries: Iterable[CpioEntry], out: ByteSink, mtime: int = 0) -> None:
    """Write `entries` in order (parents before children), then the trailer."""
    for ino, entry in enumerate(entries, start=1):
        if entry.name.startswith("/") or not entry.name:
            raise ValueError(f"cpio member name {entry.name!r} must be relative and non-empty")
        out.write(_member(entry, ino, mtime))
    # The trailer is a member like any other (ino and mode 0, nlink 1, as gen_init_cpio).
    out.write(_member(CpioEntry(NEWC_TRAILER, 0), ino=0, mtime=0))


def write_initramfs(entries: Iterable[CpioEntry], out: IO[bytes]) -> None:
    """Write a gzip-compressed newc archive; mtime 0 and no file name keep it reproducible."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        write_newc(entries, gz)
