"""JSON state chunks: vCPU, VM and device state, never pickle (a snapshot is untrusted input).

A device chunk is the document the device model returns, `{"model", "version", "state"}`, so
the file says what it is on its own; the reader checks both against the manifest. vCPU and VM
chunks are the capture code's own JSON objects, stored as given. Either way, what the caller
hands to SnapshotWriter.add_json_chunk is what Snapshot.read_json gives back.
"""

from __future__ import annotations

from typing import Annotated, Any

from splitvmm.errors import shown
from splitvmm.protocol import schema
from splitvmm.protocol.codec import check_fields_depth
from splitvmm.record import Struct
from splitvmm.snapshot.format import (
    MAX_JSON_CHUNK_BYTES,
    MAX_STATE_VERSION,
    ChunkEntry,
    Name,
    SnapshotError,
    dump_json,
    load_json,
)


class DeviceChunk(Struct, frozen=True):
    """A device chunk's file: the model's state document, its fields under "state"."""

    model: Name
    version: Annotated[int, schema.Range(1, MAX_STATE_VERSION)]
    state: dict[str, Any]  # the model's fields: its own State record checks them on restore


def encode(kind: str, state_version: int, payload: Any, model: str | None, where: str) -> bytes:
    if kind == "device":
        payload = {"model": model, "version": state_version, "state": payload}
    elif not isinstance(payload, dict):
        raise SnapshotError(f"{where}: a {kind} state must be a JSON object (a dict)")
    data = dump_json(payload, where)
    if len(data) > MAX_JSON_CHUNK_BYTES:
        raise SnapshotError(f"{where}: {len(data)} bytes, over the {MAX_JSON_CHUNK_BYTES} cap")
    return data


def decode(entry: ChunkEntry, data: bytes) -> Any:
    doc = load_json(data, entry.label)
    if not isinstance(doc, dict):
        raise SnapshotError(f"{entry.label}: expected a JSON object")
    if entry.kind != "device":
        return doc
    chunk = schema.decode(DeviceChunk, doc, where=entry.label, error=SnapshotError)
    check_fields_depth(chunk.state, entry.label, SnapshotError)  # a restore's spec holds them
    if chunk.model != entry.model or chunk.version != entry.state_version:
        raise SnapshotError(
            f"{entry.label}: file says model {shown(chunk.model)} v{chunk.version}, "
            f"manifest says {entry.model!r} v{entry.state_version}"
        )
    return chunk.state
