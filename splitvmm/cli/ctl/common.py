"""What every `ctl` command shares: finding the socket, one request, printing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from splitvmm.errors import SplitvmmError, escaped, shown
from splitvmm.protocol.spec import NAME_RE, NAME_RULE


def socket_path(vm: str | None, socket: Path | None) -> Path:
    """--socket as given, or the socket of the VM named (or the one running) in this user's
    runtime root, whose directories are checked to be private first (rundir.check_private):
    the fallback root lies in the shared temp dir."""
    if socket is not None:
        return socket
    from splitvmm.monitor.control import SOCKET_NAME
    from splitvmm.monitor.rundir import runtime_root

    root = runtime_root()
    _private(root)
    if vm is not None and not NAME_RE.fullmatch(vm):  # ("..", "a/b": another directory)
        raise click.ClickException(f"--vm: {shown(vm)} is not a VM name ({NAME_RULE})")
    if vm is None:
        # A monitor killed outright leaves its socket behind: only a listening one counts.
        running = sorted(p.parent.name for p in root.glob(f"*/{SOCKET_NAME}") if _listening(p))
        if not running:
            raise click.ClickException(f"no VM is running (none listens in {escaped(str(root))})")
        if len(running) > 1:
            raise click.ClickException(f"name the VM with --vm (running VMs: {', '.join(running)})")
        vm = running[0]
    _private(root / vm)
    return root / vm / SOCKET_NAME


def _private(directory: Path) -> None:
    """rundir.check_private, as a one-line error; a directory that is not there holds no
    socket (the request says no VM is listening)."""
    from splitvmm.monitor.rundir import check_private

    try:
        check_private(directory)
    except FileNotFoundError:
        pass
    except SplitvmmError as e:
        raise click.ClickException(escaped(str(e))) from None
    except OSError as e:  # XDG_RUNTIME_DIR a file (ENOTDIR), a directory we may not search
        raise click.ClickException(f"cannot use {escaped(str(directory))}: {e.strerror}") from None


def _listening(path: Path) -> bool:
    """Whether a monitor accepts connections on `path` (a stale socket refuses them; one
    whose backlog is full, EAGAIN, is listening, only busy)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


EXIT_TRY_AGAIN = 75  # <sysexits.h> EX_TEMPFAIL: the monitor is busy; the same request may work


class TryAgain(click.ClickException):
    exit_code = EXIT_TRY_AGAIN


def call(ctx: click.Context, op: str, **args: object) -> dict[str, object]:
    """One request to the VM named by the group options, waited for as long as the monitor
    works on it (a snapshot may take long), or --timeout; errors end the command: exit 1, or
    EXIT_TRY_AGAIN where the monitor refused it for now (busy), so a script may retry."""
    return _call(ctx, op, args, read_only=False)


def query(ctx: click.Context, op: str, **args: object) -> dict[str, object]:
    """call() for what the monitor answers at once (status, devices): within
    READ_ONLY_TIMEOUT_S, or --timeout."""
    return _call(ctx, op, args, read_only=True)


def _call(
    ctx: click.Context, op: str, args: dict[str, object], read_only: bool
) -> dict[str, object]:
    from splitvmm.monitor import control
    from splitvmm.monitor.control import ControlBusy, ControlError, request

    opts = ctx.obj
    timeout_s = opts["timeout"]
    if timeout_s is None and read_only:
        timeout_s = control.READ_ONLY_TIMEOUT_S
    try:
        path = socket_path(opts["vm"], opts["socket"])
        return request(path, op, args, timeout_s, opts["monitor_uid"])
    except ControlBusy as e:
        raise TryAgain(escaped(str(e))) from None
    except ControlError as e:  # its text may quote a device's words: never raw on a terminal
        raise click.ClickException(escaped(str(e))) from None


def reply_int(reply: dict[str, object], key: str) -> int:
    """The integer a reply holds at `key` (KeyError, TypeError: emit() says the reply lacks it)."""
    value = reply[key]
    if not isinstance(value, int):
        raise TypeError(f"{key} is not an integer")
    return value


def reply_objects(reply: dict[str, object], key: str) -> list[dict[str, object]]:
    """The list of JSON objects a reply holds at `key` (else KeyError or TypeError)."""
    items = reply[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise TypeError(f"{key} is not a list of objects")
    return items


def emit(
    reply: dict[str, object], as_json: bool, human: Callable[[dict[str, object]], str]
) -> None:
    """Print the reply: as JSON, or as human(reply), which a reply lacking its fields fails."""
    if as_json:
        reply = {k: v for k, v in reply.items() if k != "ok"}
        click.echo(json.dumps(reply, indent=2, sort_keys=True))
    else:
        try:
            text = human(reply)
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # (an int past a float)
            raise click.ClickException(
                f"the VM's reply lacks what this command shows ({e!r})"
            ) from None
        click.echo(escaped(text, keep="\n"))  # the reply's strings come from the monitor
    sys.stdout.flush()
