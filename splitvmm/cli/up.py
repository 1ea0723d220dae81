"""`splitvmm up vm.toml [--restore DIR [--require-signature KEYFILE]]`: boot (or restore) a VM
in the foreground."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from splitvmm import timings
from splitvmm.cli.paths import GivenPath
from splitvmm.errors import ConfigError, SplitvmmError, escaped

if TYPE_CHECKING:
    from splitvmm.config import VmConfig
    from splitvmm.monitor.exits import Outcome
    from splitvmm.sandbox.launcher import Launcher
    from splitvmm.snapshot.reader import Snapshot

EXIT_HELP = """Exit status: the guest's debug-exit status ((value << 1) | 1), 0 for a guest
reset, power-off, `ctl suspend` or Ctrl-A x, 4 when the VM stopped on a fault (triple fault,
an instruction KVM could not run, a failed device), 1 when it could not start, 128 + N when
signal N stopped it."""

ConfigLoader = Callable[["Snapshot | None"], "VmConfig"]

# A snapshot directory, as `up --restore`, `restore` and `snapshot inspect|verify` take it:
# the reader judges whether it exists, is a directory and can be read, in one line naming the
# snapshot (exit 1). click's own checks (file_okay=False; readable, on by default) refused a
# file or an unreadable directory first, with a usage error and exit 2.
SNAPSHOT_DIR = GivenPath(readable=False, path_type=Path)
# A signing key file, as `--require-signature` takes it: signing.load_key judges it in one line.
KEY_FILE = GivenPath(readable=False, path_type=Path)

require_signature_option = click.option(
    "--require-signature",
    "key_file",
    type=KEY_FILE,
    metavar="KEYFILE",
    help="Refuse a snapshot whose manifest.sig is missing or not made with this key.",
)


def run_and_exit(
    cfg_loader: ConfigLoader,
    snapshot_dir: Path | None,
    key_file: Path | None,
    show_timings: bool = False,
) -> None:
    """Shared by `up` and `restore`: build the config, open the snapshot, run, exit. A boot
    imports no snapshot reading code (nor rich, which its progress bar uses).

    The launcher comes first, before the monitor's imports: it starts the zygote, which
    imports what every device runs on, on another core meanwhile (sandbox/launcher.py)."""
    try:
        from splitvmm.cli import early
        from splitvmm.sandbox.launcher import Launcher

        launcher = early.take() or Launcher.start()  # main() may have started it already
    except SplitvmmError as e:
        _fail(e)
    except KeyboardInterrupt:  # as below: nothing was built (a launcher dies with us)
        _stopped_by_sigint()
    timings.mark("command line")
    from splitvmm import stderrlog

    log = stderrlog.install()  # no thread of the VM waits on a stderr nobody reads
    try:
        try:
            outcome = _run(cfg_loader, snapshot_dir, key_file, launcher)
        finally:  # the VM has ended: what its log left unsaid goes before what follows
            if log is not None:
                log.finish()
    except SplitvmmError as e:
        if show_timings:  # where a start that failed spent its time: the error's phase too
            timings.mark("until the error")
            with contextlib.suppress(OSError):
                timings.print_report()
        _fail(e)
    except KeyboardInterrupt:  # SIGINT before the VM's own handlers (Machine.build): the
        # config or the snapshot was being read, and nothing was built; not click's Abort
        _stopped_by_sigint()
    timings.mark("teardown")
    # The VM's status is the exit status, whatever becomes of these lines: a terminal that
    # hung up (EIO) or a stderr pipe nobody reads (EPIPE) must not turn it into 1 or 120.
    with contextlib.suppress(OSError):
        if show_timings:
            timings.print_report()
        # Escaped as the errors are (_fail): a snapshot directory's name, a device's failure
        # may hold a newline or an escape sequence.
        click.echo(f"\r\nsplitvmm: {escaped(outcome.message)}", err=True)
    sys.exit(outcome.status)


def _run(
    cfg_loader: ConfigLoader, snapshot_dir: Path | None, key_file: Path | None, launcher: Launcher
) -> Outcome:
    """The VM, from its config (and snapshot) to its end."""
    from splitvmm.monitor.machine import run_vm

    timings.mark("import monitor")
    try:
        if snapshot_dir is None:
            snap, cfg = None, cfg_loader(None)
        else:
            with _naming_snapshot(snapshot_dir):
                snap = _open_snapshot(snapshot_dir, key_file)
                cfg = cfg_loader(snap)
                _check_snapshot(snap, cfg)
    except BaseException:
        launcher.close()
        raise
    from splitvmm.cli import early

    early.release_collector()  # the imports are done; what runs the VM makes garbage
    timings.mark("config")
    if snapshot_dir is None:
        return run_vm(cfg, snap, launcher)
    with _naming_snapshot(snapshot_dir):  # what the restore finds wrong as it loads names it too
        return run_vm(cfg, snap, launcher)


def _fail(error: SplitvmmError) -> NoReturn:
    """The error as one line, exit 1. Escaped here, once for every message: many quote a path
    as given (the config's, a kernel's, a snapshot dir's), and a newline or an escape sequence
    in one split the line or reached the terminal raw. (escaped() leaves what an error already
    escaped as it is: a backslash is printable.)"""
    click.echo(f"splitvmm: error: {escaped(str(error))}", err=True)
    sys.exit(1)


def _stopped_by_sigint() -> NoReturn:
    with contextlib.suppress(OSError):
        click.echo("splitvmm: stopped by SIGINT", err=True)
    sys.exit(128 + signal.SIGINT)


@contextlib.contextmanager
def _naming_snapshot(snapshot_dir: Path) -> Iterator[None]:
    """A snapshot's error (opening it, its stored config, its checks) names which snapshot,
    as `snapshot inspect` does."""
    from splitvmm.errors import escaped
    from splitvmm.snapshot.format import SnapshotError

    try:
        yield
    except SnapshotError as e:
        raise SnapshotError(f"snapshot {escaped(str(snapshot_dir))}: {e}") from None


def _open_snapshot(snapshot_dir: Path, key_file: Path | None) -> Snapshot:
    from splitvmm.snapshot import signing
    from splitvmm.snapshot.reader import Snapshot

    key = signing.load_key(key_file) if key_file is not None else None
    return Snapshot.open(snapshot_dir, key)


def _check_snapshot(snap: Snapshot, cfg: VmConfig) -> None:
    from splitvmm.monitor import restore

    restore.check_compatible(snap, cfg)
    # Guest RAM's checksum is checked as it is copied into the VM (before any vCPU runs), so
    # a restore reads it once; everything else is checked here, before anything is built.
    snap.verify(ram_data=False)


timings_option = click.option(
    "--timings",
    "show_timings",
    is_flag=True,
    help="Print to stderr, once the VM ends, how long each start-up phase took.",
)


@click.command("up", epilog=EXIT_HELP)
@click.argument("config", type=GivenPath(readable=False, path_type=Path))  # as load_config says
@click.option(
    "--restore",
    "snapshot_dir",
    type=SNAPSHOT_DIR,
    help="Start from this snapshot instead of booting (the config must match it; every host "
    "resource comes from the config, none from the snapshot).",
)
@require_signature_option
@timings_option
def command(
    config: Path, snapshot_dir: Path | None, key_file: Path | None, show_timings: bool
) -> None:
    """Boot the VM described by CONFIG (TOML) and run it until it stops."""
    if key_file is not None and snapshot_dir is None:
        raise click.UsageError("--require-signature goes with --restore")

    def load(snap: Snapshot | None) -> VmConfig:
        from splitvmm.cli import early
        from splitvmm.config import load_config  # here: after run_and_exit started the launcher

        fd = early.closed_fd(config)
        if fd is not None:
            raise ConfigError(
                f"{config}: cannot read the config: `splitvmm up` closes every fd it inherits "
                f"but 0-2, fd {fd} among them; give it on stdin (`... | splitvmm up /dev/stdin`)"
            )
        if snap is None:
            return load_config(config)
        from splitvmm.monitor import restore

        return load_config(config, check_files=False, kept_empty=restore.stored_empty(snap))

    run_and_exit(load, snapshot_dir, key_file, show_timings)
