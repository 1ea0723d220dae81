"""The manifest schema: it round-trips, and older format versions go through the upgrade table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitvmm.snapshot import format as fmt
from splitvmm.snapshot.format import (
    ChunkEntry,
    Manifest,
    MemoryEntry,
    RegionEntry,
    SnapshotError,
    parse_manifest,
    upgrade,
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
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)
    monkeypatch.setattr(fmt, "UPGRADES", {1: lambda d: d | {"a": 1}, 2: lambda d: d | {"b": 2}})

    doc, read_version = upgrade({"format": "splitvmm-snapshot", "format_version": 1})

    assert (doc, read_version) == (
        {"format": "splitvmm-snapshot", "format_version": 3, "a": 1, "b": 2},
        1,
    )


def test_format_missing_upgrade_step_refused(monkeypatch):
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)

    with pytest.raises(SnapshotError, match="no upgrade from snapshot format v1"):
        upgrade({"format": "splitvmm-snapshot", "format_version": 1})


def test_format_current_version_needs_no_upgrade():
    assert fmt.UPGRADES.keys() == set(range(1, fmt.FORMAT_VERSION))


def test_format_regions_must_tile_the_memory():
    bad = replace(MANIFEST, memory=MemoryEntry(2 << 20, (RegionEntry(0, 1 << 20, 4096),)))

    with pytest.raises(SnapshotError, match="manifest.json: memory: regions must tile"):
        parse_manifest(bad.encode())
