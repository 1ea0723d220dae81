"""A sandboxed virtio-net device on a real TAP: the one ioctl its policy allows
(TUNSETOFFLOAD, at FEATURES_OK and at reset) goes through; the policy audit, with a
socketpair standing in for the TAP, never reaches it."""

from __future__ import annotations

import os
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
    fd, _ = tun.open_tap(f"svt{uuid.uuid4().hex[:8]}")
    yield fd
    os.close(fd)


def test_virtio_net_sandboxed_sets_guest_offloads_on_tap_and_survives(spawn, tap):
    dev = spawn(model="virtio-net", extra_fds={"tap": tap})
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
