"""Shared helpers for the snapshot tests: a real memfd guest memory and a small snapshot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitvmm.monitor.memory import GuestMemory
from splitvmm.snapshot import SnapshotWriter, digest

MIB = 1 << 20
PAGE = 4096
MEM_SIZE = 16 * MIB  # the least a VM config takes (restore parses the stored one)
# Scattered pages with non-zero bytes: first page, a run of two, the last page.
PAGES = {0x0: b"\x11", 0x5000: b"\x22", 0x6000: b"\x33", MEM_SIZE - PAGE: b"\x44"}
VM_CONFIG = {  # as a VM with this RAM and these chunks stores it (config_to_dict)
    "vm": {"name": "t", "memory": "16M", "vcpus": 1},
    "boot": {"kernel": "vmlinux"},
    "device": [{"name": "serial0", "model": "serial"}],
}
CPUID = [{"function": 0, "index": 0, "eax": 13, "ebx": 0, "ecx": 0, "edx": 0}]
# A vCPU's and the VM's states as a restore decodes them (snapshot verify does too): the
# golden v1 VM's, saved by release 1 (tests/conformance/goldens/vm/v1)
GOLDEN_VM = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "vm" / "v1"
VCPU = json.loads((GOLDEN_VM / "vcpu0.json").read_text())
VM = json.loads((GOLDEN_VM / "vm.json").read_text())
SERIAL = {"ier": 0, "lcr": 3, "rx_fifo": "6869"}
# chunk name -> file, for parametrizing over every chunk of the snapshot write_snapshot makes
CHUNK_FILES = {
    "ram": "ram.bin",
    "vcpu0": "vcpu0.json",
    "vm": "vm.json",
    "serial0": "serial0.json",
}


def memory(size: int = MEM_SIZE, pages: dict[int, bytes] | None = None) -> GuestMemory:
    """A real sealed memfd; each given page is filled with its byte."""
    mem = GuestMemory(size)
    for offset, byte in (PAGES if pages is None else pages).items():
        mem.map[offset : offset + PAGE] = byte * PAGE
    return mem


def write_snapshot(target: Path, mem: GuestMemory, sign_key: bytes | None = None) -> Path:
    with SnapshotWriter(target, VM_CONFIG, CPUID, mem) as w:
        w.add_ram(mem)
        w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
        w.add_json_chunk("vm", "vm", 1, VM)
        w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")
        return w.commit(sign_key)


def make_snapshot(target: Path, sign_key: bytes | None = None) -> Path:
    """write_snapshot of a fresh memory(), closed again."""
    mem = memory()
    try:
        return write_snapshot(target, mem, sign_key)
    finally:
        mem.close()


def key_file(path: Path, key: bytes = b"k" * 32, mode: int = 0o600) -> Path:
    """A signing key file (the key's bytes as they are) with the given mode."""
    path.write_bytes(key)
    os.chmod(path, mode)
    return path


def edit_manifest(snap: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = snap / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def checksum_keys(entry: dict[str, Any], data: bytes) -> dict[str, Any]:
    """The keys of a manifest chunk entry (a dict) that make it agree with `data`, in the
    entry's own form: v1's "sha256", or v2's "digest" with the algorithm it names."""
    if "sha256" in entry:
        return {"size": len(data), "sha256": digest.of("sha256", data)}
    alg = entry["digest"]["alg"]
    return {"size": len(data), "digest": {"alg": alg, "hex": digest.of(alg, data)}}


def rehash(snap: Path, name: str) -> None:
    """Make the manifest agree with chunk `name`'s file again (after a crafted rewrite)."""
    data = (snap / CHUNK_FILES[name]).read_bytes()

    def fix(doc: dict[str, Any]) -> None:
        entry = next(c for c in doc["chunks"] if c["name"] == name)
        entry.update(checksum_keys(entry, data))

    edit_manifest(snap, fix)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
