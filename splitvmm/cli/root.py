"""The root `splitvmm` command (click). Subcommands load lazily so `--help` imports no cffi
module; cli/__init__.py main() loads this module once a VM's launcher is on its way."""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import sys
from typing import NoReturn

import click

from splitvmm import __version__, timings
from splitvmm.errors import exit_now, system_exit_status

OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)

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
    from splitvmm.cli import early

    if click.get_current_context().invoked_subcommand not in early.VM_COMMANDS:
        early.release_collector()  # held by a wrong guess of main()'s; a VM's releases it later
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="splitvmm: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> NoReturn:
    """Run the command line. It exits without the interpreter's teardown (~35 ms of freeing
    modules, for `up` a tenth of its run): by then a command has closed what it opened (`up`:
    the VM, every fd and process of it), and only buffered output is left to flush."""
    timings.mark("import cli")
    try:
        cli()  # standalone mode: it always ends with SystemExit
        status = 0
    except SystemExit as e:
        status = system_exit_status(e.code)
    except OSError as e:
        # Output that could not be written: stdout on a full file system (`inspect --json >
        # out.json`), over a quota, or a terminal gone. click handles EPIPE alone.
        if e.errno not in OUTPUT_ERRNOS:
            raise
        with contextlib.suppress(OSError):
            print(f"splitvmm: error: cannot write the output: {e.strerror}", file=sys.stderr)
        status = 1
    exit_now(status)
