"""Snapshots on disk: a directory with a versioned JSON manifest and one file per chunk.

format.py (manifest schema, versions, upgrades), digest.py (chunk checksums), ram.py (guest
RAM, sparse-v1 and sparse-v2), state.py (vCPU/VM/device JSON chunks), writer.py (SnapshotWriter), reader.py
(Snapshot). The
coordinator that pauses the VM and collects the states lives in monitor/snapshot.py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitvmm.snapshot.format import FORMAT_VERSION, ChunkEntry, Manifest, SnapshotError
    from splitvmm.snapshot.reader import Snapshot
    from splitvmm.snapshot.writer import SnapshotWriter

# name -> the module that defines it, imported on first use (PEP 562): a running monitor
# needs the writer, and `splitvmm up` should not pay for the reader's imports on every boot.
_EXPORTS = {
    "FORMAT_VERSION": "format",
    "ChunkEntry": "format",
    "Manifest": "format",
    "SnapshotError": "format",
    "Snapshot": "reader",
    "SnapshotWriter": "writer",
}

__all__ = [
    "FORMAT_VERSION",
    "ChunkEntry",
    "Manifest",
    "Snapshot",
    "SnapshotError",
    "SnapshotWriter",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
