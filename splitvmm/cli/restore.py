"""`splitvmm restore DIR [--set DEVICE.OPTION=VALUE] [--require-signature KEYFILE]`: run a
snapshot with the guest settings it stores and host resources only the operator names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from splitvmm.cli.up import (
    EXIT_HELP,
    SNAPSHOT_DIR,
    require_signature_option,
    run_and_exit,
    timings_option,
)

if TYPE_CHECKING:
    from splitvmm.config import VmConfig
    from splitvmm.snapshot.reader import Snapshot


def _overrides(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key] = value
    return out


@click.command("restore", epilog=EXIT_HELP)
@click.argument("directory", type=SNAPSHOT_DIR)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="DEVICE.OPTION=VALUE",
    help="Name a host resource, e.g. serial0.output=/tmp/log or boot.firmware=fw.bin "
    "(repeatable). None is taken from the snapshot: serial output is stdio unless set, and "
    "a firmware-booted VM needs boot.firmware. vm.track_dirty_pages=true|false overrides "
    "the saved VM's; vm.device_uid=ID and vm.device_gid=ID run its devices as that user.",
)
@require_signature_option
@click.option(
    "--snapshot-dir",
    "snapshot_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A directory `ctl snapshot` may write to (vm.snapshot_dirs; repeatable).",
)
@timings_option
def command(
    directory: Path,
    settings: tuple[str, ...],
    key_file: Path | None,
    snapshot_dirs: tuple[Path, ...],
    show_timings: bool,
) -> None:
    """Restore the VM saved in DIRECTORY, with the guest settings stored in the snapshot."""
    from splitvmm.record import replace

    overrides = _overrides(settings)

    def config(snap: Snapshot | None) -> VmConfig:
        from splitvmm import config as config_module  # here: after run_and_exit started the
        from splitvmm.monitor import restore  # launcher

        if snap is None:  # run_and_exit opens DIRECTORY first: a restore always has one
            raise click.UsageError("restore needs the snapshot in DIRECTORY")
        given = [str(d) for d in snapshot_dirs]
        dirs = config_module.snapshot_dirs(given, restore.working_dir(), "--snapshot-dir")
        cfg = restore.config_of(snap, overrides)
        # What the monitor may write to is never the snapshot's to say.
        return replace(cfg, vm=replace(cfg.vm, snapshot_dirs=dirs))

    run_and_exit(config, directory, key_file, show_timings)
