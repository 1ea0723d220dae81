"""Snapshots on disk: a directory with a versioned JSON manifest and one file per chunk.

format.py (manifest schema, versions, upgrades), ram.py (guest RAM, sparse-v1), state.py
(vCPU/VM/device JSON chunks), writer.py (SnapshotWriter), reader.py (Snapshot). The
coordinator that pauses the VM and collects the states lives in monitor/snapshot.py.
"""

from splitvmm.snapshot.format import FORMAT_VERSION, ChunkEntry, Manifest, SnapshotError
from splitvmm.snapshot.reader import Snapshot
from splitvmm.snapshot.writer import SnapshotWriter

__all__ = [
    "FORMAT_VERSION",
    "ChunkEntry",
    "Manifest",
    "Snapshot",
    "SnapshotError",
    "SnapshotWriter",
]
