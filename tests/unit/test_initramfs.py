"""The newc cpio writer, checked against the format spec with a reader written here from
cpio(5) and Linux's early-userspace buffer-format.rst (not from the writer)."""

from __future__ import annotations

import gzip
import io
import re
import stat

import pytest

from splitvmm.guestkit.initramfs import (
    CpioEntry,
    char_device,
    directory,
    regular_file,
    symlink,
    write_initramfs,
    write_newc,
)
from splitvmm.record import Struct

FIELDS = (
    "ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check"
).split()


class Member(Struct, frozen=True):
    offset: int  # of the header in the archive
    magic: bytes
    fields: dict[str, int]
    raw_name: bytes  # namesize bytes, NUL included
    data: bytes
    name_pad: bytes
    data_pad: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_newc(buf: bytes) -> list[Member]:
    """Every member up to and including TRAILER!!!."""
    members = []
    offset = 0
    while True:
        magic = buf[offset : offset + 6]
        fields = {
            f: int(buf[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i, f in enumerate(FIELDS)
        }
        name_start = offset + 110
        name_end = name_start + fields["namesize"]
        data_start = _align4(name_end)
        data_end = data_start + fields["filesize"]
        member = Member(
            offset=offset,
            magic=magic,
            fields=fields,
            raw_name=buf[name_start:name_end],
            data=buf[data_start:data_end],
            name_pad=buf[name_end:data_start],
            data_pad=buf[data_end : _align4(data_end)],
        )
        members.append(member)
        offset = _align4(data_end)
        if member.raw_name == b"TRAILER!!!\0":
            return members


def archive(*entries: CpioEntry, mtime: int = 0) -> bytes:
    out = io.BytesIO()
    write_newc(entries, out, mtime=mtime)
    return out.getvalue()


def members(*entries: CpioEntry) -> list[Member]:
    return parse_newc(archive(*entries))


SAMPLE = (
    directory("bin"),
    regular_file("bin/busybox", b"\x7fELF-ish", perm=0o755),
    symlink("bin/sh", "busybox"),
    char_device("dev/console", 5, 1),
    regular_file("init", b"#!/bin/sh\n", perm=0o755),
)


def test_write_newc_every_member_has_magic_070701():
    parsed = members(*SAMPLE)
    assert {m.magic for m in parsed} == {b"070701"}


def test_write_newc_namesize_counts_the_nul():
    (first, _trailer) = members(regular_file("init", b"x"))
    assert (first.fields["namesize"], first.raw_name) == (5, b"init\0")


def test_write_newc_headers_start_4_byte_aligned():
    parsed = members(*SAMPLE)
    assert [m.offset % 4 for m in parsed] == [0] * len(parsed)


def test_write_newc_name_padding_is_nul_to_4_bytes():
    (first, _trailer) = members(regular_file("ab", b"x"))  # 110 + 3 = 113 -> 3 bytes of pad
    assert first.name_pad == b"\0\0\0"


def test_write_newc_data_padding_is_nul_to_4_bytes():
    (first, _trailer) = members(regular_file("f", b"12345"))
    assert (first.data, first.data_pad) == (b"12345", b"\0\0\0")


def test_write_newc_archive_length_is_multiple_of_4():
    data = archive(*SAMPLE)
    assert len(data) % 4 == 0


def test_write_newc_last_member_is_trailer_with_nothing_after():
    data = archive(*SAMPLE)
    trailer = parse_newc(data)[-1]
    assert (trailer.raw_name, trailer.fields["filesize"], trailer.fields["nlink"]) == (
        b"TRAILER!!!\0",
        0,
        1,
    )
    assert _align4(trailer.offset + 110 + 11) == len(data)


def test_write_newc_regular_file_has_mode_size_and_data():
    (first, _trailer) = members(regular_file("bin/busybox", b"abc", perm=0o755))
    assert (first.fields["mode"], first.fields["filesize"], first.data) == (
        stat.S_IFREG | 0o755,
        3,
        b"abc",
    )


def test_write_newc_symlink_data_is_target_without_nul():
    (first, _trailer) = members(symlink("bin/sh", "busybox"))
    assert (stat.S_ISLNK(first.fields["mode"]), first.data) == (True, b"busybox")


def test_write_newc_char_device_carries_rdev():
    (first, _trailer) = members(char_device("dev/console", 5, 1))
    fields = first.fields
    assert (stat.S_ISCHR(fields["mode"]), fields["rdevmajor"], fields["rdevminor"]) == (True, 5, 1)


def test_write_newc_directory_has_nlink_2():
    (first, _trailer) = members(directory("proc"))
    assert (stat.S_ISDIR(first.fields["mode"]), first.fields["nlink"]) == (True, 2)


def test_write_newc_inodes_are_distinct_and_nonzero():
    inodes = [m.fields["ino"] for m in members(*SAMPLE)[:-1]]
    assert sorted(set(inodes)) == [1, 2, 3, 4, 5]


def test_write_newc_owner_is_root():
    parsed = members(*SAMPLE)
    assert {(m.fields["uid"], m.fields["gid"]) for m in parsed} == {(0, 0)}


def test_write_newc_mtime_is_the_given_one():
    (first, _trailer) = parse_newc(archive(directory("d"), mtime=1_700_000_000))
    assert first.fields["mtime"] == 1_700_000_000


def test_write_newc_header_fields_are_8_hex_digits():
    data = archive(regular_file("f", b""))
    assert re.fullmatch(rb"[0-9a-f]{104}", data[6:110])


def test_write_newc_absolute_name_raises():
    with pytest.raises(ValueError, match="relative"):
        archive(regular_file("/init", b""))


def test_write_initramfs_output_is_gzip_of_the_newc_archive():
    out = io.BytesIO()
    write_initramfs(SAMPLE, out)
    assert gzip.decompress(out.getvalue()) == archive(*SAMPLE)


def test_write_initramfs_same_input_same_bytes():
    first, second = io.BytesIO(), io.BytesIO()
    write_initramfs(SAMPLE, first)
    write_initramfs(SAMPLE, second)
    assert first.getvalue() == second.getvalue()
