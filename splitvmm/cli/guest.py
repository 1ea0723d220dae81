"""`splitvmm guest build`: the demo Linux guest kit (Debian cloud kernel + busybox initramfs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.console import Console

from splitvmm.cli.paths import GivenPath
from splitvmm.errors import SplitvmmError, escaped
from splitvmm.guestkit.kit import build_kit, default_cache_dir, describe


@click.group()
def command() -> None:
    """Guest kits to boot with `splitvmm up`."""


@command.command()
@click.option(
    "--cache-dir",
    type=GivenPath(file_okay=False, path_type=Path),
    default=None,
    help="Where the kit lives [default: $XDG_CACHE_HOME/splitvmm/guest or ~/.cache/...].",
)
@click.option(
    "--force", is_flag=True, help="Download and rebuild even if the cached kit is intact."
)
def build(cache_dir: Path | None, force: bool) -> None:
    """Build the Debian demo guest kit and print the path of its VM config.

    Downloads linux-image-cloud-amd64 and busybox-static with apt-get (nothing is installed on
    the host), writes the kernel, an initramfs with the virtio modules, and debian.toml.
    """
    console = Console(stderr=True)  # stdout carries only the config path, for scripts
    start = time.monotonic()
    try:
        with console.status("building the guest kit") as status:

            def progress(message: str) -> None:
                console.print(f"[dim]guest build:[/dim] {message}", highlight=False, soft_wrap=True)
                status.update(message)

            kit = build_kit(cache_dir or default_cache_dir(), force=force, progress=progress)
    except SplitvmmError as e:  # a path in it is data, and apt-get's words too
        raise click.ClickException(escaped(str(e))) from e
    verb = "reused" if kit.reused else f"built in {time.monotonic() - start:.1f} s"
    console.print(f"guest kit {verb}: {describe(kit)}", highlight=False, soft_wrap=True)
    click.echo(os.fsencode(kit.config))  # the path's own bytes, UTF-8 or not
