"""`splitvmm ctl crash-device NAME [--signal KILL|SEGV|ABRT|...]`: crash testing."""

from __future__ import annotations

import click

from splitvmm.cli.ctl import common
from splitvmm.protocol.spec import CRASH_SIGNALS


@click.command("crash-device")
@click.argument("name")
@click.option(
    "--signal",
    "sig",
    type=click.Choice(CRASH_SIGNALS, case_sensitive=False),
    default="KILL",
    show_default=True,
    help="The signal the monitor sends the device's process (through its pidfd).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def crash_device(ctx: click.Context, name: str, sig: str, as_json: bool) -> None:
    """Kill a device's process, to see what its on_crash policy does."""
    reply = common.call(ctx, "crash-device", name=name, signal=sig.upper())
    common.emit(reply, as_json, lambda r: f"sent SIG{r['signal']} to {r['name']} (pid {r['pid']})")


COMMANDS = (crash_device,)
