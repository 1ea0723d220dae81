"""`splitvmm snapshot inspect|verify DIR`: look inside a snapshot, or check every chunk of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from splitvmm.cli.up import KEY_FILE, SNAPSHOT_DIR
from splitvmm.errors import escaped
from splitvmm.snapshot import Snapshot, SnapshotError
from splitvmm.snapshot.reader import format_size

DIGEST_PREFIX = 12  # hex digits of a chunk's checksum shown by inspect


def _fail(path: Path, error: SnapshotError) -> NoReturn:
    click.echo(f"splitvmm: error: snapshot {escaped(str(path))}: {error}", err=True)
    sys.exit(1)


def _open(path: Path, key: bytes | None = None) -> Snapshot:
    try:
        return Snapshot.open(path, key)
    except SnapshotError as e:
        _fail(path, e)


@click.group("snapshot")
def command() -> None:
    """Inspect or verify a snapshot directory written by `splitvmm ctl snapshot`."""


@command.command("inspect")
@click.argument("directory", type=SNAPSHOT_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(directory: Path, as_json: bool) -> None:
    """Show a snapshot's header, stored config and chunks (reads only the manifest; see
    `verify`). Everything shown comes from an untrusted file and is printed as data."""
    snap = _open(directory)
    if as_json:  # ensure_ascii (the default): control characters come out as \u escapes
        click.echo(json.dumps(snap.summary(), indent=2))
        return
    console = Console(highlight=False, emoji=False)
    m = snap.manifest
    regions = len(m.memory.regions)
    console.print(Text.assemble(("snapshot", "bold"), " ", escaped(str(directory))))
    console.print(
        Text(f"  format    v{m.read_version} ({escaped(m.producer)}, created {escaped(m.created)})")
    )
    ram = snap.ram_chunk
    memory = f"{format_size(m.memory.size)} in {regions} region(s)"
    console.print(Text(f"  memory    {memory}, {format_size(ram.size)} saved ({ram.encoding})"))
    console.print(Text(f"  vCPUs     {snap.vcpu_count}"))
    console.print(Text(f"  on disk   {format_size(snap.total_bytes)} in {len(m.chunks)} chunks"))
    if snap.signed:
        console.print(Text("  signed    manifest.sig (not checked: verify --require-signature)"))
    console.print(Text("  config    as stored (a restore takes no host path or socket from it):"))
    # ensure_ascii: every control or non-ASCII character of the stored config is an escape.
    for line in json.dumps(m.vm_config, indent=2, ensure_ascii=True).splitlines():
        console.print(Text(f"    {line}"), soft_wrap=True)
    console.print(_chunk_table(snap))


def _chunk_table(snap: Snapshot) -> Table:
    table = Table(show_edge=False)
    for title in ("kind", "name", "model", "state v", "size", "checksum"):
        # A name or model of up to 63 characters folds onto more lines: cut short (or its
        # column dropped to fit 80 columns, a pipe's width), it hid the end of the name, and
        # of the rows' kinds, sizes and checksums.
        wrap = {"overflow": "fold"} if title in ("name", "model") else {"no_wrap": True}
        table.add_column(title, justify="right" if title == "size" else "left", **wrap)
    for c in snap.chunks:
        size, checksum = format_size(c.size), f"{c.digest.alg}:{c.digest.hex[:DIGEST_PREFIX]}"
        cells = (c.kind, c.name, c.model or "", str(c.state_version), size, checksum)
        table.add_row(*(Text(escaped(cell)) for cell in cells))  # Text: never rich markup
    return table


def verify_with_progress(snap: Snapshot) -> None:
    """snap.verify() with a progress bar on stderr, when stderr is a terminal (elsewhere a
    bar would leave a blank line; on stdout it would mix with a restored guest's console)."""
    console = Console(stderr=True)
    columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    with progress as bar:
        task = bar.add_task("verify", total=max(snap.total_bytes, 1))
        snap.verify(lambda done, total: bar.update(task, completed=done))


@command.command("verify")
@click.argument("directory", type=SNAPSHOT_DIR)
@click.option(
    "--require-signature",
    "key_file",
    type=KEY_FILE,
    metavar="KEYFILE",
    help="Also require manifest.sig to be the manifest's MAC under the key in KEYFILE.",
)
def verify(directory: Path, key_file: Path | None) -> None:
    """Check every chunk's size, checksum and structure, decode the vCPU, VM and PCI states
    and parse the stored config as a restore would; exit 1 on the first problem. (Each
    device's own fields are checked by its model when it is restored.)"""
    from splitvmm.monitor import restore
    from splitvmm.snapshot import signing

    try:
        key = signing.load_key(key_file) if key_file is not None else None
    except SnapshotError as e:
        _fail(directory, e)
    snap = _open(directory, key)
    try:
        verify_with_progress(snap)
        restore.check_states(snap)
    except SnapshotError as e:
        _fail(directory, e)
    count, mib = len(snap.chunks), snap.total_bytes / (1 << 20)
    chunks = "chunk" if count == 1 else "chunks"
    signed = ", signature good" if key_file is not None else ""
    shown_dir = escaped(str(directory))
    click.echo(f"snapshot {shown_dir}: OK ({count} {chunks}, {mib:.2f} MiB{signed})")
