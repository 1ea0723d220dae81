"""`splitvmm snapshot inspect|verify`: tables, JSON, OK lines, and exit 1 with the chunk named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitvmm.cli import cli
from splitvmm.snapshot.writer import SnapshotWriter
from tests.unit.snapshot_support import (
    CPUID,
    SERIAL,
    VCPU,
    VM,
    VM_CONFIG,
    edit_manifest,
    flip_byte,
    make_snapshot,
    memory,
    rehash,
)
from tests.unit.test_snapshot_hostile import GOLDEN, assert_refused_cleanly, invoke


@pytest.fixture
def snap(tmp_path):
    return make_snapshot(tmp_path / "s")


def run(*args: str):
    return CliRunner().invoke(cli, ["snapshot", *args])


def test_cli_inspect_shows_header_and_chunks(snap):
    result = run("inspect", str(snap))

    assert result.exit_code == 0
    assert "v2 (splitvmm 0.1.0" in result.stdout
    assert "16 MiB in 1 region(s)" in result.stdout
    assert "vCPUs     1" in result.stdout
    assert "serial0" in result.stdout and "│ serial │" in result.stdout
    assert "blake3:" in result.stdout


def test_cli_inspect_json_is_the_manifest_summary(snap):
    result = run("inspect", str(snap), "--json")

    doc = json.loads(result.stdout)
    assert (doc["format_version"], doc["vcpus"], doc["memory"]["size"], "cpuid" in doc) == (
        2,
        1,
        16 << 20,
        False,
    )
    assert [c["name"] for c in doc["chunks"]] == ["ram", "vcpu0", "vm", "serial0"]


def test_cli_verify_intact_prints_ok(snap):
    result = run("verify", str(snap))

    assert (result.exit_code, result.stdout) == (0, f"snapshot {snap}: OK (4 chunks, 0.03 MiB)\n")


@pytest.mark.parametrize(
    ("chunk", "content", "message"),
    [
        ("vcpu0", {}, "chunk vcpu0: VcpuState: missing key"),
        ("vm", {"x": 1}, "chunk vm: VmState"),
    ],
)
def test_cli_verify_decodes_the_states_a_restore_would(snap, chunk, content, message):
    """Checksums that match are not enough: a state every restore refuses is no OK."""
    (snap / f"{chunk}.json").write_text(json.dumps(content))
    rehash(snap, chunk)

    result = run("verify", str(snap))

    assert (result.exit_code, result.stdout) == (1, ""), result.stdout
    assert message in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["vm"].update(vcpus="two"), "manifest vm_config: "),
        (lambda c: c["vm"].update(memory=10**30), "manifest vm_config: "),
        (lambda c: c["device"].append(dict(c["device"][0])), "manifest vm_config: "),
        (lambda c: c.update(device="serial"), "manifest vm_config: "),
    ],
    ids=["vcpus-text", "memory-huge", "device-twice", "devices-not-a-list"],
)
def test_cli_verify_parses_the_stored_config_as_restore_would(snap, edit, message):
    """`splitvmm restore DIR` refuses such a snapshot: verify says so too."""
    edit_manifest(snap, lambda doc: edit(doc["vm_config"]))

    result = run("verify", str(snap))

    assert (result.exit_code, result.stdout) == (1, ""), result.stdout
    assert message in result.stderr and "`splitvmm restore` refuses it" in result.stderr


def snapshot_of_pci_devices(target: Path, devices: list[dict[str, object]]) -> Path:
    """A snapshot of a VM with serial0 and the PCI `devices` (config entries), each where a
    VM of that config has it (pci.root.device_numbers), its state empty."""
    config = {**VM_CONFIG, "device": [*VM_CONFIG["device"], *devices]}
    names = [str(d["name"]) for d in devices]
    mem = memory()
    try:
        with SnapshotWriter(target, config, CPUID, mem) as w:
            w.add_ram(mem)
            w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
            w.add_json_chunk("vm", "vm", 1, VM)
            functions = [
                {"name": name, "device": number, "bars": [0] * 6, "command": 0}
                for number, name in enumerate(names, start=1)
            ]
            w.add_json_chunk("vm", "pci", 1, {"functions": functions, "msi_routes": []})
            w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")
            for device in devices:
                w.add_json_chunk("device", str(device["name"]), 1, {}, model=str(device["model"]))
            return w.commit(None)
    finally:
        mem.close()


def test_cli_verify_of_a_vm_with_a_disk_and_a_tap_says_ok(tmp_path):
    """Their image and TAP are the operator's to name at a restore (--set): verify stands in
    for them (it crashed with a traceback on every such VM)."""
    snap = snapshot_of_pci_devices(
        tmp_path / "s",
        [
            {"name": "blk0", "model": "virtio-blk", "path": "/nowhere/disk.img"},
            {"name": "net0", "model": "virtio-net", "tap": "tap9"},
        ],
    )

    result = run("verify", str(snap))

    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout.startswith(f"snapshot {snap}: OK (7 chunks")


def test_cli_verify_snapshot_without_vcpus_exits_1(snap):
    edit_manifest(
        snap, lambda doc: doc.update(chunks=[c for c in doc["chunks"] if c["kind"] != "vcpu"])
    )
    os.unlink(snap / "vcpu0.json")

    result = run("verify", str(snap))

    assert result.exit_code == 1 and "no vCPU chunk" in result.stderr, result.stderr


def test_cli_verify_corrupt_chunk_exits_1_naming_it(snap):
    flip_byte(snap / "vcpu0.json", 3)

    result = run("verify", str(snap))

    assert result.exit_code == 1
    assert f"snapshot {snap}: chunk vcpu0 (vcpu0.json): checksum mismatch" in result.stderr


def test_cli_verify_missing_chunk_exits_1(snap):
    os.unlink(snap / "ram.bin")

    result = run("verify", str(snap))

    assert (result.exit_code, result.stdout) == (1, "")
    assert "chunk ram (ram.bin): does not exist" in result.stderr


def test_cli_inspect_bad_manifest_exits_1_without_traceback(snap):
    (snap / "manifest.json").write_text("{")

    result = run("inspect", str(snap))

    assert result.exit_code == 1
    assert "manifest.json: not valid JSON" in result.stderr
    assert "Traceback" not in result.output


def test_cli_inspect_missing_directory_exits_1(tmp_path):
    result = run("inspect", str(tmp_path / "none"))

    assert (result.exit_code, result.stderr.strip()) == (
        1,
        f"splitvmm: error: snapshot {tmp_path / 'none'}: does not exist",
    )


HOSTILE_PRODUCER = "[/][bold red]x\x1b[2J\x1b]0;pwned\x07\u202e"


def test_cli_inspect_prints_producer_as_data(snap):
    edit_manifest(snap, lambda m: m.update(producer=HOSTILE_PRODUCER))

    result = run("inspect", str(snap))

    assert result.exit_code == 0, result.output
    assert "[/][bold red]x\\x1b[2J\\x1b]0;pwned\\x07\\u202e, created" in result.stdout
    assert not {"\x1b", "\x07", "\u202e"} & set(result.stdout)


def test_cli_inspect_on_an_ascii_stdout_escapes_what_it_cannot_encode(snap):
    """A printable non-ASCII producer is kept (escaped() keeps printable characters); an
    ASCII stdout then ended `inspect` in a UnicodeEncodeError traceback."""
    edit_manifest(snap, lambda m: m.update(producer="spl\u20acitvmm"))
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}

    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", "snapshot", "inspect", str(snap)],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip

    assert (proc.returncode, proc.stderr) == (0, b"")
    assert b"spl\\u20acitvmm" in proc.stdout


def test_cli_inspect_prints_stored_config_as_data(snap):
    edit_manifest(snap, lambda m: m["vm_config"]["vm"].update(name="[red]\x1b[31m\n"))

    result = run("inspect", str(snap))

    assert '"name": "[red]\\u001b[31m\\n"' in result.stdout
    assert "\x1b" not in result.stdout


def test_cli_inspect_json_keeps_hostile_text_exact_and_escaped(snap):
    edit_manifest(snap, lambda m: m.update(producer=HOSTILE_PRODUCER))

    result = run("inspect", str(snap), "--json")

    assert json.loads(result.stdout)["producer"] == HOSTILE_PRODUCER
    assert result.stdout.isascii() and "\x1b" not in result.stdout


def disk_named(name: str) -> dict[str, object]:
    return {"name": name, "model": "virtio-blk", "path": "/d.img"}


# --- 1. inspect's chunk table at 80 columns (a pipe's width) -------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [("name", "scratch-disk0"), ("name", "d" * 63), ("model", "m" * 55 + "ABCDEFGH")],
    ids=["name", "longest-name", "longest-model"],
)
def test_cli_inspect_table_loses_nothing_of_a_long_name_at_80_columns(tmp_path, column, value):
    """A device name, and a chunk's model in a hostile manifest, may have up to 63
    characters. At 80 columns (a pipe, a log file, an 80-column terminal) the chunk table cut
    names, kinds and checksums short with '…', and a long one dropped the kind, state version
    and size columns of every row: two names differing at their end looked the same."""
    if column == "name":
        snap = snapshot_of_pci_devices(tmp_path / "s", [disk_named(value)])
    else:
        snap = snapshot_of_pci_devices(tmp_path / "s", [disk_named("blk0")])
        edit_manifest(
            snap, lambda m: [c.update(model=value) for c in m["chunks"] if c["name"] == "blk0"]
        )

    result = CliRunner().invoke(cli, ["snapshot", "inspect", str(snap)], env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    header = result.stdout.index("┃")  # the table's header line (its "kind" was dropped too)
    table = result.stdout[result.stdout.rindex("\n", 0, header) + 1 :]
    assert "…" not in table, table
    for row in json.loads((snap / "manifest.json").read_text())["chunks"]:
        assert f"blake3:{row['digest']['hex'][:12]}" in table, table  # every checksum whole
    assert table.count("device") == 2 and "14.9 KiB" in table, table  # kinds, sizes kept
    # the value whole, if folded over lines of its column
    at = 1 if column == "name" else 2
    cells = [line.split("│")[at].strip() for line in table.splitlines() if "│" in line]
    assert value in "".join(cells), table


# --- 2. a stored config's invalid device name blamed on a missing --set --------------------------


def restore_with_stored_devices(tmp_path, monkeypatch, devices, *args):
    """`splitvmm restore` of the golden VM's snapshot, `devices` added to its stored config:
    the snapshot, and what the command came to."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)
    edit_manifest(snap, lambda m: m["vm_config"]["device"].extend(devices))
    result, _ = invoke(monkeypatch, ["restore", str(snap), *args])
    return snap, result


@pytest.mark.parametrize("name", ["disk 0", 7, "ram", "vcpu1", "manifest", "control"])
def test_restore_of_a_stored_disk_with_an_invalid_name_names_the_snapshot(
    tmp_path, monkeypatch, name
):
    """The stored config's device has a name no config may have (not a NAME_RE name, or a
    reserved one: config.RESERVED_NAME_RE, RUNTIME_DIR_NAMES): the snapshot is at fault, and
    says so. It said "device 'disk 0': a restore needs --set DEVICE.path=..." (naming no
    snapshot), which no --set can satisfy."""
    disk = {"name": name, "model": "virtio-blk", "path": "/x.img"}
    snap, result = restore_with_stored_devices(tmp_path, monkeypatch, [disk])

    assert_refused_cleanly(result, f"snapshot {snap}: manifest vm_config: device")
    assert "--set" not in result.stderr, result.stderr


# --- 4. output to a full disk -------------------------------------------------------------------


@pytest.mark.parametrize("args", [["inspect", "--json"], ["inspect"], ["verify"]])
def test_cli_snapshot_output_to_a_full_disk_is_one_line_not_a_traceback(tmp_path, args):
    """`splitvmm snapshot inspect --json DIR > file` on a full file system (ENOSPC; here
    /dev/full): exit 1 with one line saying so, not an OSError traceback."""
    snap = snapshot_of_pci_devices(tmp_path / "s", [disk_named("blk0")])
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "splitvmm", "snapshot", *args, str(snap)],
            stdout=full, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip

    assert proc.returncode == 1, proc.stderr
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()[-600:]
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitvmm: error: "), lines
    assert "No space left on device" in lines[0]


# --- 3. a working directory that was removed ----------------------------------------------------


@pytest.fixture
def removed_cwd(tmp_path, monkeypatch):
    """The working directory is removed under us (getcwd() then fails: ENOENT)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()


def test_cli_verify_by_absolute_path_in_a_removed_working_directory_says_ok(tmp_path, removed_cwd):
    """verify's stand-in --set values are never opened: it needs no working directory, and
    ended in a FileNotFoundError traceback from Path.cwd() (restore.config_of)."""
    snap = snapshot_of_pci_devices(tmp_path / "s", [disk_named("blk0")])

    result = run("verify", str(snap))

    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert (result.exit_code, result.stderr) == (0, ""), result.output


def test_restore_in_a_removed_working_directory_is_one_line(tmp_path, monkeypatch, removed_cwd):
    """As `ctl snapshot` says it (test_ctl_errors.py): one line, not a traceback."""
    snap = tmp_path / "snap"
    shutil.copytree(GOLDEN, snap)

    result, _ = invoke(monkeypatch, ["restore", str(snap)])

    assert_refused_cleanly(result, "working directory")


# --- 4. a stored device listed twice is blamed on the operator's --set -----------------------------


@pytest.mark.parametrize("sets", [[], ["--set", "blk9.path=/tmp/disk.img"]])
def test_restore_of_a_stored_config_listing_a_disk_twice_names_the_snapshot(
    tmp_path, monkeypatch, sets
):
    """Two stored devices of one name: the snapshot is at fault. The --set applied to the
    last only, and the first's dropped path was blamed on that --set ("--set 'blk9.path':
    device 'blk9'.path: missing"), or on one missing, naming no snapshot."""
    disk = {"name": "blk9", "model": "virtio-blk", "path": "/x.img"}
    snap, result = restore_with_stored_devices(tmp_path, monkeypatch, [disk, dict(disk)], *sets)

    assert_refused_cleanly(result, f"snapshot {snap}: manifest vm_config: device 'blk9'")
    assert "--set" not in result.stderr, result.stderr


def test_cli_verify_of_a_stored_config_listing_a_disk_twice_blames_no_set(tmp_path):
    """verify gives no --set, and said "--set 'blk9.path': device 'blk9'.path: missing"."""
    snap = snapshot_of_pci_devices(tmp_path / "s", [disk_named("blk9")])
    edit_manifest(snap, lambda m: m["vm_config"]["device"].append(disk_named("blk9")))

    result = CliRunner().invoke(cli, ["snapshot", "verify", str(snap)])

    assert result.exit_code == 1, result.output
    assert "manifest vm_config: device 'blk9': the name is used twice" in result.stderr
    assert "--set" not in result.stderr, result.stderr
