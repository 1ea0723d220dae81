"""The snapshot manifest (manifest.json): schema, format versions, upgrades.

A snapshot is a directory: manifest.json plus one file per chunk (guest RAM, each vCPU, the VM,
each device). The manifest is self-describing, unlike bhyve's first format (raw struct layouts,
no per-chunk versions): it names the format and its version, the producer, the VM config as
written, the guest memory layout, and for every chunk its kind, state version, file, size and
checksum (with its algorithm: digest.py). Everything in it is untrusted input: a snapshot may come from anywhere, so the records
below say every key, type and bound (protocol/schema.py checks them), sizes are capped before
anything is allocated, and each record's validate() checks what spans its fields.

Format versions: FORMAT_VERSION is what this release writes. A manifest with an older version
is upgraded step by step through Manifest.UPGRADES (v1 -> v2 -> ...) and then checked against
the current schema, so restoring an older release's snapshot is a tested promise (the goldens
in tests/conformance/goldens/snapshot/). To make a v2: bump FORMAT_VERSION, add
`1: upgrade_v1_to_v2` to Manifest.UPGRADES, change the records, and keep the v1 golden.

v1 -> v2: each chunk's checksum names its algorithm, `"digest": {"alg": "blake3", "hex": ...}`,
where v1 had `"sha256": ...` (upgraded to `{"alg": "sha256", ...}`: still checked as sha256).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from splitvmm.config import MAX_MEMORY
from splitvmm.errors import SplitvmmError, shown
from splitvmm.protocol import schema
from splitvmm.protocol.schema import OPTIONAL_KEY, Invalid, Len, MaxLen, Multiple, Pattern, Range
from splitvmm.protocol.spec import NAME_RE, NAME_RULE
from splitvmm.record import Struct, replace
from splitvmm.snapshot.digest import Algorithm


class SnapshotError(SplitvmmError):
    """A snapshot cannot be written, or is corrupt, truncated, mismatched or from the future."""


FORMAT_NAME = "splitvmm-snapshot"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"  # optional: signing.py

# Caps on untrusted input (Firecracker caps snapshot loads "to prevent DOS attacks").
MAX_MANIFEST_BYTES = 1 << 20
MAX_CHUNKS = 4096
# A JSON chunk is parsed whole, at ~50x its size in memory and ~0.4 s a MiB here for a hostile
# one (a long list of empty objects): one of 16 MiB took 6 s and 850 MB, and 4096 of them the
# better part of a day, before a restore or `snapshot verify` could refuse anything. A real
# chunk is a few KiB (a vCPU's, XSAVE included), a device state at most MAX_CONTROL (1 MiB).
MAX_JSON_CHUNK_BYTES = 2 << 20
# Every JSON chunk of a snapshot together: room for the most a VM can have, 64 devices
# (sandbox/launcher.py MAX_DEVICES) each at the device state's cap and 254 vCPUs of ~15 KiB.
MAX_JSON_TOTAL_BYTES = 96 << 20
MAX_REGIONS = 16  # GuestMemory makes at most two (below the PCI hole and above 4 GiB)
MAX_PRODUCER_CHARS = 200
MAX_GPA = 1 << 52  # x86_64 physical address width

PAGE_SIZE = 4096
MAX_STATE_VERSION = 1 << 31
Kind = Literal["ram", "vcpu", "vm", "device"]
RamEncoding = Literal["sparse-v1", "sparse-v2"]

Name = Annotated[str, Pattern(NAME_RE.pattern, f"a name of {NAME_RULE}")]
# Chunk files are plain names inside the snapshot directory: no '/', no leading '.', so no
# '..' and no hidden files, and not the manifest's own files; the reader also opens them with
# O_NOFOLLOW (no symlinks).
File = Annotated[
    str,
    Pattern(
        r"(?!manifest\.(?:json|sig)\Z)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}",
        "a plain file name in the snapshot",
    ),
]
Hex256 = Annotated[str, Pattern("[0-9a-f]{64}", "64 lowercase hex digits")]  # a 256-bit checksum
Bytes = Annotated[int, Range(PAGE_SIZE, MAX_MEMORY), Multiple(PAGE_SIZE)]  # of guest memory


class RegionEntry(Struct, frozen=True):
    gpa: Annotated[int, Range(0, MAX_GPA), Multiple(PAGE_SIZE)]
    size: Bytes
    offset: Annotated[int, Range(0, MAX_MEMORY), Multiple(PAGE_SIZE)]  # offset in the memfd

    def validate(self) -> None:
        if self.gpa + self.size > MAX_GPA:
            raise Invalid(f"gpa + size {self.gpa + self.size:#x} is above 2**52")


class MemoryEntry(Struct, frozen=True):
    size: Bytes
    regions: Annotated[tuple[RegionEntry, ...], Len(1, MAX_REGIONS)]

    def validate(self) -> None:
        """The regions tile the memfd in order, and their guest ranges ascend without
        overlap: exactly what GuestMemory builds, so anything else is corrupt or foreign."""
        offset, gpa_end = 0, 0
        for r in self.regions:
            if r.offset != offset or r.gpa < gpa_end:
                raise Invalid("regions must tile the memory in ascending order")
            offset, gpa_end = offset + r.size, r.gpa + r.size
        if offset != self.size:
            raise Invalid(f"regions cover {offset} bytes, size says {self.size}")


class Digest(Struct, frozen=True):
    """A chunk's checksum and the algorithm that made it (digest.py)."""

    alg: Algorithm
    hex: Hex256  # lowercase


class ChunkEntry(Struct, frozen=True):
    LABEL: ClassVar[str] = "name"  # errors name a chunk as users know it: chunks['vcpu0']

    kind: Kind
    name: Name  # "ram", "vcpu0", "vm", "serial0"
    state_version: Annotated[int, Range(1, MAX_STATE_VERSION)]  # of the payload's schema
    file: File
    # bytes on disk; a RAM chunk's cap depends on the memory size (Manifest.validate)
    size: Annotated[int, Range(0, 3 * MAX_MEMORY)]
    digest: Digest
    model: Annotated[Name | None, OPTIONAL_KEY] = None  # device model, kind "device" only
    encoding: Annotated[RamEncoding | None, OPTIONAL_KEY] = None  # RAM encoding, "ram" only

    @property
    def label(self) -> str:
        """How errors name this chunk: 'chunk vcpu0 (vcpu0.json)'."""
        return f"chunk {self.name} ({self.file})"

    def to_json(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], schema.encode(self))

    def validate(self) -> None:
        for key, kind in (("model", "device"), ("encoding", "ram")):
            if (getattr(self, key) is None) == (self.kind == kind):  # one without the other
                raise Invalid(f"{'missing' if self.kind == kind else 'unknown'} key {key!r}")
        if self.kind != "ram" and self.size > MAX_JSON_CHUNK_BYTES:
            raise Invalid(f"{self.size} is outside 0..{MAX_JSON_CHUNK_BYTES}", at="size")


def upgrade_v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """A v1 chunk's `"sha256": HEX` becomes `"digest": {"alg": "sha256", "hex": HEX}`. Chunks
    that are not objects are left for the schema check to name; a v1 chunk with a digest is
    refused (v1 had none)."""
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        return doc
    return {**doc, "chunks": [_upgrade_chunk_v1(c) for c in chunks]}


def _upgrade_chunk_v1(chunk: object) -> object:
    if not isinstance(chunk, dict):
        return chunk
    if "digest" in chunk:
        raise Invalid(f"chunk {shown(chunk.get('name'))}: unknown key 'digest' in a v1 manifest")
    if "sha256" not in chunk:
        return chunk  # the schema check says the digest is missing
    upgraded = {k: v for k, v in chunk.items() if k != "sha256"}
    upgraded["digest"] = {"alg": "sha256", "hex": chunk["sha256"]}
    return upgraded


class Manifest(Struct, frozen=True):
    VERSION: ClassVar[int] = FORMAT_VERSION
    # from_version -> function turning a manifest of that version into one of from_version + 1
    # (without its format and format_version keys).
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {1: upgrade_v1_to_v2}

    producer: Annotated[str, MaxLen(MAX_PRODUCER_CHARS)]
    created: Annotated[str, MaxLen(64)]  # UTC, ISO 8601
    vm_config: dict[str, Any]  # checked by config.py when a restore uses it
    cpuid: Any
    memory: MemoryEntry
    chunks: Annotated[tuple[ChunkEntry, ...], MaxLen(MAX_CHUNKS)]
    # the format_version on disk, before any upgrade (not a key of its own)
    read_version: Annotated[int, schema.LOCAL] = FORMAT_VERSION

    def validate(self) -> None:
        _check_created(self.created)
        names: set[str] = set()
        files: set[str] = set()
        for c in self.chunks:
            if c.name in names or c.file in files:
                raise Invalid("name or file used twice", at=f"chunks[{c.name!r}]")
            names.add(c.name)
            files.add(c.file)
        json_bytes = sum(c.size for c in self.chunks if c.kind != "ram")
        if json_bytes > MAX_JSON_TOTAL_BYTES:
            raise Invalid(f"JSON chunks of {json_bytes} bytes in all, over the "
                          f"{MAX_JSON_TOTAL_BYTES} byte cap", at="chunks")  # fmt: skip
        rams = [c for c in self.chunks if c.kind == "ram"]
        if len(rams) != 1:
            raise Invalid(f"needs exactly one ram chunk, has {len(rams)}")
        # A RAM chunk holds at most the memory plus its record headers in each of its passes,
        # up to ram.MAX_PASSES: a live snapshot's writer (the coordinator) keeps the passes
        # made while the VM runs to half the one before, so 1 + 1/2 + 1/4 + 1 of the memory
        # plus headers; three times the memory caps that without knowledge of the encoding.
        if rams[0].size > 3 * self.memory.size:
            at = f"chunks[{rams[0].name!r}].size"
            raise Invalid(f"{rams[0].size} is outside 0..{3 * self.memory.size}", at=at)

    def to_json(self) -> dict[str, Any]:
        body = typing.cast(dict[str, Any], schema.encode(self))
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}

    def encode(self) -> bytes:
        data = (json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n").encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise SnapshotError(
                f"{MANIFEST}: {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte cap "
                "(is the VM config or CPUID table that large?)"
            )
        return data


def _check_created(created: str) -> None:
    try:
        stamp = datetime.fromisoformat(created)
    except ValueError:
        raise Invalid(f"created {shown(created, 40)} is not ISO 8601") from None
    if stamp.tzinfo is None:
        raise Invalid(f"created {shown(created)} has no UTC offset")


# --- JSON ----------------------------------------------------------------------------------------


def load_json(data: bytes, what: str) -> Any:
    """Parse untrusted JSON: no duplicate keys, no NaN/Infinity, no stack-deep nesting."""
    return schema.loads(data, what=what, error=SnapshotError)


def dump_json(value: Any, what: str) -> bytes:
    """Compact JSON for a chunk; a value that is not plain JSON data is the caller's bug."""
    try:
        return (json.dumps(value, allow_nan=False, separators=(",", ":")) + "\n").encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise SnapshotError(f"{what}: not JSON-able: {e}") from None


# --- reading ------------------------------------------------------------------------------------


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest.json's bytes (any supported version) into the current schema."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{MANIFEST}: over the {MAX_MANIFEST_BYTES} byte cap")
    doc = load_json(data, MANIFEST)
    if not isinstance(doc, dict):
        raise SnapshotError(f"{MANIFEST}: expected a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise SnapshotError(
            f"{MANIFEST}: format is {shown(doc.get('format'))}, not {FORMAT_NAME!r}"
        )
    version = doc.get("format_version")
    body = {k: v for k, v in doc.items() if k not in ("format", "format_version")}
    body = schema.upgrade(Manifest, version, body, what="snapshot format", error=SnapshotError)
    manifest = schema.decode(Manifest, body, where=MANIFEST, error=SnapshotError)
    if type(version) is not int:  # upgrade() read it already: this only tells the type checker
        raise SnapshotError(f"{MANIFEST}: format_version {shown(version)} is not an integer")
    return replace(manifest, read_version=version)
