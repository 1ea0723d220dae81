"""`splitvmm up vm.toml`: boot a VM in the foreground and exit with the guest's status."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from splitvmm.errors import SplitvmmError


@click.command("up")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
def command(config: Path) -> None:
    """Boot the VM described by CONFIG (TOML) and run it until it stops.

    Exit status: the guest's debug-exit status ((value << 1) | 1), 0 for a guest
    reset or power-off, 4 when the VM stopped on a fault (triple fault, an
    instruction KVM could not run, a failed device), 1 when it could not start.
    """
    from splitvmm.config import load_config
    from splitvmm.monitor.machine import run_vm

    try:
        outcome = run_vm(load_config(config))
    except SplitvmmError as e:
        click.echo(f"splitvmm: error: {e}", err=True)
        sys.exit(1)
    if outcome.error:
        click.echo(f"\r\nsplitvmm: {outcome.message}", err=True)
    else:
        click.echo(f"\r\nsplitvmm: {outcome.message}", err=True)
    sys.exit(outcome.status)
