"""`splitvmm ctl link NAME [up|down]`: a network device's link, as a cable plugged in or out."""

from __future__ import annotations

import click

from splitvmm.cli.ctl import common


def _text(r: dict[str, object]) -> str:
    if r["changed"]:
        return f"{r['name']}: link {r['link']}"
    return f"{r['name']}: link {r['link']} (unchanged)"


@click.command("link")
@click.argument("name")
@click.argument("state", required=False, type=click.Choice(["up", "down"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def link(ctx: click.Context, name: str, state: str | None, as_json: bool) -> None:
    """Take a network device's link down or up, or (no STATE) say how it is. While it is down
    the guest's driver sees no carrier (virtio-net's LINK_UP status bit, with a configuration
    interrupt), and every frame is dropped both ways. A crash restart and a snapshot keep it."""
    args: dict[str, object] = {"name": name} if state is None else {"name": name, "state": state}
    common.emit(common.call(ctx, "link", **args), as_json, _text)


COMMANDS = (link,)
