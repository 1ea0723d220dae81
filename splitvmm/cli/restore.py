"""`splitvmm restore DIR [--set DEVICE.OPTION=VALUE]`: run a snapshot with the config it holds."""

from __future__ import annotations

from pathlib import Path

import click

from splitvmm.cli.up import EXIT_HELP, run_and_exit


def _overrides(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key] = value
    return out


@click.command("restore", epilog=EXIT_HELP)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="DEVICE.OPTION=VALUE",
    help="Override a host resource that moved, e.g. serial0.output=/tmp/log (repeatable).",
)
def command(directory: Path, settings: tuple[str, ...]) -> None:
    """Restore the VM saved in DIRECTORY, with the config stored in the snapshot."""
    from splitvmm.monitor import restore

    run_and_exit(lambda snap, ov: restore.config_of(snap, ov), directory, _overrides(settings))
