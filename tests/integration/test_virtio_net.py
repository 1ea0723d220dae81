"""virtio-net through `splitvmm up`, the monitor's side: the TAP it opens (made, or an
existing one used), the PCI function a guest enumerates, the counters `ctl devices` shows.

Each test makes its own network namespace and runs the monitor inside it (`ip netns exec`),
so the TAPs it makes or finds are the test's alone, and removes the namespace after. The
guest that exchanges frames (written from the virtio spec) is another branch's; these use
the PCI enumeration guest and the counter guest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.vmproc import REPO, VmProcess, env_for


def _netns_usable() -> str | None:
    """Why these tests cannot run here, or None."""
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun: this host has no TUN/TAP driver"
    if os.geteuid() != 0:
        return "making a network namespace and a TAP needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(_netns_usable() is not None, reason=str(_netns_usable())),
]


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, "ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"svnet-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        ip("netns", "del", name)


def link(ns: str, dev: str) -> dict[str, object] | None:
    """The link as `ip -j link show` says (None if there is none)."""
    shown = ip("-j", "link", "show", dev, ns=ns, check=False)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None


def net_config(tmp_path: Path, boot: str, tap: str, extra: str = "") -> Path:
    path = tmp_path / "vm.toml"
    device = f'[[device]]\nname = "net0"\nmodel = "virtio-net"\ntap = "{tap}"\n{extra}'
    path.write_text(vm_toml(boot, "64M", 1, tmp_path / "serial.log") + device)
    return path


def up_in(ns: str, tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "splitvmm", "up", str(config)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=REPO,
        env=env_for(tmp_path),
    )  # fmt: skip


def test_virtio_net_pci_guest_finds_function_and_monitor_made_tap_goes_away(
    guests, tmp_path, netns
):
    config = net_config(tmp_path, f'kernel = "{guests["pci"]}"', "svtap0")
    result = up_in(netns, tmp_path, config)

    serial = (tmp_path / "serial.log").read_text()
    assert result.returncode == 0, serial + result.stderr
    assert " 1af4:1041 class 020000 " in serial
    assert link(netns, "svtap0") is None  # made by the monitor, gone with its fd


def test_virtio_net_existing_tap_is_used_and_left_as_it_was(guests, tmp_path, netns):
    ip("tuntap", "add", "dev", "svtap1", "mode", "tap", "vnet_hdr", ns=netns)
    ip("link", "set", "svtap1", "up", "mtu", "1400", ns=netns)
    before = link(netns, "svtap1")
    config = net_config(tmp_path, f'kernel = "{guests["pci"]}"', "svtap1")
    result = up_in(netns, tmp_path, config)

    assert result.returncode == 0, result.stderr
    assert link(netns, "svtap1") == before


def test_virtio_net_tap_name_too_long_names_the_key(guests, tmp_path, netns):
    config = net_config(tmp_path, f'kernel = "{guests["pci"]}"', "a-name-longer-than-15")
    result = up_in(netns, tmp_path, config)

    assert result.returncode != 0
    assert "net0" in result.stderr and "tap" in result.stderr
    assert "Traceback" not in result.stderr


def test_virtio_net_ctl_devices_shows_each_devices_counters(guests, tmp_path, netns):
    config = net_config(tmp_path, f'kernel = "{guests["counter"]}"', "svtap2")
    serial = tmp_path / "serial.log"
    prefix = ["ip", "netns", "exec", netns, sys.executable, "-m", "splitvmm"]
    vm = VmProcess(tmp_path, ["up", str(config)], serial, argv=prefix)
    try:
        vm.wait_for(r"count=\d+")
        devices = {d["name"]: d for d in json.loads(vm.ctl("devices", "--json").stdout)["devices"]}
    finally:
        vm.proc.send_signal(signal.SIGTERM)
        vm.finish()

    net = devices["net0"]["counters"]
    assert {"rx_frames", "rx_bytes", "rx_dropped", "tx_frames", "tx_bytes", "tx_dropped"} <= set(
        net
    )
    assert {"notifications", "interrupts", "bad_access"} <= set(net)
    assert "bad_access" in devices["serial0"]["counters"]
    assert link(netns, "svtap2") is None
