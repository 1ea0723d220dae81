"""Snapshot reader: every corrupt, truncated, missing or foreign part gives a SnapshotError
that names the chunk (or manifest.json), never a traceback and never a half-loaded VM."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.monitor.memory import GuestMemory
from splitvmm.protocol.codec import MAX_FIELDS_DEPTH
from splitvmm.snapshot import Snapshot, SnapshotError, reader
from tests.unit.snapshot_support import (
    CHUNK_FILES,
    MEM_SIZE,
    MIB,
    PAGE,
    edit_manifest,
    flip_byte,
    memory,
    rehash,
    write_snapshot,
)

NAMES = list(CHUNK_FILES)
RAM_DATA = 32 + 16  # a RAM chunk's header, then its first extent's (offset, length)


@pytest.fixture
def snap(tmp_path) -> Path:
    mem = memory()
    path = write_snapshot(tmp_path / "s", mem)
    mem.close()
    return path


@pytest.fixture
def fresh() -> Iterator[GuestMemory]:
    m = memory(pages={})
    yield m
    m.close()


def _label(name: str) -> str:
    return rf"chunk {name} \({CHUNK_FILES[name]}\)"


def test_reader_intact_snapshot_verifies(snap):
    Snapshot.open(snap).verify()


@pytest.mark.parametrize("name", NAMES)
def test_reader_flipped_byte_fails_checksum(snap, name):
    # RAM's first extent's data starts after its 32-byte header and 16-byte record: a byte
    # there leaves the structure sound, so the checksum is what finds it
    flip_byte(snap / CHUNK_FILES[name], RAM_DATA + 5 if name == "ram" else 5)

    with pytest.raises(SnapshotError, match=f"{_label(name)}: checksum mismatch"):
        Snapshot.open(snap).verify()


@pytest.mark.parametrize("name", NAMES)
def test_reader_truncated_chunk_fails(snap, name):
    path = snap / CHUNK_FILES[name]
    size = path.stat().st_size
    os.truncate(path, size - 3)

    with pytest.raises(SnapshotError, match=f"{_label(name)}: truncated: {size - 3} bytes, "):
        Snapshot.open(snap).verify()


@pytest.mark.parametrize("name", NAMES)
def test_reader_extra_bytes_fail(snap, name):
    with open(snap / CHUNK_FILES[name], "ab") as f:
        f.write(b"\n")

    with pytest.raises(SnapshotError, match=f"{_label(name)}: .* bytes, manifest says"):
        Snapshot.open(snap).verify()


@pytest.mark.parametrize("name", NAMES)
def test_reader_missing_chunk_file_fails(snap, name):
    os.unlink(snap / CHUNK_FILES[name])

    with pytest.raises(SnapshotError, match=f"{_label(name)}: does not exist"):
        Snapshot.open(snap).verify()


def test_reader_symlinked_chunk_fails(snap, tmp_path):
    (tmp_path / "elsewhere.json").write_bytes((snap / "vcpu0.json").read_bytes())
    os.unlink(snap / "vcpu0.json")
    os.symlink(tmp_path / "elsewhere.json", snap / "vcpu0.json")

    with pytest.raises(SnapshotError, match=f"{_label('vcpu0')}: is a symlink"):
        Snapshot.open(snap).read_json("vcpu0")


def test_reader_fifo_chunk_fails_without_blocking(snap):
    os.unlink(snap / "vm.json")
    os.mkfifo(snap / "vm.json")

    with pytest.raises(SnapshotError, match=f"{_label('vm')}: is a FIFO, not a regular file"):
        Snapshot.open(snap).read_json("vm")


def test_reader_flipped_ram_byte_caught_by_load_alone(snap, fresh):
    flip_byte(snap / "ram.bin", 32 + 16 + 100)  # inside the first page's data

    with pytest.raises(SnapshotError, match=f"{_label('ram')}: checksum mismatch"):
        Snapshot.open(snap).load_ram(fresh)


def test_reader_restore_check_leaves_ram_data_to_load(snap, fresh):
    flip_byte(snap / "ram.bin", 32 + 16 + 100)
    opened = Snapshot.open(snap)

    opened.verify(ram_data=False)  # what a restore checks before it builds the VM

    with pytest.raises(SnapshotError, match=f"{_label('ram')}: checksum mismatch \\(blake3\\)"):
        opened.load_ram(fresh)


def test_reader_restore_check_refuses_a_truncated_ram_file(snap):
    os.truncate(snap / "ram.bin", 100)

    with pytest.raises(SnapshotError, match=f"{_label('ram')}: truncated: 100 bytes"):
        Snapshot.open(snap).verify(ram_data=False)


def test_reader_newer_format_version_refused(snap):
    edit_manifest(snap, lambda doc: doc.update(format_version=3))

    with pytest.raises(
        SnapshotError,
        match=r"^snapshot format: version 3 is newer than this splitvmm reads \(up to 2\): upgrade",
    ):
        Snapshot.open(snap)


def _set_chunk(chunk: str, **fields: object):
    return lambda doc: next(c for c in doc["chunks"] if c["name"] == chunk).update(fields)


def _pop_chunk_key(chunk: str, key: str):
    return lambda doc: next(c for c in doc["chunks"] if c["name"] == chunk).pop(key)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(extra=1), "manifest.json: unknown key 'extra'"),
        (lambda d: d.pop("cpuid"), "manifest.json: missing key 'cpuid'"),
        (lambda d: d.update(format="qemu"), "manifest.json: format is 'qemu'"),
        (
            lambda d: d.update(format_version="1"),
            "^snapshot format: version '1' is not a positive integer$",
        ),
        (
            lambda d: d.update(format_version=0),
            "^snapshot format: version 0 is not a positive integer$",
        ),
        (lambda d: d.update(created="yesterday"), "manifest.json: created 'yesterday'"),
        (lambda d: d.update(created="2024-01-01T00:00:00"), "has no UTC offset"),
        (
            lambda d: d.update(vm_config=[]),
            "manifest.json: vm_config: expected an object, got an array",
        ),
        (lambda d: d["memory"].update(size=3), "manifest.json: memory.size: 3 is outside 4096.."),
        (
            lambda d: d["memory"]["regions"][0].update(gpa=1),
            "memory.regions\\[0\\].gpa: 1 is not a multiple of 4096",
        ),
        (lambda d: d["memory"].update(regions=[]), "memory.regions: expected 1..16 items, got 0"),
        (
            lambda d: d["memory"]["regions"][0].update(size=PAGE),
            "manifest.json: memory: regions cover 4096 bytes",
        ),
        (_set_chunk("vcpu0", extra=1), "manifest.json: chunks\\['vcpu0'\\]: unknown key 'extra'"),
        (
            _set_chunk("vcpu0", model="serial"),
            "manifest.json: chunks\\['vcpu0'\\]: unknown key 'model'",
        ),
        (_pop_chunk_key("serial0", "model"), "chunks\\['serial0'\\]: missing key 'model'"),
        (_pop_chunk_key("ram", "encoding"), "chunks\\['ram'\\]: missing key 'encoding'"),
        (
            _set_chunk("ram", encoding="zstd-v9"),
            "chunks\\['ram'\\].encoding: 'zstd-v9' is not one of sparse-v1",
        ),
        (
            _set_chunk("vcpu0", file="../vcpu0.json"),
            "chunks\\['vcpu0'\\].file: '../vcpu0.json' is not a plain",
        ),
        (
            _set_chunk("vcpu0", file="sub/vcpu0.json"),
            "chunks\\['vcpu0'\\].file: 'sub/vcpu0.json' is not",
        ),
        (_set_chunk("vcpu0", file=".."), "chunks\\['vcpu0'\\].file: '..' is not a plain"),
        (_set_chunk("vcpu0", file="/etc/passwd"), "chunks\\['vcpu0'\\].file: '/etc/passwd' is not"),
        (
            _set_chunk("vcpu0", file="manifest.json"),
            "chunks\\['vcpu0'\\].file: 'manifest.json' is not",
        ),
        (_set_chunk("vcpu0", file="vm.json"), "chunks\\['vm'\\]: name or file used twice"),
        (_set_chunk("vcpu0", name="vm"), "chunks\\['vm'\\]: name or file used twice"),
        (_set_chunk("vcpu0", size="10"), "chunks\\['vcpu0'\\].size: expected an integer, got a"),
        (_set_chunk("vcpu0", size=True), "chunks\\['vcpu0'\\].size: expected an integer, got a"),
        (
            _set_chunk("vcpu0", size=1 << 30),
            "chunks\\['vcpu0'\\].size: 1073741824 is outside 0..2097152",
        ),
        (
            _set_chunk("vcpu0", state_version=0),
            "chunks\\['vcpu0'\\].state_version: 0 is outside 1..",
        ),
        (
            _set_chunk("vcpu0", digest={"alg": "blake3", "hex": "ABC"}),
            "chunks\\['vcpu0'\\].digest.hex: 'ABC' is not 64 lowercase hex",
        ),
        (
            _set_chunk("vcpu0", digest={"alg": "xxh3", "hex": "0" * 64}),
            "chunks\\['vcpu0'\\].digest.alg: 'xxh3' is not one of blake3, sha256",
        ),
        (
            _set_chunk("vcpu0", sha256="0" * 64),
            "chunks\\['vcpu0'\\]: unknown key 'sha256'",
        ),
        (
            _set_chunk("vcpu0", kind="disk"),
            r"chunks\['vcpu0'\].kind: 'disk' is not one of ram, vcpu, vm, device",
        ),
        (_set_chunk("vcpu0", name="a/b"), r"chunks\[1\].name: 'a/b' is not a name"),
        (_set_chunk("vcpu0", kind="ram", encoding="sparse-v1"), "needs exactly one ram chunk"),
        (lambda d: d.update(chunks=d["chunks"][1:]), "needs exactly one ram chunk"),
        (
            lambda d: d.update(chunks=d["chunks"] * 1030),
            "manifest.json: chunks: expected at most 4096 items, got 4120",
        ),
        (lambda d: d.update(chunks={}), "manifest.json: chunks: expected an array, got an object"),
    ],
)
def test_reader_bad_manifest_refused(snap, edit, message):
    edit_manifest(snap, edit)

    with pytest.raises(SnapshotError, match=message):
        Snapshot.open(snap)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"{not json", "manifest.json: not valid JSON"),
        (b"\xff\xfe", "manifest.json: not valid JSON"),
        (b"[]", "manifest.json: expected a JSON object"),
        (b'{"format": 1, "format": 2}', "duplicate key 'format'"),
        (b'{"format_version": NaN}', "NaN is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "manifest.json: (JSON nested too deeply|not valid)"),
        (b" " * (1 << 20) + b"{}", "manifest.json: 1048578 bytes, over the 1048576 cap"),
    ],
)
def test_reader_unreadable_manifest_refused(snap, data, message):
    (snap / "manifest.json").write_bytes(data)

    with pytest.raises(SnapshotError, match=message):
        Snapshot.open(snap)


def test_reader_missing_manifest_refused(snap):
    os.unlink(snap / "manifest.json")

    with pytest.raises(SnapshotError, match="manifest.json: does not exist"):
        Snapshot.open(snap)


def test_reader_missing_directory_refused(tmp_path):
    with pytest.raises(SnapshotError, match="^does not exist$"):
        Snapshot.open(tmp_path / "nothing")


def test_reader_not_a_directory_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SnapshotError, match="^not a directory$"):
        Snapshot.open(tmp_path / "file")


def test_reader_directory_it_may_not_look_into_is_an_error_not_a_traceback(tmp_path):
    with pytest.raises(SnapshotError, match="cannot open the directory: File name too long"):
        Snapshot.open(tmp_path / ("x" * 300))


def test_reader_io_error_while_loading_ram_names_the_chunk(snap, fresh, monkeypatch):
    """EIO or ESTALE from the snapshot's storage, ENOMEM or EFBIG writing guest memory: an
    OSError went up to `up --restore` as a traceback."""

    def broken(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "sendfile", broken)
    with pytest.raises(SnapshotError, match=f"{_label('ram')}: Input/output error"):
        Snapshot.open(snap).load_ram(fresh)


def test_reader_io_error_while_reading_a_chunk_names_it(snap, monkeypatch):
    real_open_in = reader._open_in

    class Stale(io.BufferedReader):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    def open_in(directory: Path, name: str, label: str) -> tuple[io.BufferedReader, int]:
        f, size = real_open_in(directory, name, label)
        if name != CHUNK_FILES["vm"]:
            return f, size
        return Stale(f.detach()), size

    monkeypatch.setattr(reader, "_open_in", open_in)
    with pytest.raises(SnapshotError, match=f"{_label('vm')}: Stale file handle"):
        Snapshot.open(snap).verify()


def _write_ram(snap: Path, records: list[tuple[int, int]], end: int) -> None:
    """A RAM chunk with these (offset, length) extents, filled with 0xAA, then rehashed."""
    body = struct.pack("<8sIIQQ", b"SVMMRAM\0", 1, PAGE, MEM_SIZE, 0)
    for offset, length in records:
        body += struct.pack("<QQ", offset, length) + b"\xaa" * length
    (snap / "ram.bin").write_bytes(body + struct.pack("<QQ", (1 << 64) - 1, end))
    rehash(snap, "ram")


def test_reader_ram_extent_beyond_memory_refused_by_verify(snap):
    _write_ram(snap, [(MEM_SIZE, PAGE)], PAGE)

    with pytest.raises(SnapshotError, match=f"{_label('ram')}: extent {MEM_SIZE:#x}\\+0x1000 lies"):
        Snapshot.open(snap).verify()


def test_reader_verify_walks_ram_structure_before_hashing_its_data(snap, monkeypatch):
    """A RAM chunk whose layout is wrong is refused by the walk of its extents' headers,
    before its data is hashed: a sparse file claiming terabytes would take hours of hashing
    zeros to find a checksum mismatch."""
    _write_ram(snap, [(MEM_SIZE, PAGE)], PAGE)
    flip_byte(snap / "ram.bin", RAM_DATA + 5)  # in the data: the checksum disagrees too

    def no_hashing(*args: object) -> None:
        raise AssertionError("RAM data hashed before its structure was checked")

    monkeypatch.setattr(reader, "_hash_file", no_hashing)
    with pytest.raises(SnapshotError, match=f"{_label('ram')}: extent {MEM_SIZE:#x}\\+0x1000 lies"):
        Snapshot.open(snap).verify()


def test_reader_verify_reads_no_further_than_one_byte_past_the_manifest_size(snap):
    """A chunk that grows while it is hashed is found too long after one byte more, not
    read to its new end."""
    path = snap / "ram.bin"
    size = path.stat().st_size
    with path.open("rb") as f:
        hexdigest, read = reader._hash_file(f, "blake3", None, (0, size), size - 10)
    assert read == size - 9


def test_reader_ram_extent_beyond_memory_refused_by_load(snap, fresh):
    _write_ram(snap, [(0, PAGE), (MEM_SIZE - PAGE, 2 * PAGE)], 3 * PAGE)

    with pytest.raises(
        SnapshotError, match=f"{_label('ram')}: extent {MEM_SIZE - PAGE:#x}\\+0x2000 lies"
    ):
        Snapshot.open(snap).load_ram(fresh)


def test_reader_wrong_memory_size_refused(snap):
    small = memory(2 * MIB, {})

    with pytest.raises(SnapshotError, match="snapshot has 16 MiB of RAM, the VM has 2 MiB"):
        Snapshot.open(snap).load_ram(small)
    small.close()


def test_reader_other_ram_regions_refused_showing_both_layouts(snap, fresh):
    half = MEM_SIZE // 2
    regions = [
        {"gpa": 0, "size": half, "offset": 0},
        {"gpa": 1 << 32, "size": half, "offset": half},
    ]
    edit_manifest(snap, lambda d: d["memory"].update(regions=regions))

    with pytest.raises(SnapshotError) as err:
        Snapshot.open(snap).load_ram(fresh)
    assert str(err.value) == (
        "snapshot's RAM regions [(0x0, 0x800000, 0x0), (0x100000000, 0x800000, 0x800000)] "
        "differ from the VM's [(0x0, 0x1000000, 0x0)] (guest address, size, offset)"
    )


def test_reader_device_file_with_another_model_refused(snap):
    (snap / "serial0.json").write_text(json.dumps({"model": "net", "version": 1, "state": {}}))
    rehash(snap, "serial0")

    with pytest.raises(SnapshotError, match=f"{_label('serial0')}: file says model 'net' v1"):
        Snapshot.open(snap).read_json("serial0")


def test_reader_device_state_too_deep_for_a_spawn_spec_refused(snap):
    """A device's fields a restore's spawn spec could not hold (codec.MAX_FIELDS_DEPTH):
    refused naming the chunk, not by the launcher naming nothing."""
    doc = json.loads((snap / "serial0.json").read_text())
    deep: dict[str, object] = {}
    for _ in range(MAX_FIELDS_DEPTH):  # the fields object, and this many levels under it
        deep = {"a": deep}
    doc["state"] = deep
    (snap / "serial0.json").write_text(json.dumps(doc))
    rehash(snap, "serial0")

    with pytest.raises(SnapshotError, match=f"{_label('serial0')}: fields nest deeper than"):
        Snapshot.open(snap).read_json("serial0")


def test_reader_json_chunk_not_json_refused(snap):
    (snap / "vm.json").write_bytes(b"\x00garbage")
    rehash(snap, "vm")

    with pytest.raises(SnapshotError, match=f"{_label('vm')}: not valid JSON"):
        Snapshot.open(snap).verify()


def test_reader_read_json_of_ram_refused(snap):
    with pytest.raises(SnapshotError, match=f"{_label('ram')}: guest RAM, not JSON"):
        Snapshot.open(snap).read_json("ram")


def test_reader_read_json_of_unknown_chunk_refused(snap):
    with pytest.raises(SnapshotError, match="chunk vcpu7: not in this snapshot"):
        Snapshot.open(snap).read_json("vcpu7")


def test_reader_verify_progress_reaches_total(snap):
    calls: list[tuple[int, int]] = []
    s = Snapshot.open(snap)

    s.verify(lambda done, total: calls.append((done, total)))

    assert calls[-1] == (s.total_bytes, s.total_bytes)
