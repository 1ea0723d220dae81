"""`splitvmm ctl status|pause|resume|devices|power-button`."""

from __future__ import annotations

import click

from splitvmm.cli.ctl import common

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _device_lines(devices: list[dict[str, object]]) -> str:
    lines = []
    for d in devices:
        reason = f" ({d['reason']})" if d.get("reason") else ""
        pid = "-" if d.get("pid") is None else d["pid"]  # none serves it: away, or failed
        line = f"  {d['name']:<12} {d['model']:<10} pid {pid:<8} {d['state']}{reason}"
        if d.get("tap"):
            line += f", TAP {d['tap']}"
        if d.get("stalled"):  # what the VM is paused for (README: on_full)
            line += f", stalled: {d['stalled']}"
        if d.get("crashes"):
            line += f", {d['restarts']} restart(s), last failure: {d['last_failure']}"
            if d.get("recover_ms") is not None:
                line += f", back in {d['recover_ms']} ms"
        lines.append(line)
    return "\n".join(lines)


def _status_text(r: dict[str, object]) -> str:
    return (
        f"{r['name']}: {r['state']}, {r['vcpus']} vCPU(s), {common.reply_int(r, 'memory') >> 20} "
        f"MiB, up {r['uptime_s']} s, monitor pid {r['pid']}\n"
        + _device_lines(common.reply_objects(r, "devices"))
    )


@click.command("status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The VM's state, size, uptime and devices (with --json, each device's counters)."""
    common.emit(common.query(ctx, "status", counters=as_json), as_json, _status_text)


@click.command("pause")
@json_option
@click.pass_context
def pause(ctx: click.Context, as_json: bool) -> None:
    """Stop every vCPU (devices keep their state)."""
    common.emit(common.call(ctx, "pause"), as_json, lambda r: "paused")


@click.command("resume")
@json_option
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Let a paused VM run again; a device that stalled for room on the host tries its
    requests again first (and pauses the VM again if there is still none)."""
    common.emit(common.call(ctx, "resume"), as_json, lambda r: "running")


@click.command("devices")
@json_option
@click.pass_context
def devices(ctx: click.Context, as_json: bool) -> None:
    """The VM's device processes (with --json, each one's counters: Device.stats())."""
    common.emit(
        common.query(ctx, "devices", counters=as_json),
        as_json,
        lambda r: _device_lines(common.reply_objects(r, "devices")),
    )


@click.command("power-button")
@json_option
@click.pass_context
def power_button(ctx: click.Context, as_json: bool) -> None:
    """Press the VM's ACPI power button, for its OS to shut down cleanly (QEMU's
    system_powerdown): the VM ends once the guest powers off. A kernel boot's VM has the
    button (the monitor's ACPI tables); a firmware's does not. A paused VM gets it when it
    runs again."""
    common.emit(common.call(ctx, "power-button"), as_json, lambda r: "power button pressed")


COMMANDS = (status, pause, resume, devices, power_button)
