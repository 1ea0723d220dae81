"""`splitvmm ctl`: talk to a running VM over its control socket."""

from __future__ import annotations

from pathlib import Path

import click

from splitvmm.cli.ctl import crash, snapshot, state


@click.group("ctl")
@click.option("--vm", help="The VM's name (vm.name in its config).")
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The control socket's path, instead of --vm.",
)
@click.pass_context
def command(ctx: click.Context, vm: str | None, socket: Path | None) -> None:
    """Control a running VM: status, pause, resume, snapshot, suspend, devices, crash-device,
    inject-fault."""
    ctx.obj = {"vm": vm, "socket": socket}


for sub in (*state.COMMANDS, *snapshot.COMMANDS, *crash.COMMANDS):
    command.add_command(sub)
