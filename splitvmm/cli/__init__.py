"""The root `splitvmm` command. Subcommands load lazily so `--help` imports no cffi module."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from splitvmm import __version__

# name -> module under splitvmm.cli that defines `command`
SUBCOMMANDS = {
    "up": "up",
    "restore": "restore",
    "ctl": "ctl",
    "guest": "guest",
    "policy": "policy",
    "snapshot": "snapshot",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = SUBCOMMANDS.get(name)
        if module is None:
            return None
        command: click.Command = importlib.import_module(f"splitvmm.cli.{module}").command
        return command


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="splitvmm")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="How much the monitor logs to stderr.",
)
def cli(log_level: str) -> None:
    """A KVM virtual machine monitor with every device model in its own sandboxed process."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="splitvmm: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    cli()
