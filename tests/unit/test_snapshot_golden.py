"""Snapshots from older releases keep loading: each golden was written by its version's writer.

The goldens in tests/conformance/goldens/snapshot/v<N>/ are frozen: never regenerate one. v1
has sha256 checksums, v2 (the current format) BLAKE3 ones; both hold the same VM. When the
format moves to v3, add a v3 golden next to them (made with `python -m
tests.unit.test_snapshot_golden DIR`, after updating the constants here) and keep this test
passing through format.UPGRADES.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from splitvmm.monitor.memory import GuestMemory
from splitvmm.snapshot import FORMAT_VERSION, Snapshot, SnapshotError, SnapshotWriter

GOLDENS = Path(__file__).parents[1] / "conformance" / "goldens" / "snapshot"
VERSIONS = range(1, FORMAT_VERSION + 1)  # a golden for every format version ever written
CHECKSUMS = {1: "sha256", 2: "blake3"}  # each golden's chunks' algorithm
MEM_SIZE = 1 << 20
PAGE = 4096
PAGE0 = (b"splitvmm snapshot golden v1\n" * 147)[:PAGE]
PAGE_HIGH = bytes(range(256)) * 16
HIGH = 0x80000  # a second extent, away from the first
VM_CONFIG = {"vm": {"name": "golden", "memory": "1M", "vcpus": 1}, "device": []}
CPUID = [{"function": 0, "index": 0, "flags": 0, "eax": 13, "ebx": 1970169159}]
VCPU = {"regs": {"rip": 65520, "rsp": 0, "rflags": 2}, "mp_state": 0, "xsave": "00" * 16}
VM = {"clock": {"clock": 1234567, "flags": 0}}
SERIAL = {"ier": 1, "lcr": 3, "mcr": 8, "scr": 0, "dll": 12, "dlm": 0, "rx_fifo": "6f6b"}


def make_golden(target: Path) -> Path:
    mem = GuestMemory(MEM_SIZE, "golden")
    mem.map[0:PAGE] = PAGE0
    mem.map[HIGH : HIGH + PAGE] = PAGE_HIGH
    created = datetime(2025, 1, 1, tzinfo=UTC)
    with SnapshotWriter(target, VM_CONFIG, CPUID, mem, created=created) as w:
        w.add_ram(mem)
        w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
        w.add_json_chunk("vm", "vm", 1, VM)
        w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")
        w.commit()
    mem.close()
    return target


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def golden(request: pytest.FixtureRequest) -> Snapshot:
    return Snapshot.open(GOLDENS / f"v{request.param}")


@pytest.fixture
def fresh() -> Iterator[GuestMemory]:
    m = GuestMemory(MEM_SIZE)
    yield m
    m.close()


def test_golden_opens_with_its_version_and_producer(golden):
    m = golden.manifest

    assert (m.producer, m.created, m.vm_config, m.cpuid) == (
        "splitvmm 0.1.0",
        "2025-01-01T00:00:00+00:00",
        VM_CONFIG,
        CPUID,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_directory_holds_its_format_version(version):
    assert Snapshot.open(GOLDENS / f"v{version}").manifest.read_version == version


def test_golden_checksums_use_their_versions_algorithm(golden):
    algorithms = {c.digest.alg for c in golden.chunks}

    assert algorithms == {CHECKSUMS[golden.manifest.read_version]}


def test_golden_verifies(golden):
    golden.verify()


def test_golden_states_read_back(golden):
    states = (golden.read_json("vcpu0"), golden.read_json("vm"), golden.read_json("serial0"))

    assert states == (VCPU, VM, SERIAL)


def test_golden_ram_loads(golden, fresh):
    golden.load_ram(fresh)

    assert (fresh.map[0:PAGE], fresh.map[HIGH : HIGH + PAGE], fresh.map[PAGE : 2 * PAGE]) == (
        PAGE0,
        PAGE_HIGH,
        bytes(PAGE),
    )


def test_golden_flipped_ram_byte_refused_by_load_naming_chunk(golden, fresh, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(golden.path, copy)
    data = bytearray((copy / "ram.bin").read_bytes())
    data[32 + 16 + 100] ^= 0xFF  # inside the first page's data: the structure stays valid
    (copy / "ram.bin").write_bytes(data)
    alg = golden.chunk("ram").digest.alg

    with pytest.raises(
        SnapshotError, match=rf"^chunk ram \(ram.bin\): checksum mismatch \({alg}\)$"
    ):
        Snapshot.open(copy).load_ram(fresh)


def test_golden_chunk_table(golden):
    table = [(c.kind, c.name, c.model, c.state_version, c.file) for c in golden.chunks]

    assert table == [
        ("ram", "ram", None, 1, "ram.bin"),
        ("vcpu", "vcpu0", None, 1, "vcpu0.json"),
        ("vm", "vm", None, 1, "vm.json"),
        ("device", "serial0", "serial", 1, "serial0.json"),
    ]


if __name__ == "__main__":
    print(make_golden(Path(sys.argv[1])))
