"""The manifest schema: it round-trips, and older format versions go through the upgrade table."""

from __future__ import annotations

import json

import pytest

from splitvmm.record import replace
from splitvmm.snapshot.format import (
    FORMAT_VERSION,
    MAX_JSON_CHUNK_BYTES,
    MAX_JSON_TOTAL_BYTES,
    ChunkEntry,
    Digest,
    Manifest,
    MemoryEntry,
    RegionEntry,
    SnapshotError,
    parse_manifest,
)

SHA = Digest("blake3", "0" * 64)
MANIFEST = Manifest(
    producer="splitvmm 0.1.0",
    created="2025-01-01T00:00:00+00:00",
    vm_config={"vm": {"name": "t"}},
    cpuid=[],
    memory=MemoryEntry(
        (3 << 30) + (1 << 20),
        (RegionEntry(0, 3 << 30, 0), RegionEntry(1 << 32, 1 << 20, 3 << 30)),
    ),
    chunks=(
        ChunkEntry("ram", "ram", 1, "ram.bin", 48, SHA, encoding="sparse-v1"),
        ChunkEntry("device", "serial0", 2, "serial0.json", 10, SHA, model="serial"),
    ),
)


def test_format_manifest_roundtrips():
    assert parse_manifest(MANIFEST.encode()) == MANIFEST


def test_format_upgrade_runs_every_step_in_order(monkeypatch):
    v = FORMAT_VERSION
    monkeypatch.setattr(Manifest, "VERSION", v + 2)
    steps = {
        v: lambda d: d | {"producer": d["producer"] + " (a)"},
        v + 1: lambda d: d | {"producer": d["producer"] + " -> b"},
    }
    monkeypatch.setattr(Manifest, "UPGRADES", steps)

    upgraded = parse_manifest(MANIFEST.encode())

    assert (upgraded.producer, upgraded.read_version) == ("splitvmm 0.1.0 (a) -> b", v)


def test_format_missing_upgrade_step_refused(monkeypatch):
    monkeypatch.setattr(Manifest, "VERSION", FORMAT_VERSION + 1)

    with pytest.raises(
        SnapshotError, match=f"^snapshot format: no upgrade from v{FORMAT_VERSION}$"
    ):
        parse_manifest(MANIFEST.encode())


def _as_v1(edit_chunk=None) -> bytes:
    """MANIFEST as format v1 wrote it: each chunk's checksum under "sha256"."""
    doc = MANIFEST.to_json() | {"format_version": 1}
    for c in doc["chunks"]:
        c["sha256"] = c.pop("digest")["hex"]
        if edit_chunk:
            edit_chunk(c)
    return json.dumps(doc).encode()


def test_format_v1_sha256_upgrades_to_a_sha256_digest():
    upgraded = parse_manifest(_as_v1())

    assert [(c.digest, upgraded.read_version) for c in upgraded.chunks] == [
        (Digest("sha256", "0" * 64), 1),
        (Digest("sha256", "0" * 64), 1),
    ]


def test_format_v1_chunk_with_a_digest_refused():
    data = _as_v1(lambda c: c.update(digest={"alg": "blake3", "hex": "0" * 64}))

    with pytest.raises(SnapshotError, match="unknown key 'digest' in a v1 manifest"):
        parse_manifest(data)


def test_format_v1_chunk_without_sha256_names_the_missing_digest():
    data = _as_v1(lambda c: c.pop("sha256"))

    with pytest.raises(SnapshotError, match=r"chunks\['ram'\]: missing key 'digest'"):
        parse_manifest(data)


def test_format_current_version_needs_no_upgrade():
    assert Manifest.UPGRADES.keys() == set(range(1, Manifest.VERSION))


def test_format_manifest_keys_in_writing_order():
    doc = MANIFEST.to_json()

    assert (list(doc), list(doc["chunks"][0]), list(doc["chunks"][1])) == (
        ["format", "format_version", "producer", "created", "vm_config", "cpuid", "memory"]
        + ["chunks"],
        ["kind", "name", "state_version", "file", "size", "digest", "encoding"],
        ["kind", "name", "state_version", "file", "size", "digest", "model"],
    )


def test_format_json_chunks_over_their_cap_in_all_refused():
    """Each under its own cap, together over theirs: parsing them all was hours of a
    restore's or a verify's time before anything could be refused."""
    big = MAX_JSON_CHUNK_BYTES
    many = tuple(
        ChunkEntry("vm", f"extra{i}", 1, f"extra{i}.json", big, SHA)
        for i in range(MAX_JSON_TOTAL_BYTES // big + 1)
    )
    bad = replace(MANIFEST, chunks=MANIFEST.chunks + many)

    with pytest.raises(SnapshotError, match="chunks: JSON chunks of .* bytes in all, over the"):
        parse_manifest(bad.encode())


def test_format_json_chunk_over_its_cap_refused():
    bad = replace(
        MANIFEST, chunks=(MANIFEST.chunks[0], replace(MANIFEST.chunks[1], size=(2 << 20) + 1))
    )

    with pytest.raises(SnapshotError, match=r"size: 2097153 is outside 0\.\.2097152"):
        parse_manifest(bad.encode())


def test_format_regions_must_tile_the_memory():
    bad = replace(MANIFEST, memory=MemoryEntry(2 << 20, (RegionEntry(0, 1 << 20, 4096),)))

    with pytest.raises(SnapshotError, match="manifest.json: memory: regions must tile"):
        parse_manifest(bad.encode())
