"""Crash testing: `splitvmm ctl crash-device NAME [--signal KILL|SEGV|ABRT|...]` and
`splitvmm ctl inject-fault NAME KIND [--after N] [--delay-ms D] [--signal S] [--on O]
[--count C]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from splitvmm.cli.ctl import common
from splitvmm.protocol.faults import (
    DEFAULT_COUNT,
    DEFAULT_ON,
    FAULT_KINDS,
    FAULT_SIGNALS,
    MAX_COUNT,
    MAX_DELAY_MS,
    REQUEST_KINDS,
)
from splitvmm.protocol.spec import CRASH_SIGNALS

F = TypeVar("F", bound=Callable[..., Any])


def signal_option(choices: tuple[str, ...], help_text: str) -> Callable[[F], F]:
    """--signal NAME, one of `choices` (the first is the default)."""
    return click.option(
        "--signal",
        "sig",
        type=click.Choice(choices, case_sensitive=False),
        default=choices[0],
        show_default=True,
        help=help_text,
    )


@click.command("crash-device")
@click.argument("name")
@signal_option(CRASH_SIGNALS, "The signal the monitor sends the device's process (its pidfd).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def crash_device(ctx: click.Context, name: str, sig: str, as_json: bool) -> None:
    """Kill a device's process, to see what its on_crash policy does."""
    reply = common.call(ctx, "crash-device", name=name, signal=sig.upper())
    common.emit(reply, as_json, lambda r: f"sent SIG{r['signal']} to {r['name']} (pid {r['pid']})")


@click.command("inject-fault")
@click.argument("name")
@click.argument("kind", type=click.Choice(FAULT_KINDS))
@click.option(
    "--after",
    type=click.IntRange(1, MAX_COUNT),
    default=1,
    show_default=True,
    help="The access frame (read, write, input), counted from now, at which it fires "
    "(io-error: the request of its kind).",
)
@click.option(
    "--delay-ms",
    type=click.IntRange(0, MAX_DELAY_MS),
    default=0,
    help="delay: how long the reply waits (1 or more: a delay fault needs it).",
)
@signal_option(FAULT_SIGNALS, "crash: how the process dies.")
@click.option(
    "--on",
    type=click.Choice(REQUEST_KINDS),
    default=DEFAULT_ON,
    show_default=True,
    help="io-error: the requests it counts and fails (write: discards and write-zeroes too).",
)
@click.option(
    "--count",
    type=click.IntRange(1, MAX_COUNT),
    default=DEFAULT_COUNT,
    show_default=True,
    help="io-error: how many requests in a row fail.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def inject_fault(
    ctx: click.Context,
    name: str,
    kind: str,
    after: int,
    delay_ms: int,
    sig: str,
    on: str,
    count: int,
    as_json: bool,
) -> None:
    """Arm a fault in a device's running process: crash after N frames, delay or drop the
    reply to frame N, or exit on receiving frame N; or (io-error, virtio-blk) fail its Nth
    request and the COUNT - 1 after it with an I/O error, as a failing disk would. It fires
    once, in this process only."""
    args = {"name": name, "kind": kind, "after": after, "delay_ms": delay_ms,
            "signal": sig.upper(), "on": on, "count": count}  # fmt: skip
    reply = common.call(ctx, "inject-fault", **args)
    common.emit(reply, as_json, lambda r: f"armed {r['kind']} in {r['name']} (pid {r['pid']})")


COMMANDS = (crash_device, inject_fault)
