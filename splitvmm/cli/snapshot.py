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

from splitvmm.snapshot import Snapshot, SnapshotError
from splitvmm.snapshot.reader import format_size

DIR = click.Path(path_type=Path)  # existence is the reader's to judge, with its own message
SHA_PREFIX = 12


def _fail(path: Path, error: SnapshotError) -> NoReturn:
    click.echo(f"splitvmm: error: snapshot {path}: {error}", err=True)
    sys.exit(1)


def _open(path: Path) -> Snapshot:
    try:
        return Snapshot.open(path)
    except SnapshotError as e:
        _fail(path, e)


@click.group("snapshot")
def command() -> None:
    """Inspect or verify a snapshot directory written by `splitvmm ctl snapshot`."""


@command.command("inspect")
@click.argument("directory", type=DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(directory: Path, as_json: bool) -> None:
    """Show a snapshot's header and chunks (reads only the manifest; see `verify`)."""
    snap = _open(directory)
    if as_json:
        click.echo(json.dumps(snap.summary(), indent=2))
        return
    console = Console(highlight=False)
    m = snap.manifest
    regions = len(m.memory.regions)
    console.print(f"[bold]snapshot[/bold] {directory}")
    console.print(f"  format    v{m.read_version} ({m.producer}, created {m.created})")
    ram = snap.ram_chunk
    memory = f"{format_size(m.memory.size)} in {regions} region(s)"
    console.print(f"  memory    {memory}, {format_size(ram.size)} saved ({ram.encoding})")
    console.print(f"  vCPUs     {snap.vcpu_count}")
    console.print(f"  on disk   {format_size(snap.total_bytes)} in {len(m.chunks)} chunks")
    console.print(_chunk_table(snap))


def _chunk_table(snap: Snapshot) -> Table:
    table = Table(show_edge=False)
    for title in ("kind", "name", "model", "state v", "size", "sha256"):
        table.add_column(title, no_wrap=True, justify="right" if title == "size" else "left")
    for c in snap.chunks:
        size, sha = format_size(c.size), c.sha256[:SHA_PREFIX]
        table.add_row(c.kind, c.name, c.model or "", str(c.state_version), size, sha)
    return table


@command.command("verify")
@click.argument("directory", type=DIR)
def verify(directory: Path) -> None:
    """Check every chunk's size, sha256 and structure; exit 1 on the first problem."""
    snap = _open(directory)
    columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("verify", total=snap.total_bytes)
        try:
            snap.verify(lambda done, total: bar.update(task, completed=done))
        except SnapshotError as e:
            bar.stop()
            _fail(directory, e)
    count, mib = len(snap.chunks), snap.total_bytes / (1 << 20)
    chunks = "chunk" if count == 1 else "chunks"
    click.echo(f"snapshot {directory}: OK ({count} {chunks}, {mib:.2f} MiB)")
