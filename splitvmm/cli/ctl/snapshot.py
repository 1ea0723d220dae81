"""`splitvmm ctl snapshot DIR` and `splitvmm ctl suspend DIR` (snapshot, then the VM exits)."""

from __future__ import annotations

from pathlib import Path

import click

from splitvmm.cli.ctl import common

target_arg = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _human(r: dict[str, object], verb: str) -> str:
    size = int(r["bytes"]) / (1 << 20)  # type: ignore[call-overload]
    return f"{verb} {r['path']}: {size:.1f} MiB, VM paused {r['pause_ms']} ms"


@click.command("snapshot")
@target_arg
@json_option
@click.pass_context
def snapshot(ctx: click.Context, directory: Path, as_json: bool) -> None:
    """Write a consistent snapshot to DIRECTORY (which must not exist); the VM runs on."""
    r = common.call(ctx, "snapshot", path=str(directory.resolve()))
    common.emit(r, as_json, lambda reply: _human(reply, "snapshot"))


@click.command("suspend")
@target_arg
@json_option
@click.pass_context
def suspend(ctx: click.Context, directory: Path, as_json: bool) -> None:
    """Write a snapshot to DIRECTORY, then end the VM (bhyvectl --suspend)."""
    r = common.call(ctx, "suspend", path=str(directory.resolve()))
    common.emit(r, as_json, lambda reply: _human(reply, "suspended to"))


COMMANDS = (snapshot, suspend)
