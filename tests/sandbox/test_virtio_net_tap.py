"""A sandboxed virtio-net device on a real TAP: the one ioctl its policy allows
(TUNSETOFFLOAD, at FEATURES_OK and at reset) goes through; the policy audit, with a
socketpair standing in for the TAP, never reaches it."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import uuid
from collections.abc import Iterator

import pytest

from splitvmm.native import tun

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(
        not os.path.exists(tun.TUN_PATH) or os.geteuid() != 0,
        reason="a TAP needs /dev/net/tun and CAP_NET_ADMIN (root)",
    ),
]

COMMON = 0x1000  # BAR 0's common configuration in the flat window
STATUS, DFSELECT, DF, GFSELECT, GF = COMMON + 0x14, COMMON, COMMON + 4, COMMON + 8, COMMON + 12
F_GUEST_CSUM, F_GUEST_TSO4, F_VERSION_1_HI = 1 << 1, 1 << 7, 1


@pytest.fixture
def tap() -> Iterator[int]:
    """A TAP of its own (made now, gone when its fd closes)."""
    fd, _, takes_offloads = tun.open_tap(f"svt{uuid.uuid4().hex[:8]}")
    assert takes_offloads  # a TAP of this kernel's
    yield fd
    os.close(fd)


def test_virtio_net_sandboxed_sets_guest_offloads_on_tap_and_survives(spawn, tap):
    dev = spawn(model="virtio-net", extra_fds={"tap": tap}, transport={"tap_offloads": True})
    dev.wait_ready()
    for status in (0, 1, 3):  # reset, ACKNOWLEDGE, DRIVER
        dev.write(STATUS, bytes([status]))
    dev.write(DFSELECT, (0).to_bytes(4, "little"))
    offered = int.from_bytes(dev.read(DF, 4), "little")
    dev.write(GFSELECT, (0).to_bytes(4, "little"))
    dev.write(GF, (F_GUEST_CSUM | F_GUEST_TSO4).to_bytes(4, "little"))
    dev.write(GFSELECT, (1).to_bytes(4, "little"))
    dev.write(GF, F_VERSION_1_HI.to_bytes(4, "little"))
    dev.write(STATUS, bytes([0x0B]))  # FEATURES_OK: TUNSETOFFLOAD(CSUM | TSO4)
    accepted = dev.read(STATUS, 1)[0]
    dev.write(STATUS, bytes([0]))  # reset: TUNSETOFFLOAD(0)

    assert offered & (F_GUEST_CSUM | F_GUEST_TSO4) == F_GUEST_CSUM | F_GUEST_TSO4
    assert accepted == 0x0B
    assert dev.read(STATUS, 1) == b"\x00", dev.stderr()  # alive: no SIGSYS


SIOCETHTOOL, ETHTOOL_GTSO = 0x8946, 0x1E


def tso_on(name: str) -> bool:
    """The TAP's TCP segmentation offload, as `ethtool -k` reads it."""
    request = array.array("I", [ETHTOOL_GTSO, 0])
    ifreq = struct.pack("16sP", name.encode(), request.buffer_info()[0])
    with socket.socket() as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
    return bool(request[1])


def test_open_tap_tries_the_offloads_and_leaves_them_off():
    fd, name, takes_offloads = tun.open_tap(f"svt{uuid.uuid4().hex[:8]}")
    try:
        assert (takes_offloads, tso_on(name)) == (True, False)
    finally:
        os.close(fd)


def test_a_warm_spares_setup_leaves_the_live_devices_offloads_on_the_tap():
    from splitvmm.devprocs.virtio_net import VirtioNet
    from tests.unit.test_virtio_net import F_GUEST_CSUM as CSUM
    from tests.unit.test_virtio_net import F_GUEST_TSO4 as TSO4
    from tests.unit.test_virtio_net import F_VERSION_1, started
    from tests.virtio.support import close_fds, host_fds, prepared

    tap, name, _ = tun.open_tap(f"svt{uuid.uuid4().hex[:8]}")
    live_fds, spare_fds = host_fds("virtio-net"), host_fds("virtio-net")
    for fds in (live_fds, spare_fds):
        os.close(fds["tap"])
        fds["tap"] = os.dup(tap)
    try:
        ctx = prepared("virtio-net", live_fds)
        ctx.transport = {**ctx.transport, "tap_offloads": True}
        started(VirtioNet.from_options(ctx, {}), F_VERSION_1 | CSUM | TSO4)
        negotiated = tso_on(name)
        prepared("virtio-net", spare_fds)  # what a spare runs while the live one serves
        after = tso_on(name)
    finally:
        close_fds(live_fds)
        close_fds(spare_fds)
        os.close(tap)
    assert (negotiated, after) == (True, True)
