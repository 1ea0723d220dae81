"""`splitvmm ctl snapshot DIR` and `splitvmm ctl suspend DIR` (snapshot, then the VM exits)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from splitvmm.cli.ctl import common
from splitvmm.cli.paths import GivenPath
from splitvmm.cli.up import KEY_FILE
from splitvmm.errors import escaped

# Judged by our code, in one line (exit 1), not by click's usage error (exit 2): the target by
# the monitor (a file there is "already exists", as any name taken), the key by signing.load_key.
target_arg = click.argument("directory", type=GivenPath(readable=False, path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
sign_option = click.option(
    "--sign",
    "key_file",
    type=KEY_FILE,
    metavar="KEYFILE",
    help="Sign the manifest (keyed BLAKE3, in manifest.sig) with the key in KEYFILE (mode 0600, "
    "16-4096 bytes); it goes to the VM over its private control socket.",
)


def target(directory: Path) -> str:
    """DIRECTORY as the monitor takes it: absolute, its parent as the kernel walks it here
    (symlinks and '..' followed, as a shell's cd would), its last component as typed. A
    symlink there is the monitor's to refuse (it would send the snapshot wherever it points,
    and a dangling one would be followed to a path nobody named), not ours to follow; and a
    loop of them is the kernel's ELOOP at the monitor, not a traceback here."""
    try:
        return os.path.join(os.path.realpath(directory.parent), directory.name)
    except OSError as e:  # relative, in a working directory removed since (getcwd fails)
        raise click.ClickException(
            f"snapshot target {escaped(str(directory))}: cannot make it absolute: "
            f"{e.strerror or e} (was the working directory removed?)"
        ) from None


def _request(directory: Path, key_file: Path | None) -> dict[str, object]:
    """The request's arguments: the target, and the key (hex) when signing."""
    args: dict[str, object] = {"path": target(directory)}
    if key_file is not None:
        from splitvmm.snapshot import SnapshotError, signing

        try:
            args["sign_key"] = signing.load_key(key_file).hex()
        except SnapshotError as e:
            raise click.ClickException(str(e)) from None
    return args


def _human(r: dict[str, object], verb: str) -> str:
    size = common.reply_int(r, "bytes") / (1 << 20)
    signed = ", signed" if r.get("signed") else ""
    # escaped here: emit() keeps newlines (of multi-line output), and the path is one line
    return f"{verb} {escaped(str(r['path']))}: {size:.1f} MiB{signed}, VM paused {r['pause_ms']} ms"


@click.command("snapshot")
@target_arg
@json_option
@sign_option
@click.pass_context
def snapshot(ctx: click.Context, directory: Path, as_json: bool, key_file: Path | None) -> None:
    """Write a consistent snapshot to DIRECTORY (which must not exist); the VM runs on."""
    r = common.call(ctx, "snapshot", **_request(directory, key_file))
    common.emit(r, as_json, lambda reply: _human(reply, "snapshot"))


@click.command("suspend")
@target_arg
@json_option
@sign_option
@click.pass_context
def suspend(ctx: click.Context, directory: Path, as_json: bool, key_file: Path | None) -> None:
    """Write a snapshot to DIRECTORY, then end the VM (bhyvectl --suspend)."""
    r = common.call(ctx, "suspend", **_request(directory, key_file))
    common.emit(r, as_json, lambda reply: _human(reply, "suspended to"))


COMMANDS = (snapshot, suspend)
