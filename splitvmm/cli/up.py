"""`splitvmm up vm.toml [--restore DIR]`: boot (or restore) a VM in the foreground."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from splitvmm.errors import SplitvmmError

EXIT_HELP = """Exit status: the guest's debug-exit status ((value << 1) | 1), 0 for a guest
reset, power-off or `ctl suspend`, 4 when the VM stopped on a fault (triple fault, an
instruction KVM could not run, a failed device), 1 when it could not start."""


def run_and_exit(cfg_loader, snapshot_dir: Path | None, overrides: dict[str, str]) -> None:
    """Shared by `up` and `restore`: build the config, open the snapshot, run, exit."""
    from splitvmm.monitor import restore
    from splitvmm.monitor.machine import run_vm
    from splitvmm.snapshot.reader import Snapshot

    try:
        snap = Snapshot.open(snapshot_dir) if snapshot_dir is not None else None
        cfg = cfg_loader(snap, overrides)
        if snap is not None:
            restore.check_compatible(snap, cfg)
            _verify_with_progress(snap)
        outcome = run_vm(cfg, snap)
    except SplitvmmError as e:
        click.echo(f"splitvmm: error: {e}", err=True)
        sys.exit(1)
    click.echo(f"\r\nsplitvmm: {outcome.message}", err=True)
    sys.exit(outcome.status)


def _verify_with_progress(snap) -> None:
    from rich.progress import Progress

    with Progress(transient=True, console=None) as progress:
        task = progress.add_task("verifying snapshot", total=max(snap.total_bytes, 1))
        snap.verify(lambda done, total: progress.update(task, completed=done))


@click.command("up", epilog=EXIT_HELP)
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--restore",
    "snapshot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Start from this snapshot instead of booting (the config must match it).",
)
def command(config: Path, snapshot_dir: Path | None) -> None:
    """Boot the VM described by CONFIG (TOML) and run it until it stops."""
    from splitvmm.config import load_config

    run_and_exit(lambda snap, _: load_config(config, check_files=snap is None), snapshot_dir, {})
