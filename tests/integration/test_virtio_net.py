"""virtio-net through `splitvmm up`, the monitor's side: the TAP it opens (made, or an
existing one used), the PCI function a guest enumerates, the counters `ctl devices` shows.

Each test makes its own network namespace and runs the monitor inside it (`ip netns exec`),
so the TAPs it makes or finds are the test's alone, and removes the namespace after. The
guest that exchanges frames (written from the virtio spec) is another branch's; these use
the PCI enumeration guest and the counter guest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


def test_virtio_net_ctl_devices_shows_each_devices_counters_and_its_taps_name(
    guests, tmp_path, netns
):
    """A TAP named by a pattern gets a name the kernel chooses: `ctl devices` says which."""
    config = net_config(tmp_path, f'kernel = "{guests["counter"]}"', "svtap%d")
    serial = tmp_path / "serial.log"
    prefix = ["ip", "netns", "exec", netns, sys.executable, "-m", "splitvmm"]
    vm = VmProcess(tmp_path, ["up", str(config)], serial, argv=prefix)
    try:
        vm.wait_for(r"count=\d+")
        devices = {d["name"]: d for d in json.loads(vm.ctl("devices", "--json").stdout)["devices"]}
        text = vm.ctl("devices").stdout
        tap = str(devices["net0"]["tap"])
        made = link(netns, tap)
    finally:
        vm.stop()

    assert re.fullmatch(r"svtap\d+", tap) and made is not None and made["ifname"] == tap
    assert f", TAP {tap}" in text and "tap" not in devices["serial0"]

    net = devices["net0"]["counters"]
    assert {"rx_frames", "rx_bytes", "rx_dropped", "tx_frames", "tx_bytes", "tx_dropped"} <= set(
        net
    )
    assert {"notifications", "interrupts", "bad_access"} <= set(net)
    assert "bad_access" in devices["serial0"]["counters"]
    assert link(netns, tap) is None


# -- the net guest (tests/guests/virtio_net.c, from the virtio spec) exchanging frames --------
HOST_IP, GUEST_IP, PORT = "10.99.0.1", "10.99.0.2", 7
SIZE = 1472


def tap_with_host_ip(ns: str, tap: str) -> None:
    """A TAP in the test's namespace, the host's end addressed: the namespace's own stack
    answers the guest's ARP and ICMP."""
    ip("link", "set", "lo", "up", ns=ns)
    ip("tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", ns=ns)
    ip("addr", "add", f"{HOST_IP}/24", "dev", tap, ns=ns)
    ip("link", "set", tap, "up", ns=ns)


def net_guest(
    tmp_path: Path, guests, ns: str, cmdline: str, tap: str = "svtap9", extra: str = ""
) -> VmProcess:
    tap_with_host_ip(ns, tap)
    boot = (
        f'kernel = "{guests["virtio-net"]}"\ncmdline = "ip={GUEST_IP} peer_ip={HOST_IP} {cmdline}"'
    )
    config = net_config(tmp_path, boot, tap, extra)
    prefix = ["ip", "netns", "exec", ns, sys.executable, "-m", "splitvmm"]
    return VmProcess(tmp_path, ["up", str(config)], tmp_path / "serial.log", argv=prefix)


def suspended_and_restored(vm: VmProcess, tmp_path: Path, ns: str) -> VmProcess:
    """`ctl suspend` of the net guest's VM, then `splitvmm restore` of it on the same TAP, its
    serial output in serial2.log."""
    result = vm.ctl("suspend", str(tmp_path / "snap"))
    assert result.returncode == 0, result.stderr
    vm.finish()
    prefix = ["ip", "netns", "exec", ns, sys.executable, "-m", "splitvmm"]
    serial2 = tmp_path / "serial2.log"
    return VmProcess(
        tmp_path,
        ["restore", str(tmp_path / "snap"), "--set", "net0.tap=svtap9",
         "--set", f"serial0.output={serial2}"],
        serial2, argv=prefix,
    )  # fmt: skip


def payload(seq: int, size: int = SIZE) -> bytes:
    """The guest's datagram pattern (tests/guests/README.md)."""
    return seq.to_bytes(8, "little") + bytes((seq + j) & 0xFF for j in range(8, size))


def host_socket(ns: str, script: str, timeout: float = 60) -> subprocess.Popen[str]:
    """A Python host side inside the namespace (the test process stays outside it)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize("options", ["", "mrg_rxbuf=1 rxbuf=100 txsplit=1 strict=1"])
def test_virtio_net_guest_pings_the_host_through_the_tap(guests, tmp_path, netns, options):
    vm = net_guest(tmp_path, guests, netns, f"mode=ping count=8 size=1000 {options}")
    status, err = vm.finish(timeout=120)
    assert status == 33, vm.text()[-2000:] + err
    assert vm.text().count("rtt_us=") == 8


def test_virtio_net_guest_echoes_udp_from_the_host_both_ways(guests, tmp_path, netns):
    vm = net_guest(tmp_path, guests, netns, f"mode=udp-echo port={PORT} count=100")
    vm.wait_for("udp-echo ready")
    script = f"""
import socket, sys
sys.path.insert(0, {str(REPO)!r})
from tests.integration.test_virtio_net import payload
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
ok = 0
for i in range(100):
    p = payload(i, 8 + (i * 97) % 1465)
    s.sendto(p, ({GUEST_IP!r}, {PORT}))
    got, _ = s.recvfrom(2048)
    ok += got == p
print(ok)
"""
    host = host_socket(netns, script)
    out, err = host.communicate(timeout=120)
    status, vm_err = vm.finish(timeout=60)
    assert out.strip() == "100", out + err
    assert status == 33, vm.text()[-2000:] + vm_err


def test_virtio_net_burst_larger_than_the_receive_ring_waits_in_the_tap(guests, tmp_path, netns):
    """900 datagrams while the guest takes nothing from its 128-entry ring for 500 ms: the
    device stops reading the TAP (back-pressure) and every datagram arrives, in order."""
    vm = net_guest(tmp_path, guests, netns, f"mode=sink port={PORT} count=900 hold_ms=500")
    vm.wait_for("sink ready")
    script = f"""
import socket, sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.integration.test_virtio_net import payload
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(payload(0), ({GUEST_IP!r}, {PORT}))  # the first: the guest's hold starts
# Until the guest answers ARP, the host queues datagrams for it in the neighbour entry,
# unres_qlen_bytes (208 KiB) at most: ~92 of these, and the rest of a burst of 100 was
# dropped there (missing=8) whenever the answer came late. The guest's MAC known first.
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with open("/proc/net/arp") as arp:
        if any(f.split()[:3:2] == [{GUEST_IP!r}, "0x2"] for f in arp.readlines()[1:]):
            break
    time.sleep(0.005)
for i in range(1, 900):
    s.sendto(payload(i), ({GUEST_IP!r}, {PORT}))
    if i % 100 == 99:
        time.sleep(0.01)  # within the TAP's queue (500 frames): the device must hold back
"""
    host = host_socket(netns, script)
    host.communicate(timeout=60)
    # Where a lost datagram went, should one be: the TAP's drops, and the device's own.
    tap = ip("-s", "-j", "link", "show", "svtap9", ns=netns, check=False).stdout
    devices = vm.ctl("devices", "--json").stdout
    status, err = vm.finish(timeout=120)
    text = vm.text()
    assert status == 33, text[-2000:] + err
    sink = text[text.find("sink received=") :].split("\n", 1)[0]
    why = f"{sink}\nTAP: {tap}\ndevices: {devices}"
    assert "received=900 of 900" in sink and "missing=0" in sink and "bad=0" in sink, why


def test_virtio_net_guest_burst_reaches_the_host(guests, tmp_path, netns):
    script = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
s.bind(({HOST_IP!r}, {PORT})); s.settimeout(5)
print("bound", flush=True)
n = 0
try:
    while n < 2000:
        s.recv(2048); n += 1
except TimeoutError:
    pass
print(n)
"""
    tap_with_host_ip(netns, "svtap9")
    host = host_socket(netns, script)
    assert host.stdout is not None and host.stdout.readline().strip() == "bound"
    boot = (
        f'kernel = "{guests["virtio-net"]}"\ncmdline = "ip={GUEST_IP} peer_ip={HOST_IP} '
        f'mode=burst count=2000 size={SIZE} port={PORT} batch=8"'
    )
    config = net_config(tmp_path, boot, "svtap9")
    result = up_in(netns, tmp_path, config)
    out, _ = host.communicate(timeout=60)
    serial = (tmp_path / "serial.log").read_text()
    assert result.returncode == 33, serial[-2000:] + result.stderr
    assert "burst sent=2000" in serial
    assert int(out.strip()) >= 1900, out  # UDP: a slow Python receiver may drop a few


def test_virtio_net_guest_suspended_mid_ping_restores_and_every_ping_is_answered(
    guests, tmp_path, netns
):
    """ctl suspend while the guest pings the host, then a restore on the same TAP: frames
    keep flowing and every echo request gets its reply (the guest fails on a missing one)."""
    vm = net_guest(tmp_path, guests, netns, "mode=ping count=400 size=200")
    vm.wait_for(r"rtt_us=")
    restored = suspended_and_restored(vm, tmp_path, netns)
    status, err = restored.finish(timeout=120)
    assert status == 33, restored.text()[-2000:] + err
    # one stream: a line the guest was printing at the suspend goes on in the second file
    replies = (vm.text() + restored.text()).count("rtt_us=")
    assert replies >= 400, replies  # the one in flight at the suspend may show twice


def test_virtio_net_killed_under_traffic_restarts_and_frames_keep_flowing(guests, tmp_path, netns):
    """on_crash = restart: the net process SIGKILLed 5 times while the host has the guest
    echo UDP datagrams. A datagram the dead process had taken from the TAP is gone (UDP: the
    host sends it again); every one of 150 comes back, and the guest ends well."""
    tap_with_host_ip(netns, "svtap9")
    boot = (
        f'kernel = "{guests["virtio-net"]}"\ncmdline = "ip={GUEST_IP} peer_ip={HOST_IP} '
        f'mode=udp-echo port={PORT} count=100000 wait_s=30"'
    )
    config = net_config(tmp_path, boot, "svtap9", 'on_crash = "restart"\nmax_restarts = 20\n')
    prefix = ["ip", "netns", "exec", netns, sys.executable, "-m", "splitvmm"]
    vm = VmProcess(tmp_path, ["up", str(config)], tmp_path / "serial.log", argv=prefix)
    vm.wait_for("udp-echo ready")
    script = f"""
import socket, sys
sys.path.insert(0, {str(REPO)!r})
from tests.integration.test_virtio_net import payload
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
echoed = 0
for i in range(150):
    p = payload(i, 8 + (i * 97) % 1465)
    for _ in range(40):  # 20 s for each: a restart takes well under that
        s.sendto(p, ({GUEST_IP!r}, {PORT}))
        try:
            while s.recv(2048) != p:
                pass  # an echo of an earlier try
            echoed += 1
            break
        except TimeoutError:
            continue
    print(i, flush=True)
print("echoed", echoed, flush=True)
"""
    host = host_socket(netns, script)
    assert host.stdout is not None
    kills = 0
    for line in host.stdout:
        if line.startswith("echoed"):
            break
        if int(line) in (20, 45, 70, 95, 120):  # while traffic flows
            # frames flow as soon as a new process has its state, before the monitor has
            # its READY: wait for that, or the kill finds the device still away
            vm.wait_running("net0", generation=kills + 1)
            result = vm.ctl("crash-device", "net0")
            assert result.returncode == 0, result.stderr
            kills += 1
    host.wait(timeout=30)
    net = vm.wait_running("net0", generation=6)  # the last kill may land after the last echo
    vm.stop(timeout=30)
    assert line.strip() == "echoed 150", line
    assert (kills, net["restarts"], net["state"]) == (5, 5, "running"), net


def test_virtio_net_ctl_link_down_and_up_through_a_crash_restart_and_a_snapshot(
    guests, tmp_path, netns
):
    """`ctl link net0 down`, then `up` (QEMU's set_link): the guest's driver, from the spec,
    sees VIRTIO_NET_S_LINK_UP clear and set, each with its configuration interrupt; while it
    is down an ARP request's buffer comes back and no reply does, once up a ping works. The
    link stays down through a crash restart and through a suspend and restore."""
    vm = net_guest(
        tmp_path, guests, netns, "mode=link count=2 wait_s=90", extra='on_crash = "restart"\n'
    )
    vm.wait_for("link ready, up")
    refused = vm.ctl("link", "serial0", "down")
    assert refused.returncode == 1 and "serial0 (model serial) has no link" in refused.stderr
    assert "no device named 'nic'" in vm.ctl("link", "nic", "down").stderr

    down = vm.ctl("link", "net0", "down")
    assert (down.returncode, down.stdout) == (0, "net0: link down\n"), down.stderr
    vm.wait_for("link down: the ARP request's buffer came back, no reply")
    assert vm.counters("net0")["tx_dropped"] >= 1  # type: ignore[operator]

    assert vm.ctl("crash-device", "net0").returncode == 0
    vm.wait_running("net0", generation=2)
    after_crash = vm.ctl("link", "net0", "--json")
    assert json.loads(after_crash.stdout) == {"name": "net0", "link": "down", "changed": False}

    restored = suspended_and_restored(vm, tmp_path, netns)
    try:
        deadline = time.monotonic() + 30
        while (told := restored.ctl("link", "net0")).returncode != 0:
            assert time.monotonic() < deadline, told.stderr
            time.sleep(0.1)
        assert told.stdout == "net0: link down (unchanged)\n"
        assert restored.ctl("link", "net0", "up").stdout == "net0: link up\n"
        status, err = restored.finish(timeout=60)
    finally:
        restored.kill_if_running()
    text = vm.text() + restored.text()
    assert status == 33, text[-2000:] + err
    # once each, the configuration change's ISR bit with it (the guest checks it)
    assert len(re.findall(r"link down \(status 0x0 isr 0x[23]\)", text)) == 1, text[-2000:]
    assert len(re.findall(r"link up \(status 0x1 isr 0x[23]\)", text)) == 1, text[-2000:]
    assert "ping sent=1 received=1 lost=0 bad=0" in text
