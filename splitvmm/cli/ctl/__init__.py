"""`splitvmm ctl`: talk to a running VM over its control socket."""

from __future__ import annotations

import math
from pathlib import Path

import click

from splitvmm.cli.ctl import crash, link, snapshot, state
from splitvmm.cli.paths import GivenPath

# ~24.8 days: a socket's timeout is waited out in poll(2), an int of milliseconds; past it
# the count wraps (2**32 ms + 0.3 s gave up after 0.3 s)
MAX_TIMEOUT_S = (2**31 - 1) // 1000


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """NaN passes FloatRange's bounds (every comparison with it is false)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number of seconds")
    return value


@click.group("ctl")
@click.option("--vm", help="The VM's name (vm.name in its config).")
@click.option(
    "--socket",
    type=GivenPath(dir_okay=False, path_type=Path),
    help="The control socket's path, instead of --vm.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, MAX_TIMEOUT_S, min_open=True),
    callback=_not_nan,
    metavar="SECONDS",
    help="Give up waiting for the VM's answer after SECONDS (it may still carry the request "
    "out). Without it, status and devices wait 30 s, and any other request as long as the VM "
    "works on it: a suspend to slow storage may take longer than any fixed limit, and a VM "
    "that dies ends the wait.",
)
@click.option(
    "--monitor-uid",
    type=click.IntRange(0, 2**32 - 2),
    metavar="UID",
    help="The user the VM runs as, where it is not you (root steering a service account's "
    "VM, with --socket). Without it, a socket served by another user is sent nothing.",
)
@click.pass_context
def command(
    ctx: click.Context,
    vm: str | None,
    socket: Path | None,
    timeout: float | None,
    monitor_uid: int | None,
) -> None:
    """Control a running VM: status, pause, resume, power-button, snapshot, suspend, devices,
    link, crash-device, inject-fault."""
    ctx.obj = {"vm": vm, "socket": socket, "timeout": timeout, "monitor_uid": monitor_uid}


for sub in (*state.COMMANDS, *snapshot.COMMANDS, *link.COMMANDS, *crash.COMMANDS):
    command.add_command(sub)
