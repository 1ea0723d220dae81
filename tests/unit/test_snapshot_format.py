"""The manifest schema: it round-trips, and older format versions go through the upgrade table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitvmm.snapshot.format import (
    ChunkEntry,
    Manifest,
    MemoryEntry,
    RegionEntry,
    SnapshotError,
    parse_manifest,
)

SHA = "0" * 64
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
    monkeypatch.setattr(Manifest, "VERSION", 3)
    steps = {
        1: lambda d: d | {"producer": d["producer"] + " (v1)"},
        2: lambda d: d | {"producer": d["producer"] + " -> v2"},
    }
    monkeypatch.setattr(Manifest, "UPGRADES", steps)

    upgraded = parse_manifest(MANIFEST.encode())

    assert (upgraded.producer, upgraded.read_version) == ("splitvmm 0.1.0 (v1) -> v2", 1)


def test_format_missing_upgrade_step_refused(monkeypatch):
    monkeypatch.setattr(Manifest, "VERSION", 2)

    with pytest.raises(SnapshotError, match="^snapshot format: no upgrade from v1$"):
        parse_manifest(MANIFEST.encode())


def test_format_current_version_needs_no_upgrade():
    assert Manifest.UPGRADES.keys() == set(range(1, Manifest.VERSION))


def test_format_manifest_keys_in_writing_order():
    doc = MANIFEST.to_json()

    assert (list(doc), list(doc["chunks"][0]), list(doc["chunks"][1])) == (
        ["format", "format_version", "producer", "created", "vm_config", "cpuid", "memory"]
        + ["chunks"],
        ["kind", "name", "state_version", "file", "size", "sha256", "encoding"],
        ["kind", "name", "state_version", "file", "size", "sha256", "model"],
    )


def test_format_regions_must_tile_the_memory():
    bad = replace(MANIFEST, memory=MemoryEntry(2 << 20, (RegionEntry(0, 1 << 20, 4096),)))

    with pytest.raises(SnapshotError, match="manifest.json: memory: regions must tile"):
        parse_manifest(bad.encode())
