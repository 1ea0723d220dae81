"""virtio-net (devprocs/virtio_net.py) with a socketpair standing in for the TAP (one frame
per message, as a TAP reads and writes them), driven through the PCI transport and split
rings laid out as a driver does (virtio 1.2 5.1)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitvmm.config import parse_config
from splitvmm.devprocs import virtio_net
from splitvmm.devprocs.virtio.pci import ISR_QUEUE
from splitvmm.devprocs.virtio.queue import SplitQueue
from splitvmm.devprocs.virtio_net import VirtioNet
from splitvmm.errors import ConfigError, StateError
from splitvmm.native import tun
from splitvmm.protocol.models import default_mac
from tests.virtio.support import (
    ACK,
    DEVICE_CFG,
    DRIVER,
    DRIVER_OK,
    F_EVENT_IDX,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    NEEDS_RESET,
    Driver,
    Ring,
    close_fds,
    host_fds,
    prepared,
    serve_ready,
)

F_CSUM, F_GUEST_CSUM, F_MAC, F_GUEST_TSO4 = 1 << 0, 1 << 1, 1 << 5, 1 << 7
F_GUEST_ECN, F_HOST_TSO4, F_HOST_ECN = 1 << 9, 1 << 11, 1 << 13
F_MRG_RXBUF, F_STATUS = 1 << 15, 1 << 16
OFFLOAD_BITS = 0b11_1011_1000_0011  # CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, HOST_TSO4/6/ECN
HDR = bytes(12)  # struct virtio_net_hdr, VERSION_1: no offload
FRAME = bytes.fromhex("ffffffffffff5254000000010800") + bytes(range(100))  # 114 bytes
MAC = "52:54:00:12:34:56"
GOLDENS = Path(__file__).resolve().parents[1] / "conformance" / "goldens"


@pytest.fixture
def peers() -> dict[str, int]:
    return {}


@pytest.fixture
def fds(peers: dict[str, int]) -> Iterator[dict[str, int]]:
    fds = host_fds("virtio-net", peers=peers)
    yield fds
    close_fds(fds)
    close_fds(peers)


@pytest.fixture
def peer(peers: dict[str, int], fds: dict[str, int]) -> int:
    """The host's end of the TAP stand-in: what it reads the device sent, and vice versa."""
    return peers["tap"]


@pytest.fixture
def net(fds: dict[str, int]) -> VirtioNet:
    return VirtioNet.from_options(prepared("virtio-net", fds), {"mac": MAC})


def started(
    dev: VirtioNet, features: int = F_VERSION_1, rx_size: int = 16
) -> tuple[Driver, Ring, Ring]:
    """The driver's initialisation (3.1.1) with receiveq0 (of `rx_size` entries) and
    transmitq0 set up."""
    driver = Driver(dev)
    rx, tx = Ring(dev.ram, size=rx_size, base=0x1000), Ring(dev.ram, base=0x4000)
    tx.heap = 0x80000  # the transmit ring's buffers apart from the receive ring's
    assert driver.negotiate(features) & FEATURES_OK
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return driver, rx, tx


def watched(dev: VirtioNet) -> bool:
    return any(s.fd == dev.tap for s in dev.event_sources())


def tap_readable(dev: VirtioNet) -> None:
    """What the event loop does when the TAP polls readable (the device watches it)."""
    (source,) = [s for s in dev.event_sources() if s.fd == dev.tap]
    source.on_readable()


def post(rx: Ring, *sizes: int) -> list[int]:
    """A receive chain of one buffer per size; the buffers' addresses."""
    gpas = []
    for size in sizes:
        gpa, _ = rx.buffer(size)
        rx.add([(gpa, size, True)])
        gpas.append(gpa)
    return gpas


def pending_in_tap(fds: dict[str, int]) -> int:
    """Bytes of the next frame waiting in the device's end (left there, not read)."""
    with socket.socket(fileno=os.dup(fds["tap"])) as s:
        try:
            return len(s.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0


# -- configuration and features ------------------------------------------------------------------
def test_virtio_net_config_reports_mac_and_link_up(net):
    assert net.read(DEVICE_CFG, 4) + net.read(DEVICE_CFG + 4, 2) == bytes.fromhex("525400123456")
    assert net.read(DEVICE_CFG + 6, 2) == b"\x01\x00"  # VIRTIO_NET_S_LINK_UP


def test_virtio_net_features_without_tap_offloads_offer_mac_status_mrg_rxbuf(net):
    features = Driver(net).device_features()

    assert features & (F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF) == (
        F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF
    )
    assert features & OFFLOAD_BITS == 0


def test_virtio_net_offload_feature_not_offered_refused_at_features_ok(net):
    assert not Driver(net).negotiate(F_VERSION_1 | F_GUEST_CSUM) & FEATURES_OK


def test_virtio_net_offloads_a_driver_wrote_but_never_got_restore(net, fds):
    """driver_features holds whatever a driver wrote until the device accepts it: offloads
    this TAP lacks, written and refused at FEATURES_OK, bind nothing, and the device's state
    restores (a guest must not make its own snapshot, or its device's crash restart, fail)."""
    assert not Driver(net).negotiate(F_VERSION_1 | F_GUEST_CSUM) & FEATURES_OK

    restored = VirtioNet.restore(prepared("virtio-net", fds), net.save())

    assert restored.save() == net.save()


def test_virtio_net_guest_offloads_set_on_tap_at_features_ok_and_cleared_at_reset(fds, monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(tun, "set_offload", lambda fd, flags: calls.append((fd, flags)))
    ctx = prepared("virtio-net", fds)
    ctx.transport = {**ctx.transport, "tap_offloads": True}  # the monitor's TAP took them
    dev = VirtioNet.from_options(ctx, {})
    driver = Driver(dev)

    assert driver.device_features() & OFFLOAD_BITS == OFFLOAD_BITS
    assert driver.negotiate(F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4) & FEATURES_OK
    driver.set_status(0)
    # the driver's first reset sets them off: what the TAP has is not known till then (a
    # restarted process's TAP has what the dead one set)
    assert calls == [
        (fds["tap"], 0),
        (fds["tap"], tun.TUN_F_CSUM | tun.TUN_F_TSO4),
        (fds["tap"], 0),
    ]


def test_virtio_net_default_mac_is_stable_locally_administered_unicast():
    mac = bytes.fromhex(default_mac("web1", "net0").replace(":", ""))

    assert default_mac("web1", "net0") == default_mac("web1", "net0")
    assert default_mac("web1", "net0") != default_mac("web1", "net1")
    assert default_mac("web1", "net0") != default_mac("web2", "net0")
    assert (mac[0] & 0b10, mac[0] & 0b01) == (0b10, 0)  # locally administered, unicast


def test_virtio_net_bare_mac_is_the_default_mac_of_no_vm():
    assert virtio_net.BARE_MAC == default_mac("", "virtio-net")


def test_virtio_net_config_derives_mac_from_vm_and_device_names(tmp_path: Path):
    data = {
        "vm": {"name": "web1"},
        "boot": {"firmware": "fw.bin"},
        "device": [{"name": "net0", "model": "virtio-net", "tap": "tap0"}],
    }
    cfg = parse_config(data, tmp_path, check_files=False)

    (dev,) = [d for d in cfg.devices if d.name == "net0"]
    assert dev.options == {"tap": "tap0", "mac": default_mac("web1", "net0")}


@pytest.mark.parametrize(
    "mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34", "52-54-00-12-34-56"]
)
def test_virtio_net_bad_mac_option_rejected_naming_it(fds, mac):
    with pytest.raises(ConfigError, match="virtio-net: mac"):
        VirtioNet.from_options(prepared("virtio-net", fds), {"mac": mac})


# -- transmit -------------------------------------------------------------------------------------
def test_virtio_net_tx_chain_goes_to_tap_as_header_and_frame(net, peer):
    driver, _, tx = started(net)
    tx.add([(*tx.buffer(HDR), False), (*tx.buffer(FRAME), False)])
    driver.kick(1)

    assert os.read(peer, 1 << 16) == HDR + FRAME
    assert tx.take_used() == [(0, 0)]
    assert (net.counts["tx_frames"], net.counts["tx_bytes"]) == (1, len(FRAME))


@pytest.mark.parametrize("hdr_len", [5, 200, 0xFFFF])
def test_virtio_net_tx_header_goes_to_tap_with_hdr_len_0_whatever_the_driver_gave(
    net, peer, hdr_len
):
    """5.1.6.2.2: the device MUST NOT rely on hdr_len. tun refuses a frame whose hdr_len is
    past its end or below an Ethernet header: such frames, which the spec allows, were
    dropped. The header and frame split across descriptors mid-header, as 2.6.4 allows."""
    driver, _, tx = started(net)
    header = struct.pack("<BBHHHHH", 0, 0, hdr_len, 0, 0, 0, 0)
    packet = header + FRAME
    tx.add([(*tx.buffer(packet[:5]), False), (*tx.buffer(packet[5:]), False)])
    driver.kick(1)

    assert os.read(peer, 1 << 16) == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0) + FRAME
    assert (net.counts["tx_frames"], net.counts["tx_dropped"]) == (1, 0)


@pytest.mark.parametrize(
    ("size", "sent"), [(virtio_net.TX_MAX_FRAME, True), (virtio_net.TX_MAX_FRAME + 1, False)]
)
def test_virtio_net_tx_frame_longer_than_any_driver_builds_is_dropped(net, peer, size, sent):
    """A frame past 64 KiB + an Ethernet header + a VLAN tag never reaches the host's
    stack (tun takes ~8 MB): nothing the spec allows needs it (Firecracker's bound too)."""
    driver, _, tx = started(net)
    frame = bytes(size)
    tx.add([(*tx.buffer(HDR + frame), False)])
    driver.kick(1)

    assert tx.take_used() == [(0, 0)]
    assert (net.counts["tx_frames"], net.counts["tx_dropped"]) == (int(sent), int(not sent))
    if sent:
        assert len(os.read(peer, 1 << 17)) == 12 + size


@pytest.mark.parametrize(
    "features",
    [
        F_GUEST_TSO4,  # without GUEST_CSUM
        F_GUEST_CSUM | F_GUEST_ECN,  # ECN without a TSO (tun: EINVAL)
        F_HOST_TSO4,  # without CSUM
        F_CSUM | F_HOST_ECN,  # HOST_ECN without a HOST_TSO
    ],
    ids=["guest-tso4", "guest-ecn", "host-tso4", "host-ecn"],
)
def test_virtio_net_features_taking_one_without_what_it_requires_are_refused(offloading, features):
    """5.1.3.1: the driver MUST NOT accept a feature without the ones it requires; the
    device refuses such a set at FEATURES_OK (2.2.1), as it may, rather than set offloads
    the TAP refuses."""
    assert not Driver(offloading).negotiate(F_VERSION_1 | features) & FEATURES_OK
    assert Driver(offloading).negotiate(F_VERSION_1 | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4
                                        | F_GUEST_ECN | F_HOST_TSO4 | F_HOST_ECN) & FEATURES_OK  # fmt: skip


def test_virtio_net_restore_refuses_accepted_features_it_does_not_offer(net, fds):
    """Accepted features bind the restored device: one this device never offers (a damaged
    or crafted state) is refused, naming them, before it could change what the device does."""
    from splitvmm.record import replace

    started(net)
    net.quiesce()
    state = net.save()
    hostile = replace(state, driver_features=state.driver_features | 1 << 22)

    with pytest.raises(StateError, match="the driver took features 0x400000, which this"):
        VirtioNet.restore(prepared("virtio-net", fds), hostile)


def test_virtio_net_tx_header_asking_unnegotiated_checksum_dropped_and_counted(net, peer):
    driver, _, tx = started(net)
    needs_csum = struct.pack("<BBHHHHH", 1, 0, 0, 0, 14, 16, 0)
    tx.add([(*tx.buffer(needs_csum + FRAME), False)])
    driver.kick(1)

    with pytest.raises(BlockingIOError):
        os.read(peer, 1 << 16)
    assert tx.take_used() == [(0, 0)]
    assert net.counts["tx_dropped"] == 1


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOBUFS, errno.EAGAIN], ids=errno.errorcode.get)
def test_virtio_net_tx_tap_write_failure_drops_the_frame_and_serves_the_next(
    net, peer, monkeypatch, err
):
    """A TAP that fails a write (EIO: its interface is down; ENOBUFS, EAGAIN: the host has
    no room) loses that frame, as a NIC's full or dead link does: the chain is used (len 0)
    and counted, the queue goes on and the device stays out of NEEDS_RESET. Holding the chain
    for a retry would wedge the guest's transmit on a TAP that may stay down."""
    driver, _, tx = started(net)
    real_writev, failures = os.writev, [OSError(err, os.strerror(err))]

    def writev(fd: int, buffers: list) -> int:
        if fd == net.tap and failures:
            raise failures.pop()
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    tx.add([(*tx.buffer(HDR + FRAME), False)])
    tx.add([(*tx.buffer(HDR + FRAME[:60]), False)])
    driver.kick(1)

    assert tx.take_used() == [(0, 0), (1, 0)] and not driver.status() & NEEDS_RESET
    assert os.read(peer, 1 << 16) == HDR + FRAME[:60]
    assert (net.counts["tx_frames"], net.counts["tx_dropped"]) == (1, 1)


# -- receive --------------------------------------------------------------------------------------
def test_virtio_net_rx_frame_lands_in_posted_buffer_with_num_buffers_one(net, peer):
    driver, rx, _ = started(net)
    (gpa,) = post(rx, 1526)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    tap_readable(net)

    assert rx.take_used() == [(0, 12 + len(FRAME))]
    assert net.ram.read(gpa + 10, 2) == b"\x01\x00"  # num_buffers
    assert net.ram.read(gpa + 12, len(FRAME)) == FRAME
    assert (net.counts["rx_frames"], net.counts["rx_bytes"]) == (1, len(FRAME))


def test_virtio_net_rx_frames_before_a_broken_chain_are_notified(net, peer):
    """2.7.7.2: used entries written, the device MUST notify (flags 0). Two frames went into
    two chains, the third chain was outside guest RAM: NEEDS_RESET, with no used buffer
    notification for the two (a driver that ignores NEEDS_RESET, as Linux does, waits)."""
    driver, rx, _ = started(net)
    post(rx, 2048, 2048)
    rx.add([(0xFFFF_0000_0000, 2048, True)])
    driver.kick(0)
    for _ in range(3):
        os.write(peer, HDR + FRAME)
    tap_readable(net)

    assert (rx.used_idx(), driver.status() & NEEDS_RESET, net.isr & ISR_QUEUE) == (
        2,
        NEEDS_RESET,
        ISR_QUEUE,
    )


@pytest.fixture
def offloading(fds: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> VirtioNet:
    """A device whose TAP took the offloads at setup() (the stand-in cannot: its offloads
    are not set)."""
    monkeypatch.setattr(tun, "set_offload", lambda fd, flags: None)
    ctx = prepared("virtio-net", fds)
    ctx.transport = {**ctx.transport, "tap_offloads": True}
    return VirtioNet.from_options(ctx, {})


def test_virtio_net_restore_refuses_offloads_the_driver_took_on_a_tap_without(offloading, fds):
    """Offloads the device accepted (FEATURES_OK) bind it: a TAP that lacks them (the
    snapshot restored on a host whose kernel refused them) cannot carry the guest's frames."""
    assert Driver(offloading).negotiate(F_VERSION_1 | F_GUEST_CSUM) & FEATURES_OK

    with pytest.raises(StateError, match="the driver took offloads this TAP lacks"):
        VirtioNet.restore(prepared("virtio-net", fds), offloading.save())


@pytest.mark.parametrize(
    ("flags", "gso_type", "features"),
    [
        (1, 0, F_VERSION_1),  # a partial checksum, GUEST_CSUM not taken
        (1, 1, F_VERSION_1 | F_GUEST_CSUM),  # a TSO4 segment, GUEST_TSO4 not taken
        (1, 0x81, F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4),  # ECN, GUEST_ECN not taken
        (1, 3, F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4),  # UDP (UFO), never offered
    ],
    ids=["csum", "tso4", "ecn", "ufo"],
)
def test_virtio_net_rx_frame_asking_an_offload_not_negotiated_is_dropped(
    offloading, peer, flags, gso_type, features
):
    """5.1.6.4.1: no GSO type without its GUEST_ feature, and without GUEST_CSUM a fully
    checksummed packet. A frame the TAP queued under an earlier negotiation (before a reset)
    went through with its flags zeroed and its GSO fields as they were."""
    driver, rx, _ = started(offloading, features | F_CSUM)
    post(rx, 1526)
    driver.kick(0)
    os.write(peer, struct.pack("<BBHHHHH", flags, gso_type, 54, 1448, 34, 16, 0) + FRAME)
    tap_readable(offloading)

    assert (rx.take_used(), offloading.counts["rx_dropped"]) == ([], 1)


@pytest.mark.parametrize("flags", [0, 2], ids=["no-flags", "data-valid"])
def test_virtio_net_rx_gso_frame_without_needs_csum_is_dropped(offloading, peer, flags):
    """5.1.6.4.1: a gso_type other than NONE MUST come with NEEDS_CSUM. tun hands a GSO skb
    whose checksum is not partial as gso_type with DATA_VALID or no flag (virtio_net_hdr_from
    _skb): a NIC's hardware LRO frame (CHECKSUM_UNNECESSARY) that tc redirects to the TAP."""
    driver, rx, _ = started(offloading, F_VERSION_1 | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4)
    post(rx, 1526)
    driver.kick(0)
    os.write(peer, struct.pack("<BBHHHHH", flags, 1, 54, 1448, 0, 0, 0) + FRAME)
    tap_readable(offloading)

    assert (rx.take_used(), offloading.counts["rx_dropped"]) == ([], 1)


def test_virtio_net_tx_gso_frame_without_needs_csum_dropped_and_counted(offloading, peer):
    """5.1.6.2.1: a driver MUST set NEEDS_CSUM with a gso_type; the TAP never gets one
    without (the rule the receive side keeps, one check for both)."""
    driver, _, tx = started(offloading, F_VERSION_1 | F_CSUM | F_HOST_TSO4)
    tx.add([(*tx.buffer(struct.pack("<BBHHHHH", 0, 1, 54, 1448, 0, 0, 0) + FRAME), False)])
    driver.kick(1)

    with pytest.raises(BlockingIOError):
        os.read(peer, 1 << 16)
    assert (tx.take_used(), offloading.counts["tx_dropped"]) == ([(0, 0)], 1)


def test_virtio_net_rx_frame_with_negotiated_offloads_keeps_its_header(offloading, peer):
    driver, rx, _ = started(offloading, F_VERSION_1 | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4)
    (gpa,) = post(rx, 1526)
    driver.kick(0)
    header = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)
    os.write(peer, header + FRAME)
    tap_readable(offloading)

    assert rx.take_used() == [(0, 12 + len(FRAME))]
    assert offloading.ram.read(gpa, 10) == header[:10]


def test_virtio_net_rx_mrg_rxbuf_frame_spans_two_buffers(net, peer):
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    first, second = post(rx, 100, 100)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    tap_readable(net)

    assert rx.take_used() == [(0, 100), (1, 12 + len(FRAME) - 100)]
    assert net.ram.read(first + 10, 2) == b"\x02\x00"  # num_buffers
    assert net.ram.read(first + 12, 88) + net.ram.read(second, 26) == FRAME


def test_virtio_net_rx_mrg_rxbuf_frame_buffers_are_used_together(net, peer, monkeypatch):
    """5.1.6.4.1: a frame's buffers are returned together (one move of used idx), so a
    driver never sees num_buffers 2 with one of them used."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 100, 100)
    driver.kick(0)

    def one_at_a_time(*args: object) -> None:
        raise AssertionError("a buffer of a merged frame was used on its own")

    monkeypatch.setattr(SplitQueue, "push", one_at_a_time)
    os.write(peer, HDR + FRAME)
    tap_readable(net)

    assert rx.take_used() == [(0, 100), (1, 12 + len(FRAME) - 100)]


@pytest.mark.parametrize("guest_csum", [False, True], ids=["plain", "guest-csum"])
def test_virtio_net_rx_header_flags_are_zero_unless_guest_csum(fds, peer, monkeypatch, guest_csum):
    """5.1.6.4.1: without VIRTIO_NET_F_GUEST_CSUM the device MUST set flags to 0; the TAP
    marks frames the host validated DATA_VALID (2) whatever was negotiated."""
    monkeypatch.setattr(tun, "set_offload", lambda fd, flags: None)
    ctx = prepared("virtio-net", fds)
    ctx.transport = {**ctx.transport, "tap_offloads": True}  # the monitor's TAP took them
    dev = VirtioNet.from_options(ctx, {})
    driver, rx, _ = started(dev, F_VERSION_1 | (F_CSUM | F_GUEST_CSUM if guest_csum else 0))
    (gpa,) = post(rx, 1526)
    driver.kick(0)
    os.write(peer, b"\x02" + HDR[1:] + FRAME)  # VIRTIO_NET_HDR_F_DATA_VALID
    tap_readable(dev)

    assert dev.ram.read(gpa, 1) == (b"\x02" if guest_csum else b"\x00")


def test_virtio_net_rx_buffer_smaller_than_the_header_without_mrg_drops_the_frame(net, peer):
    """5.1.6.3.1: buffers of at least the header are a MUST with MRG_RXBUF only; without
    it a frame that does not fit is dropped, the buffer kept, the device working."""
    driver, rx, _ = started(net)
    post(rx, 8)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    tap_readable(net)

    assert rx.take_used() == [] and net.counts["rx_dropped"] == 1
    assert not driver.status() & NEEDS_RESET


def test_virtio_net_rx_unused_buffer_stays_posted_for_next_frame(net, peer):
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 1526, 1526)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    os.write(peer, HDR + FRAME[:60])
    tap_readable(net)

    assert rx.take_used() == [(0, 12 + len(FRAME)), (1, 72)]


def test_virtio_net_rx_mrg_rxbuf_frame_longer_than_expected_takes_more_buffers(net, peer):
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 1000, 1000, 1000)
    driver.kick(0)
    big = bytes(range(256)) * 10  # 2560 bytes: past the 1518 of an Ethernet frame
    os.write(peer, HDR + big)
    tap_readable(net)

    assert rx.take_used() == [(0, 1000), (1, 1000), (2, 12 + len(big) - 2000)]
    assert net.counts["rx_frames"] == 1


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
def test_virtio_net_rx_mrg_rxbuf_frame_longer_than_the_posted_buffers_waits_for_more(
    net, peer, fds, event_idx
):
    """With MRG_RXBUF a frame that needs more buffers than are posted is held, not dropped
    (a 64 KiB TSO frame needs ~43 of Linux's, which refills only half a ring at a time): the
    TAP is not read again, and the driver's next buffers, past those it saw, take it first,
    then the frame behind it. The kick is asked for past the buffers already posted: with
    EVENT_IDX an avail_event at those would let the driver post more without a kick."""
    features = F_VERSION_1 | F_MRG_RXBUF | (F_EVENT_IDX if event_idx else 0)
    driver, rx, _ = started(net, features)
    first, _ = post(rx, 100, 100)
    driver.kick(0)
    big = bytes(range(256)) + bytes(44)  # 300 bytes: 312 with the header, 200 posted
    os.write(peer, HDR + big)
    os.write(peer, HDR + FRAME[:60])
    tap_readable(net)

    assert (rx.take_used(), net.counts["rx_dropped"], watched(net)) == ([], 0, False)
    assert pending_in_tap(fds) == 72  # the frame behind waits in the TAP

    old = rx.avail_idx
    post(rx, 100, 100, 100)
    assert driver.kick_if_needed(rx, old, event_idx=event_idx)
    assert rx.take_used() == [(0, 100), (1, 100), (2, 100), (3, 12), (4, 72)]
    assert net.ram.read(first + 10, 2) == b"\x04\x00"  # num_buffers
    assert net.ram.read(first + 12, 88) == big[:88]
    assert net.counts == {**net.counts, "rx_frames": 2, "rx_dropped": 0}


def test_virtio_net_rx_mrg_rxbuf_frame_no_ring_of_buffers_can_take_is_dropped(net, peer):
    """Held while the driver may still post buffers; dropped once every entry of the ring
    is posted and they cannot take it, and the device goes on with the next frame."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF, rx_size=4)
    post(rx, 100, 100)
    driver.kick(0)
    os.write(peer, HDR + bytes(600))  # 612 bytes: more than 4 buffers of 100
    os.write(peer, HDR + FRAME[:60])
    tap_readable(net)
    assert (rx.take_used(), net.counts["rx_dropped"]) == ([], 0)

    post(rx, 100, 100)  # the ring is full of posted buffers now
    driver.kick(0)
    assert rx.take_used() == [(0, 72)]
    assert net.counts["rx_dropped"] == 1


def test_virtio_net_rx_held_frame_dropped_when_two_descriptor_chains_fill_the_ring(net, peer):
    """A ring is full when its descriptors are: with two-descriptor chains (header and
    data, as Windows' netkvm posts them) a ring of 4 holds 2 chains, and no more can come."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF, rx_size=4)
    for _ in range(2):
        rx.add([(*rx.buffer(12), True), (*rx.buffer(100), True)])
    driver.kick(0)
    os.write(peer, HDR + bytes(600))  # 612 bytes: more than 2 chains of 112
    os.write(peer, HDR + FRAME[:60])
    tap_readable(net)

    assert rx.take_used() == [(0, 72)]
    assert net.counts["rx_dropped"] == 1


def test_virtio_net_rx_held_frame_with_avail_idx_moved_back_needs_reset(net, peer, monkeypatch):
    """A frame held for more buffers, and a driver whose other vCPU moves avail idx one
    ahead and back (2.7: it never goes back): each ask for a notify was told one more was
    posted, the next look found as many as before, and the device asked again, for as long
    as the driver liked, serving nothing else. Fewer posted than it was told: NEEDS_RESET."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 100)
    driver.kick(0)
    ring = net.rings[0]
    asking, asked = ring.enable_notifications, []

    def racing(beyond: int = 0) -> bool:
        if len(asked) > 100:  # a loop ends the test rather than hang it
            raise AssertionError("the held frame's loop never ended")
        asked.append(beyond)
        net.ram.write(rx.avail + 2, struct.pack("<H", rx.avail_idx + 1))
        more = asking(beyond)
        net.ram.write(rx.avail + 2, struct.pack("<H", rx.avail_idx))
        return more

    monkeypatch.setattr(ring, "enable_notifications", racing)
    os.write(peer, HDR + bytes(300))  # 312 bytes: more than the one buffer of 100

    tap_readable(net)

    assert (asked, driver.status() & NEEDS_RESET) == ([1], NEEDS_RESET)


def test_virtio_net_rx_held_frame_goes_with_a_reset(net, peer):
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 100)
    driver.kick(0)
    os.write(peer, HDR + bytes(300))
    tap_readable(net)
    driver.set_status(0)

    assert net.counts["rx_dropped"] == 1
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 1526)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    tap_readable(net)
    assert rx.take_used() == [(0, 12 + len(FRAME))]


def test_virtio_net_rx_mrg_rxbuf_takes_chains_for_an_ethernet_frame_even_with_guest_tso(
    offloading, peer, monkeypatch
):
    """A frame takes the chains an Ethernet frame needs and more only for a longer one:
    taking enough for 64 KiB up front walked ~43 of Linux's chains a frame, all but one
    given back (and one more such walk whenever the TAP was empty)."""
    features = F_VERSION_1 | F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4
    driver, rx, _ = started(offloading, features)
    popped: list[int] = []
    pop = SplitQueue.pop

    def counted(ring: SplitQueue) -> object:
        chain = pop(ring)
        popped.append(chain is not None)
        return chain

    monkeypatch.setattr(SplitQueue, "pop", counted)
    post(rx, *[1526] * 15)
    driver.kick(0)
    assert sum(popped) <= 2
    popped.clear()
    os.write(peer, HDR + FRAME)
    big = bytes(range(256)) * 16  # a 4096-byte frame: three chains
    os.write(peer, HDR + big)
    tap_readable(offloading)

    assert rx.take_used() == [(0, 12 + len(FRAME)), (1, 1526), (2, 1526), (3, 12 + 4096 - 3052)]
    assert sum(popped) <= 8


def test_virtio_net_rx_mrg_rxbuf_tail_chain_smaller_than_the_header_needs_a_reset(net, peer):
    """5.1.6.3.1 (a MUST with MRG_RXBUF) holds for the chains a long frame's tail takes too."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 1530, 1, 4096)
    driver.kick(0)
    os.write(peer, HDR + bytes(2000))
    tap_readable(net)

    assert driver.status() & NEEDS_RESET


def test_virtio_net_rx_without_buffers_stops_watching_tap_and_leaves_frame(net, peer, fds):
    driver, rx, _ = started(net)
    driver.kick(0)
    os.write(peer, HDR + FRAME)

    assert not watched(net)
    assert pending_in_tap(fds) == 12 + len(FRAME)
    post(rx, 1526)
    driver.kick(0)  # the guest posts a buffer: the frame that waited lands in it
    assert rx.take_used() == [(0, 12 + len(FRAME))]
    assert not watched(net)  # that buffer is used: none posted again


def test_virtio_net_rx_buffers_posted_and_tap_empty_watches_tap(net):
    driver, rx, _ = started(net)
    post(rx, 1526)
    driver.kick(0)

    assert watched(net)
    assert rx.take_used() == []


def test_virtio_net_rx_frame_larger_than_buffer_dropped_counted_buffer_reused(net, peer):
    driver, rx, _ = started(net)
    post(rx, 64)
    driver.kick(0)
    os.write(peer, HDR + FRAME)  # 126 bytes: more than the 64 posted
    os.write(peer, HDR + FRAME[:40])
    tap_readable(net)

    assert rx.take_used() == [(0, 52)]
    assert net.counts["rx_dropped"] == 1
    assert net.counts["rx_frames"] == 1


def tap_read_fails_once(net: VirtioNet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device's next TAP read fails (not EAGAIN: EBADFD for a detached queue, say), at
    monotonic 50.0 s."""
    real_readv, failures = os.readv, [OSError(errno.EBADFD, "File descriptor in bad state")]

    def readv(fd: int, buffers: list) -> int:
        if fd == net.tap and failures:
            raise failures.pop()
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)
    monkeypatch.setattr(net, "monotonic", lambda: 50.0)


def test_virtio_net_rx_after_a_failed_tap_read_resumes_without_a_kick(net, peer, monkeypatch):
    """A TAP read that fails (not EAGAIN: EBADFD for a detached queue, say) stops the watch
    for RX_RETRY_S, then the device watches the TAP again by itself: a driver with EVENT_IDX
    does not kick for buffers behind avail_event, and Linux's with a full ring adds none."""
    driver, rx, _ = started(net, F_VERSION_1 | F_EVENT_IDX)
    post(rx, 1526)
    driver.kick(0)
    tap_read_fails_once(net, monkeypatch)
    os.write(peer, HDR + FRAME)
    tap_readable(net)
    stopped, deadline = not watched(net), net.next_deadline()

    net.tick(50.0 + virtio_net.RX_RETRY_S / 2)  # early: nothing yet
    early = watched(net)
    net.tick(50.0 + virtio_net.RX_RETRY_S)
    tap_readable(net)

    assert (stopped, deadline, early) == (True, 50.0 + virtio_net.RX_RETRY_S, False)
    assert rx.take_used() == [(0, 12 + len(FRAME))] and net.next_deadline() is None


def test_virtio_net_rx_retry_waits_while_quiesced_and_goes_with_a_reset(net, monkeypatch):
    driver, rx, _ = started(net)
    post(rx, 1526)
    driver.kick(0)
    net.rx_retry_at = 7.0
    net.quiesce()
    quiesced = net.next_deadline()
    net.resume()
    resumed = net.next_deadline()
    driver.set_status(0)

    assert (quiesced, resumed, net.next_deadline()) == (None, 7.0, None)


# -- snapshot and counters ------------------------------------------------------------------------
def test_virtio_net_quiesced_does_not_watch_tap_and_resume_delivers(net, peer):
    driver, rx, _ = started(net)
    post(rx, 1526)
    driver.kick(0)
    net.quiesce()
    os.write(peer, HDR + FRAME)

    assert not watched(net)
    net.resume()
    serve_ready(net)  # the event loop's next step: the TAP and the notifies are watched again
    assert rx.take_used() == [(0, 12 + len(FRAME))]


def test_virtio_net_state_restore_keeps_mac_and_queues(net, fds):
    started(net, F_VERSION_1 | F_MRG_RXBUF)
    net.quiesce()
    state = net.save()

    restored = VirtioNet.restore(prepared("virtio-net", fds), state)
    assert restored.mac == bytes.fromhex("525400123456")
    assert restored.save() == state


def test_virtio_net_restore_checks_every_queue_before_a_written_used_ring_needs_a_reset(net, fds):
    """A used ring the guest wrote makes the restored device need a reset, and opens no ring
    of any queue; a state that contradicts itself is refused whichever queue comes first."""
    from splitvmm.record import replace

    driver, rx, tx = started(net)
    net.quiesce()
    state = net.save()
    net.ram.write(rx.used + 2, struct.pack("<H", 5))  # queue 0's used idx: the guest's write

    restored = VirtioNet.restore(prepared("virtio-net", fds), state)
    assert restored.rings == [None, None] and Driver(restored).status() & NEEDS_RESET

    in_flight = replace(state.queues[1], last_avail=9, used_idx=8)
    broken = replace(state, queues=(state.queues[0], in_flight))
    with pytest.raises(StateError, match="queue 1: last_avail 9 is not used_idx 8"):
        VirtioNet.restore(prepared("virtio-net", fds), broken)


def test_virtio_net_restored_refuses_another_mac_in_the_config(net, fds):
    restored = VirtioNet.restore(prepared("virtio-net", fds), net.save())

    restored.check_options({"mac": MAC, "tap": "tap0"})
    with pytest.raises(ConfigError, match="mac is 52:54:00:12:34:57 in the config, 52:54:00:12"):
        restored.check_options({"mac": "52:54:00:12:34:57"})
    with pytest.raises(ConfigError, match="six hex bytes"):
        restored.check_options({"mac": "zz"})


def test_virtio_net_stats_count_frames_and_notifications(net, peer):
    driver, _, tx = started(net)
    tx.add([(*tx.buffer(HDR + FRAME), False)])
    driver.kick(1)

    stats = net.stats()
    assert {k: stats[k] for k in ("tx_frames", "tx_bytes", "notifications")} == {
        "tx_frames": 1,
        "tx_bytes": len(FRAME),
        "notifications": 1,
    }
    assert set(stats) >= {"rx_frames", "rx_bytes", "rx_dropped", "tx_dropped", "interrupts"}


def test_virtio_net_stats_say_the_link(net):
    """`ctl devices --json` showed the traffic but not whether the cable was in: only
    `ctl link NAME` said so, one device at a time."""
    started(net)
    assert net.stats()["link_up"] == 1
    net.link(False)
    assert net.stats()["link_up"] == 0


def test_virtio_net_without_the_monitors_word_on_a_tap_offers_no_offloads(fds):
    ctx = prepared("virtio-net", fds)  # a stand-in transport: no "tap_offloads"

    assert virtio_net.VirtioNet.from_options(ctx, {}).device_features() & OFFLOAD_BITS == 0


def test_virtio_net_setup_never_touches_the_taps_offloads(fds, monkeypatch):
    """They are the TAP's, not an fd's: a warm spare's setup, while the live process serves
    the same TAP, cleared the offloads the guest had negotiated (the monitor tries them once,
    as it opens the TAP: native/tun.py open_tap)."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(tun, "set_offload", lambda fd, flags: calls.append((fd, flags)))
    prepared("virtio-net", fds)
    assert calls == []


# -- the link (`ctl link`) ------------------------------------------------------------------------
CONFIG_GENERATION = 0x15  # in the common configuration (4.1.4.3)
ISR_CONFIG = 0x2


def test_virtio_net_link_down_clears_link_up_moves_generation_then_interrupts(net):
    """5.1.4: the status field's LINK_UP; 4.1.4.3: the generation moves with any change of
    the device configuration; 4.1.4.5: a configuration change sets ISR bit 1 (INTx here)."""
    driver, _, _ = started(net)
    generation = driver.common(CONFIG_GENERATION, 1)

    assert net.link(False) is False

    assert net.read(DEVICE_CFG + 6, 2) == b"\x00\x00"
    assert driver.common(CONFIG_GENERATION, 1) == (generation + 1) & 0xFF
    assert driver.rd(ISR, 1) & ISR_CONFIG
    assert net.link(True) is True
    assert net.read(DEVICE_CFG + 6, 2) == b"\x01\x00"
    assert driver.common(CONFIG_GENERATION, 1) == (generation + 2) & 0xFF


def test_virtio_net_link_asked_as_it_is_changes_nothing_the_driver_sees(net):
    driver, _, _ = started(net)
    generation = driver.common(CONFIG_GENERATION, 1)

    assert net.link(None) is True and net.link(True) is True

    assert driver.common(CONFIG_GENERATION, 1) == generation
    assert driver.rd(ISR, 1) == 0


def test_virtio_net_link_down_before_driver_ok_sends_no_interrupt(net):
    """4.1.4.5 / 3.1.1: no configuration interrupt before DRIVER_OK; the driver reads the
    status when it sets up."""
    driver = Driver(net)

    net.link(False)

    assert driver.rd(ISR, 1) == 0
    assert net.read(DEVICE_CFG + 6, 2) == b"\x00\x00"


def test_virtio_net_link_down_completes_tx_chains_unsent_and_up_sends_again(net, peer):
    driver, _, tx = started(net)
    net.link(False)
    tx.add([(*tx.buffer(HDR + FRAME), False)])
    driver.kick(1)

    assert tx.take_used() == [(0, 0)]
    assert net.counts["tx_dropped"] == 1 and net.counts["tx_frames"] == 0
    with pytest.raises(BlockingIOError):
        os.read(peer, 2048)
    net.link(True)
    tx.add([(*tx.buffer(HDR + FRAME), False)])
    driver.kick(1)
    assert os.read(peer, 2048) == HDR + FRAME


def test_virtio_net_link_down_drains_the_tap_posted_or_not_and_up_delivers_what_comes(net, peer):
    """While down the TAP is read and its frames dropped, with no buffer posted too: nothing
    stale reaches the guest once the link is back, and the posted buffers stay posted."""
    driver, rx, _ = started(net)
    net.link(False)
    os.write(peer, HDR + FRAME)
    os.write(peer, HDR + FRAME)

    assert watched(net)  # no buffer is posted: only the link's being down watches the TAP
    tap_readable(net)
    assert net.counts["rx_dropped"] == 2 and pending_in_tap(net.ctx.fds) == 0
    post(rx, 1526)
    driver.kick(0)
    os.write(peer, HDR + FRAME)
    tap_readable(net)
    assert rx.take_used() == [] and net.counts["rx_dropped"] == 3

    net.link(True)
    newer = FRAME[:-1] + b"\xff"
    os.write(peer, HDR + newer)
    tap_readable(net)
    (used,) = rx.take_used()
    assert used == (0, 12 + len(newer)) and net.counts["rx_frames"] == 1


def test_virtio_net_link_down_drops_a_frame_held_for_more_buffers(net, peer):
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 100)
    driver.kick(0)
    os.write(peer, HDR + bytes(300))
    tap_readable(net)  # held: too few buffers posted

    net.link(False)
    dropped_when_down = net.counts["rx_dropped"]  # with the cable, not when it is back
    net.link(True)
    post(rx, 1526)
    driver.kick(0)

    assert rx.take_used() == [] and dropped_when_down == net.counts["rx_dropped"] == 1


def test_virtio_net_link_down_drains_at_most_rx_batch_frames_an_event(net, peer):
    """A TAP that keeps filling while the link is down is read RX_BATCH frames at a time, as
    while it is up: the event loop (the monitor's accesses) gets its turn between them."""
    started(net)
    net.link(False)
    for _ in range(virtio_net.RX_BATCH + 1):
        os.write(peer, HDR + FRAME)

    tap_readable(net)
    one_event, still_watched = net.counts["rx_dropped"], watched(net)
    tap_readable(net)

    assert (one_event, still_watched) == (virtio_net.RX_BATCH, True)
    assert net.counts["rx_dropped"] == virtio_net.RX_BATCH + 1 and pending_in_tap(net.ctx.fds) == 0


def test_virtio_net_link_down_tap_read_failed_is_drained_again_at_the_retry(net, peer, monkeypatch):
    """A TAP read that fails while the link is down stops the watch for RX_RETRY_S, then the
    TAP is drained again, with no buffer posted: what came meanwhile is dropped, not left
    there for the guest once the link is back."""
    started(net)
    net.link(False)
    tap_read_fails_once(net, monkeypatch)
    os.write(peer, HDR + FRAME)
    tap_readable(net)
    stopped = not watched(net)

    net.tick(50.0 + virtio_net.RX_RETRY_S)
    tap_readable(net)

    assert stopped and net.counts["rx_dropped"] == 1 and pending_in_tap(net.ctx.fds) == 0


def test_virtio_net_link_down_survives_a_reset_and_a_restore(net, fds, peer):
    driver, _, _ = started(net)
    net.link(False)
    driver.set_status(0)  # a reset: the link is the operator's, not the driver's
    assert net.read(DEVICE_CFG + 6, 2) == b"\x00\x00" and watched(net)

    net.quiesce()
    restored = VirtioNet.restore(prepared("virtio-net", fds), net.save())

    assert restored.link(None) is False and restored.read(DEVICE_CFG + 6, 2) == b"\x00\x00"
    os.write(peer, HDR + FRAME)
    tap_readable(restored)  # a restored device that is down drains its TAP at once
    assert restored.counts["rx_dropped"] == 1


def test_virtio_net_state_v1_golden_restores_with_the_link_up(fds):
    """A snapshot of the release before the link (f5da77b's parent saved this document: a
    driver that took MRG_RXBUF and set up both queues, quiesced): it upgrades with the link
    up, and the device serves as that release's did."""
    from splitvmm.protocol.codec import state_from_document

    doc = json.loads((GOLDENS / "virtio-net" / "v1.json").read_text())
    state = state_from_document("virtio-net", virtio_net.VirtioNetState, doc)
    net = VirtioNet.restore(prepared("virtio-net", fds), state)

    assert state.link_up is True and net.link(None) is True
    assert net.read(DEVICE_CFG + 6, 2) == b"\x01\x00"  # VIRTIO_NET_S_LINK_UP
    assert net.mac == bytes.fromhex("525400123456") and Driver(net).status() == (
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    )


def test_virtio_net_link_request_answered_after_its_checkpoint_even_on_a_full_channel(net):
    """The runtime publishes the change as a checkpoint and sends it before the reply, waiting
    for room (the events' own send gives up on a full channel, and the reply overtook it): a
    process that dies once the operator is told comes back as told."""
    from splitvmm.devprocs.faults import FaultInjector
    from splitvmm.devprocs.runtime import Checkpoints, _serve_frame
    from splitvmm.protocol import control
    from tests.unit.test_stats import FakeSocket

    net.ctx.events.connect(lambda frame: False)  # a channel with no room now
    checkpoints = Checkpoints(net)
    sock = FakeSocket()
    request = control.encode({"op": "link", "seq": 4, "up": False})

    _serve_frame(net, sock, request, checkpoints, FaultInjector())  # as the event loop does

    published, reply = (control.decode(frame) for frame in sock.sent)
    assert published["op"] == "publish" and published["fields"]["link_up"] is False
    assert control.check_reply(reply, "link", 4, "virtio-net") == {
        "op": "link_state", "seq": 4, "up": False, "changed": True
    }  # fmt: skip
    sock.sent.clear()
    _serve_frame(net, sock, request, checkpoints, FaultInjector())
    (reply,) = (control.decode(frame) for frame in sock.sent)  # unchanged: nothing to publish
    assert (reply["up"], reply["changed"]) == (False, False)


def test_virtio_net_link_request_leaves_the_events_as_they_were_once_answered(net):
    """The waiting send is lent for the checkpoint alone: it goes once, and what the device
    says after it goes as before, never blocking the device on a full channel."""
    from splitvmm.devprocs.faults import FaultInjector
    from splitvmm.devprocs.runtime import Checkpoints, _serve_frame
    from splitvmm.protocol import control
    from tests.unit.test_stats import FakeSocket

    net.ctx.events.connect(lambda frame: False)  # a channel with no room now
    sock = FakeSocket()
    request = control.encode({"op": "link", "seq": 4, "up": False})
    _serve_frame(net, sock, request, Checkpoints(net), FaultInjector())
    answered = len(sock.sent)

    net.ctx.events.report("after the link")  # the channel has no room for it yet
    later: list[bytes] = []
    net.ctx.events.connect(lambda frame: later.append(frame) is None)  # room again

    assert answered == len(sock.sent) == 2  # the checkpoint and the reply, and nothing since
    assert [control.decode(frame)["op"] for frame in later] == ["report"]


def test_link_request_to_a_model_without_a_link_is_an_error_reply():
    from splitvmm.devprocs.base import DeviceContext
    from splitvmm.devprocs.faults import FaultInjector
    from splitvmm.devprocs.runtime import _serve_control
    from splitvmm.devprocs.serial import Uart8250
    from splitvmm.errors import ProtocolError
    from splitvmm.protocol import control
    from tests.fakes import FakeIrq
    from tests.unit.test_stats import FakeSocket

    sock = FakeSocket()
    uart = Uart8250(DeviceContext(irq=FakeIrq()))
    _serve_control(
        uart, sock, control.encode({"op": "link", "seq": 2, "up": None}), FaultInjector()
    )

    with pytest.raises(ProtocolError, match="model serial has no link"):
        control.check_reply(control.decode(sock.sent[0]), "link", 2, "serial")


@pytest.mark.parametrize("up", [1, "down", [True]])
def test_link_request_with_anything_but_a_bool_or_null_refused(up):
    from splitvmm.errors import ProtocolError
    from splitvmm.protocol import control

    with pytest.raises(ProtocolError, match="control link"):
        control.decode(control.encode({"op": "link", "seq": 1, "up": up}))


RX_STEP = st.one_of(
    st.tuples(st.just("post"), st.lists(st.integers(0, 700), min_size=1, max_size=4)),
    st.tuples(st.just("frame"), st.integers(1, 3000)),
    st.tuples(st.just("kick"), st.just(0)),
    st.tuples(st.just("readable"), st.just(0)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(merge=st.booleans(), event_idx=st.booleans(), steps=st.lists(RX_STEP, max_size=80))
def test_virtio_net_rx_frames_arrive_intact_in_order_whatever_the_buffers(merge, event_idx, steps):
    """Differential check of the receive path (5.1.6.3, 5.1.6.4): random chains posted (zero-
    length and header-splitting buffers among them), frames from the TAP's stand-in, kicks
    and TAP wake-ups in any order: each frame delivered comes out of the used ring whole and
    in order (a subsequence of those sent: a frame no buffers can take is dropped and
    counted), with flags 0, num_buffers 1 without MRG_RXBUF, and every buffer of a merged
    frame but the last used in full; the device never needs a reset."""
    peers = {}
    fds = host_fds("virtio-net", peers=peers)
    try:
        dev = VirtioNet.from_options(prepared("virtio-net", fds), {"mac": "52:54:00:12:34:56"})
        feats = F_VERSION_1 | (F_MRG_RXBUF if merge else 0) | (F_EVENT_IDX if event_idx else 0)
        driver, rx, _ = started(dev, feats, rx_size=64)
        peer = peers["tap"]
        chains = {}  # head -> [(gpa, len)]
        posted = 0
        descs = 0
        sent = []
        seq = 0
        for kind, arg in steps:
            if kind == "post":
                if posted >= 64 or (merge and sum(arg) < 12) or rx.heap > 0x70000:
                    continue
                if descs + len(arg) > 64:  # each descriptor used once: no reuse
                    continue
                descs += len(arg)
                parts = []
                for ln in arg:
                    gpa, _ = rx.buffer(max(ln, 1))
                    parts.append((gpa, ln, True))
                old = rx.avail_idx
                head = rx.add(parts)
                chains[head] = [(g, size) for g, size, _ in parts]
                posted += 1
                driver.kick_if_needed(rx, old, event_idx=event_idx)
            elif kind == "frame":
                seq += 1
                f = bytes([seq & 0xFF]) * 3 + os.urandom(arg)
                try:
                    os.write(peer, bytes(12) + f)
                except BlockingIOError:
                    continue
                sent.append(f)
            elif kind == "kick":
                driver.kick(0)
            else:
                if watched(dev):
                    tap_readable(dev)
        assert not driver.status() & NEEDS_RESET
        used = rx.take_used()
        got, i = [], 0

        def read_chain(head, n):
            out = b""
            for g, size in chains[head]:
                take = min(size, n - len(out))
                out += dev.ram.read(g, take)
            return out

        while i < len(used):
            head, ln = used[i]
            first = read_chain(head, ln)
            nb = struct.unpack_from("<H", first, 10)[0]
            assert nb >= 1 and (merge or nb == 1), (nb, used)
            data = first
            for h2, l2 in used[i + 1 : i + nb]:
                data += read_chain(h2, l2)
            for h2, l2 in used[i : i + nb - 1]:
                assert l2 == sum(size for _, size in chains[h2]), "a buffer but the last not filled"
            assert data[:1] == b"\0", data[:12]  # flags 0
            got.append(data[12:])
            i += nb
        # delivered frames: a subsequence of those sent, in order, intact
        it = iter(sent)
        for g in got:
            assert any(g == s for s in it), "frame out of order or corrupted"
        assert len(got) == dev.counts["rx_frames"]
        pending = len(sent) - len(got) - dev.counts["rx_dropped"]
        assert pending >= 0
    finally:
        close_fds(fds)
        close_fds(peers)


# -- mutation audit: guest-facing checks no test caught when broken -------------------------------
@pytest.mark.parametrize("shape", ["writable-only", "4-bytes"])
def test_virtio_net_tx_chain_shorter_than_the_header_is_dropped_and_the_next_sent(net, peer, shape):
    """5.1.6.2: every transmit buffer starts with the 12-byte header. A chain with less (none
    readable at all, or 4 bytes) is no frame: dropped and counted, nothing reaches the TAP
    for it (a chain with no readable buffer once failed the device), and the next is sent."""
    driver, _, tx = started(net)
    if shape == "writable-only":
        tx.add([(*tx.buffer(16), True)])
    else:
        tx.add([(*tx.buffer(HDR[:4]), False)])
    tx.add([(*tx.buffer(HDR), False), (*tx.buffer(FRAME), False)])

    driver.kick(1)

    assert os.read(peer, 1 << 16) == HDR + FRAME
    assert tx.take_used() == [(0, 0), (1, 0)]
    assert (net.counts["tx_dropped"], net.counts["tx_frames"]) == (1, 1)


def test_virtio_net_tx_header_split_across_descriptors_goes_to_the_tap_whole(net, peer):
    """2.7.4: the header split 6 + 6 over two descriptors apart in RAM is gathered: the TAP
    gets the driver's gso_size, csum_start and csum_offset (hdr_len 0), not the bytes that
    follow the first descriptor."""
    driver, _, tx = started(net)
    header = struct.pack("<BBHHHHH", 0, 0, 0, 0x1234, 0x22, 0x10, 0)
    tx.add([(*tx.buffer(header[:6]), False), (*tx.buffer(header[6:] + FRAME), False)])

    driver.kick(1)

    assert os.read(peer, 1 << 16) == header + FRAME


def test_virtio_net_rx_frame_shorter_than_the_header_is_dropped(net, peer):
    """The TAP's frames start with the vnet header; one shorter than it is no frame: dropped
    and counted, the buffer kept for the next, never handed to the driver headerless."""
    driver, rx, _ = started(net)
    post(rx, 1526)
    driver.kick(0)
    os.write(peer, HDR[:5])
    os.write(peer, HDR + FRAME)

    tap_readable(net)

    assert rx.take_used() == [(0, 12 + len(FRAME))] and net.counts["rx_dropped"] == 1


def test_virtio_net_rx_mrg_rxbuf_first_chain_smaller_than_the_header_needs_a_reset(net, peer):
    """5.1.6.3.1 (a MUST with MRG_RXBUF): every receive buffer holds the header, the first
    of a frame's chains too."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 8, 1526)
    driver.kick(0)
    os.write(peer, HDR + FRAME)

    tap_readable(net)

    assert driver.status() & NEEDS_RESET and rx.take_used() == []


def test_virtio_net_rx_held_frame_offered_a_chain_smaller_than_the_header_needs_a_reset(net, peer):
    """5.1.6.3.1 holds for the chains posted for a held frame too."""
    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF)
    post(rx, 100, 100)
    driver.kick(0)
    os.write(peer, HDR + bytes(300))  # 312 bytes: held for more than the 200 posted
    tap_readable(net)
    assert rx.take_used() == []

    post(rx, 100, 4, 100)
    driver.kick(0)

    assert driver.status() & NEEDS_RESET and rx.take_used() == []


def test_virtio_net_rx_mrg_rxbuf_chains_of_many_buffers_stay_under_iov_max(net, peer):
    """A readv takes at most IOV_MAX buffers: chains of 200 one-byte buffers each (indirect)
    are taken for a frame only while the first read needs no more than half of that, and
    the frame is delivered (past it, the read failed with EINVAL and nothing came)."""
    from tests.virtio.support import F_INDIRECT

    driver, rx, _ = started(net, F_VERSION_1 | F_MRG_RXBUF | F_INDIRECT)
    for _ in range(8):
        rx.add([(*rx.buffer(1), True) for _ in range(200)], indirect=True)
    driver.kick(0)
    os.write(peer, HDR + FRAME)

    tap_readable(net)

    assert (rx.take_used(), net.counts["rx_frames"]) == ([(0, 12 + len(FRAME))], 1)
    assert not driver.status() & NEEDS_RESET


@pytest.mark.parametrize("mac", ["010203040506", "000000000000"], ids=["multicast", "zero"])
def test_virtio_net_restore_refuses_a_multicast_or_all_zero_mac(net, fds, mac):
    from splitvmm.record import replace

    state = replace(net.save(), mac=bytes.fromhex(mac))

    with pytest.raises(StateError, match="multicast or the all-zero"):
        VirtioNet.restore(prepared("virtio-net", fds), state)


def test_virtio_net_every_queue_notify_off_names_its_own_notify_address(net, peer):
    """4.1.4.4: queue q's notify address is cap.offset + queue_notify_off * multiplier, with
    queue_notify_off as the device reads it for q: a write there serves that queue."""
    from tests.virtio.support import NOTIFY

    driver, _, tx = started(net)
    offs = []
    for q in (0, 1):
        driver.set_common(0x16, q, 2)
        offs.append(driver.common(0x1E, 2))
    tx.add([(*tx.buffer(HDR), False), (*tx.buffer(FRAME), False)])

    driver.wr(NOTIFY + 4 * offs[1], 1, 2)

    assert offs[0] != offs[1] and os.read(peer, 1 << 16) == HDR + FRAME


def test_virtio_net_rx_reads_at_most_rx_batch_frames_an_event(net, peer):
    """The module docstring: each event reads at most RX_BATCH frames, then interrupts once
    and leaves the rest to the next turn of the event loop (the TAP stays watched)."""
    n = virtio_net.RX_BATCH + 6
    driver, rx, _ = started(net, rx_size=128)
    post(rx, *[1526] * n)
    driver.kick(0)
    for _ in range(n):
        os.write(peer, HDR + FRAME)

    tap_readable(net)
    first, more_wait = len(rx.take_used()), watched(net)
    tap_readable(net)

    assert (first, more_wait, len(rx.take_used())) == (virtio_net.RX_BATCH, True, 6)
