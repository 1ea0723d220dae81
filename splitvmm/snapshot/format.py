"""The snapshot manifest (manifest.json): schema, strict validation, format versions, upgrades.

A snapshot is a directory: manifest.json plus one file per chunk (guest RAM, each vCPU, the VM,
each device). The manifest is self-describing, unlike bhyve's first format (raw struct layouts,
no per-chunk versions): it names the format and its version, the producer, the VM config as
written, the guest memory layout, and for every chunk its kind, state version, file, size and
sha256. Everything in it is untrusted input: a snapshot may come from anywhere, so the parser
checks every key, type and bound, and caps sizes before anything is allocated.

Format versions: FORMAT_VERSION is what this release writes. A manifest with an older version
is upgraded step by step through UPGRADES (v1 -> v2 -> ...) and then validated against the
current schema, so restoring an older release's snapshot is a tested promise (the goldens in
tests/conformance/goldens/snapshot/). To make a v2: bump FORMAT_VERSION, add
`UPGRADES[1] = upgrade_v1_to_v2`, change the validator, and keep the v1 golden.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from splitvmm.config import MAX_MEMORY, NAME_RE
from splitvmm.errors import SplitvmmError, shown


class SnapshotError(SplitvmmError):
    """A snapshot cannot be written, or is corrupt, truncated, mismatched or from the future."""


FORMAT_NAME = "splitvmm-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"  # optional: signing.py

# Caps on untrusted input (Firecracker caps snapshot loads "to prevent DOS attacks").
MAX_MANIFEST_BYTES = 1 << 20
MAX_CHUNKS = 4096
MAX_JSON_CHUNK_BYTES = 16 << 20
MAX_REGIONS = 16  # GuestMemory makes at most two (below the PCI hole and above 4 GiB)
MAX_PRODUCER_CHARS = 200
MAX_JSON_DEPTH = 32  # ours nest at most 4 deep (manifest: vm_config.device[i].option)
MAX_GPA = 1 << 52  # x86_64 physical address width

PAGE_SIZE = 4096
KINDS = ("ram", "vcpu", "vm", "device")
RAM_ENCODINGS = ("sparse-v1",)
# Chunk files are plain names inside the snapshot directory: no '/', no leading '.', so no
# '..' and no hidden files; the reader also opens them with O_NOFOLLOW (no symlinks).
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

TOP_KEYS = frozenset(
    {"format", "format_version", "producer", "created", "vm_config", "cpuid", "memory", "chunks"}
)
CHUNK_KEYS = frozenset({"kind", "name", "state_version", "file", "size", "sha256"})
EXTRA_CHUNK_KEYS = {"ram": frozenset({"encoding"}), "device": frozenset({"model"})}


@dataclass(frozen=True, slots=True)
class RegionEntry:
    gpa: int
    size: int
    offset: int  # offset in the memfd


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    size: int
    regions: tuple[RegionEntry, ...]


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    kind: str  # one of KINDS
    name: str  # "ram", "vcpu0", "vm", "serial0"
    state_version: int  # version of this chunk's payload schema
    file: str  # plain file name inside the snapshot directory
    size: int  # bytes on disk
    sha256: str  # lowercase hex
    model: str | None = None  # device model, kind == "device" only
    encoding: str | None = None  # RAM encoding, kind == "ram" only

    @property
    def label(self) -> str:
        """How errors name this chunk: 'chunk vcpu0 (vcpu0.json)'."""
        return f"chunk {self.name} ({self.file})"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.model is not None:
            doc["model"] = self.model
        doc |= {"state_version": self.state_version, "file": self.file, "size": self.size}
        doc["sha256"] = self.sha256
        if self.encoding is not None:
            doc["encoding"] = self.encoding
        return doc


@dataclass(frozen=True, slots=True)
class Manifest:
    producer: str
    created: str  # UTC, ISO 8601
    vm_config: dict[str, Any]
    cpuid: Any
    memory: MemoryEntry
    chunks: tuple[ChunkEntry, ...]
    read_version: int = FORMAT_VERSION  # the format_version on disk, before any upgrade

    def to_json(self) -> dict[str, Any]:
        regions = [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in self.memory.regions]
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "producer": self.producer,
            "created": self.created,
            "vm_config": self.vm_config,
            "cpuid": self.cpuid,
            "memory": {"size": self.memory.size, "regions": regions},
            "chunks": [c.to_json() for c in self.chunks],
        }

    def encode(self) -> bytes:
        data = (json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n").encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise SnapshotError(
                f"{MANIFEST}: {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte cap "
                "(is the VM config or CPUID table that large?)"
            )
        return data


# --- strict JSON -------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {shown(key)}")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_ok(doc: Any, limit: int) -> bool:
    """Whether no container in doc nests deeper than limit (iterative: no recursion)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return True


def load_json(data: bytes, what: str) -> Any:
    """Parse untrusted JSON: no duplicate keys, no NaN/Infinity, no stack-deep nesting."""
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SnapshotError(f"{what}: not valid JSON: {e}") from None
    except RecursionError:
        raise SnapshotError(f"{what}: JSON nested too deeply") from None
    # json.loads stops near the interpreter's recursion limit; what nests just below it would
    # still break whatever walks it recursively later (repr, deepcopy, json.dumps).
    if not _depth_ok(doc, MAX_JSON_DEPTH):
        raise SnapshotError(f"{what}: JSON nested too deeply (over {MAX_JSON_DEPTH} levels)")
    return doc


def dump_json(value: Any, what: str) -> bytes:
    """Compact JSON for a chunk; a value that is not plain JSON data is the caller's bug."""
    try:
        return (json.dumps(value, allow_nan=False, separators=(",", ":")) + "\n").encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise SnapshotError(f"{what}: not JSON-able: {e}") from None


# --- versions ----------------------------------------------------------------------------------

# from_version -> function turning a manifest of that version into one of from_version + 1.
# Empty while v1 is the only version; v2 adds {1: upgrade_v1_to_v2}.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upgrade(doc: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the manifest in FORMAT_VERSION's schema, the version it was written with)."""
    if doc.get("format") != FORMAT_NAME:
        raise SnapshotError(
            f"{MANIFEST}: format is {shown(doc.get('format'))}, not {FORMAT_NAME!r}"
        )
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise SnapshotError(
            f"{MANIFEST}: format_version {shown(version)} is not a positive integer"
        )
    if version > FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format v{version} is newer than this splitvmm (v{FORMAT_VERSION}): "
            "upgrade splitvmm"
        )
    read_version = version
    while version < FORMAT_VERSION:
        step = UPGRADES.get(version)
        if step is None:
            raise SnapshotError(f"{MANIFEST}: no upgrade from snapshot format v{version}")
        doc = step(doc)
        version += 1
        doc["format_version"] = version
    return doc, read_version


# --- validation (the current schema) -----------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_unknown(doc: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise SnapshotError(f"{where}: unknown key {shown(unknown[0])}")
    missing = sorted(allowed - set(doc))
    if missing:
        raise SnapshotError(f"{where}: missing key {shown(missing[0])}")


def _get(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _bounded(doc: dict[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    value: int = _get(doc, key, int, where)
    if not lo <= value <= hi:
        raise SnapshotError(f"{where}: {key} {value} is outside {lo}..{hi}")
    return value


def _parse_region(doc: object, where: str) -> RegionEntry:
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where}: expected an object")
    _reject_unknown(doc, frozenset({"gpa", "size", "offset"}), where)
    gpa = _bounded(doc, "gpa", where, 0, MAX_GPA)
    size = _bounded(doc, "size", where, PAGE_SIZE, MAX_MEMORY)
    offset = _bounded(doc, "offset", where, 0, MAX_MEMORY)
    if (gpa | size | offset) % PAGE_SIZE or gpa + size > MAX_GPA:
        raise SnapshotError(f"{where}: gpa, size and offset must be 4 KiB aligned, below 2^52")
    return RegionEntry(gpa, size, offset)


def _parse_memory(doc: object) -> MemoryEntry:
    where = f"{MANIFEST}: memory"
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where}: expected an object")
    _reject_unknown(doc, frozenset({"size", "regions"}), where)
    size = _bounded(doc, "size", where, PAGE_SIZE, MAX_MEMORY)
    raw = _get(doc, "regions", list, where)
    if not 1 <= len(raw) <= MAX_REGIONS or size % PAGE_SIZE:
        raise SnapshotError(f"{where}: needs 1..{MAX_REGIONS} regions and a 4 KiB aligned size")
    regions = tuple(_parse_region(r, f"{where}.regions[{i}]") for i, r in enumerate(raw))
    # The regions tile the memfd in order, and their guest ranges ascend without overlap:
    # exactly what GuestMemory builds, so anything else is a corrupt or foreign manifest.
    offset, gpa_end = 0, 0
    for r in regions:
        if r.offset != offset or r.gpa < gpa_end:
            raise SnapshotError(f"{where}: regions must tile the memory in ascending order")
        offset, gpa_end = offset + r.size, r.gpa + r.size
    if offset != size:
        raise SnapshotError(f"{where}: regions cover {offset} bytes, size says {size}")
    return MemoryEntry(size, regions)


def _parse_chunk(doc: object, index: int, memory_size: int) -> ChunkEntry:
    where = f"{MANIFEST}: chunks[{index}]"
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where}: expected an object")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise SnapshotError(f"{where}: kind {shown(kind)} is not one of {', '.join(KINDS)}")
    name = doc.get("name")
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        where = f"{MANIFEST}: chunk {name}"  # name it from here on: users know chunks by name
    _reject_unknown(doc, CHUNK_KEYS | EXTRA_CHUNK_KEYS.get(kind, frozenset()), where)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SnapshotError(
            f"{where}: name {shown(name)} must be 1-63 letters, digits, '_', '.', '-'"
        )
    file = _get(doc, "file", str, where)
    if not FILE_RE.fullmatch(file) or file in (MANIFEST, MANIFEST_SIG):
        raise SnapshotError(f"{where}: file {shown(file)} is not a plain file name in the snapshot")
    # A RAM chunk holds at most the memory plus its record headers (ram.py checks the exact
    # bound); twice the memory is a loose cap that needs no knowledge of the encoding.
    max_size = 2 * memory_size if kind == "ram" else MAX_JSON_CHUNK_BYTES
    entry = ChunkEntry(
        kind=kind,
        name=name,
        state_version=_bounded(doc, "state_version", where, 1, 1 << 31),
        file=file,
        size=_bounded(doc, "size", where, 0, max_size),
        sha256=_get(doc, "sha256", str, where),
        model=_get(doc, "model", str, where) if kind == "device" else None,
        encoding=_get(doc, "encoding", str, where) if kind == "ram" else None,
    )
    if not SHA256_RE.fullmatch(entry.sha256):
        raise SnapshotError(f"{where}: sha256 must be 64 lowercase hex digits")
    if entry.model is not None and not NAME_RE.fullmatch(entry.model):
        raise SnapshotError(f"{where}: model {shown(entry.model)} is not a model name")
    if entry.encoding is not None and entry.encoding not in RAM_ENCODINGS:
        raise SnapshotError(
            f"{where}: RAM encoding {shown(entry.encoding)} is unknown to this splitvmm "
            f"(it reads {', '.join(RAM_ENCODINGS)})"
        )
    return entry


def _parse_chunks(raw: list[Any], memory_size: int) -> tuple[ChunkEntry, ...]:
    if len(raw) > MAX_CHUNKS:
        raise SnapshotError(f"{MANIFEST}: {len(raw)} chunks, over the cap of {MAX_CHUNKS}")
    chunks = tuple(_parse_chunk(c, i, memory_size) for i, c in enumerate(raw))
    names, files = set(), set()
    for c in chunks:
        if c.name in names or c.file in files:
            raise SnapshotError(f"{MANIFEST}: chunk {c.name}: name or file used twice")
        names.add(c.name)
        files.add(c.file)
    if sum(c.kind == "ram" for c in chunks) != 1:
        raise SnapshotError(f"{MANIFEST}: needs exactly one ram chunk")
    return chunks


def _parse_created(doc: dict[str, Any]) -> str:
    created: str = _get(doc, "created", str, MANIFEST)
    try:
        stamp = datetime.fromisoformat(created)
    except ValueError:
        raise SnapshotError(f"{MANIFEST}: created {shown(created, 40)} is not ISO 8601") from None
    if stamp.tzinfo is None:
        raise SnapshotError(f"{MANIFEST}: created {shown(created)} has no UTC offset")
    return created


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest.json's bytes (any supported version) into the current schema."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{MANIFEST}: over the {MAX_MANIFEST_BYTES} byte cap")
    doc = load_json(data, MANIFEST)
    if not isinstance(doc, dict):
        raise SnapshotError(f"{MANIFEST}: expected a JSON object")
    doc, read_version = upgrade(doc)
    _reject_unknown(doc, TOP_KEYS, MANIFEST)
    producer = _get(doc, "producer", str, MANIFEST)
    if len(producer) > MAX_PRODUCER_CHARS:
        raise SnapshotError(f"{MANIFEST}: producer is over {MAX_PRODUCER_CHARS} characters")
    memory = _parse_memory(doc["memory"])
    return Manifest(
        producer=producer,
        created=_parse_created(doc),
        vm_config=_get(doc, "vm_config", dict, MANIFEST),
        cpuid=doc["cpuid"],
        memory=memory,
        chunks=_parse_chunks(_get(doc, "chunks", list, MANIFEST), memory.size),
        read_version=read_version,
    )
