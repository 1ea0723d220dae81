"""virtio-net (virtio 1.2 5.1): a TAP behind a receive queue (0) and a transmit queue (1).

The TAP is the fd the monitor opened (role `tap`, native/tun.py): IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR with a 12-byte virtio net header, which is the header a VERSION_1 driver puts
before every frame (5.1.6): frames move between the TAP and guest RAM with readv/writev on
views of guest memory, header included, never through a copy. The device opens nothing and
holds no socket; the only ioctl it makes is TUNSETOFFLOAD, when the driver's features are
accepted or reset (the offloads the TAP may hand us are the guest's GUEST_* features).

Transmit: each chain is one frame (header, then data), written with one writev; its used
entry follows the write (a frame the guest saw completed was handed to the TAP). A header
asking for an offload the driver did not negotiate is refused and counted.

Transmit frames are bounded: one longer than any a driver can build (TX_MAX_FRAME: 64 KiB,
an Ethernet header, a VLAN tag) is dropped and counted, never handed to the host's stack.

Receive: only while the driver has buffers posted does the device read the TAP: without
any it stops watching the TAP's fd (the frames wait in the TAP's queue: back-pressure), and
a notify on the receive queue starts it again. A frame is read into the buffers it may fill
-- one chain, or with MRG_RXBUF as many as an Ethernet frame needs -- plus a scratch tail,
so that a frame longer than them is seen, never cut. Without MRG_RXBUF such a frame is
dropped and counted (rx_dropped): the driver posts buffers for the largest frame it takes
(5.1.6.3.1). With it, more chains take the tail; when too few are posted (a TSO frame of
64 KiB needs ~43 of Linux's), the frame is held in the device, not dropped, and the TAP is
not read again until the driver has posted enough for it, as QEMU and Firecracker hold one.
Only a frame that even a ring full of posted buffers cannot hold is dropped. A held frame
is lost at a reset, at a crash and to a restored snapshot (a frame in flight, as one the
dead process had read). Chains the device did not need go back unused (SplitQueue.unpop):
between events, chains taken = chains completed, as the transport's crash restart needs.
Each event reads at most RX_BATCH frames, then interrupts once.

The link (VIRTIO_NET_F_STATUS, 5.1.4): up unless the operator takes it down (`splitvmm ctl
link NAME down`, the control op `link`), as QEMU's set_link does. The status field's
VIRTIO_NET_S_LINK_UP then clears, and the driver is told with a configuration-change
interrupt (config_generation moves first: 4.1.4.3). While it is down the device drops every
frame both ways, as a pulled cable loses them: each transmit chain is completed unsent
(tx_dropped), and the TAP is read and what it holds dropped (rx_dropped) whether or not
buffers are posted, so that no stale frames reach the guest when the link comes back (the
driver's buffers stay posted, and a frame the device held for more of them is dropped too).
The link is part of the device's state: a snapshot and a crash restart keep it (its change
is checkpointed before the operator is told, devprocs/runtime.py).

Crash restart: the new process takes each queue up at its used ring in guest RAM, as a NIC
that lost power would: a frame the dead process read from the TAP and had not completed is
lost (its buffers are posted again, whole; nothing half-written is ever completed), and a
transmit chain it wrote to the TAP but had not completed is written again (at most one a
crash: each chain completes right after its write), so the peer may see that frame twice.
TCP and a guest's own retransmits cope with both; a datagram protocol sees the loss or
the duplicate.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Self

from splitvmm.devprocs.base import DeviceContext, Source, register
from splitvmm.devprocs.virtio.guestram import GuestRamError, skip_bytes
from splitvmm.devprocs.virtio.pci import Status, VirtioPciDevice
from splitvmm.devprocs.virtio.queue import Chain, QueueError, SplitQueue
from splitvmm.devprocs.virtio.state import VirtioPciState
from splitvmm.errors import ConfigError, StateError
from splitvmm.native import tun
from splitvmm.protocol import schema
from splitvmm.protocol.models import mac_problem
from splitvmm.record import Struct

VIRTIO_ID_NET = 1
RX, TX = 0, 1  # receiveq0, transmitq0

# feature bits (5.1.3)
VIRTIO_NET_F_CSUM = 1 << 0  # the driver may send partially checksummed frames
VIRTIO_NET_F_GUEST_CSUM = 1 << 1  # ... and take them
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
# What the TAP's vnet header carries, offered only where the TAP takes offloads.
OFFLOAD_FEATURES = (
    VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
)  # fmt: skip
# 5.1.3.1: a feature -> those it requires (any one of them). A driver's set that takes one
# without is refused at FEATURES_OK (features_consistent); tun would refuse the offloads
# anyway (TUN_F_TSO_ECN without a TSO is EINVAL).
REQUIRES = {
    VIRTIO_NET_F_GUEST_TSO4: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO6: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN: VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO6: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN: VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6,
}
# The driver's receive features -> the TAP offloads they allow (TUN_F_*; TSO needs CSUM).
GUEST_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_TSO4, tun.TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, tun.TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, tun.TUN_F_TSO_ECN),
)

# struct virtio_net_hdr (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers
HDR = struct.Struct("<BBHHHHH")
HDR_LEN = 2  # the header's hdr_len field, after flags and gso_type
FLAGS_OFFSET = 0
NUM_BUFFERS_OFFSET = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6 = 0, 1, 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
GSO_FEATURE = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
}
GUEST_GSO_FEATURE = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6,
}


class Offloads(Struct, frozen=True):
    """The features a header's offloads need, one way (5.1.6.2.1 transmit, 5.1.6.4.1 receive)."""

    csum: int  # for NEEDS_CSUM
    ecn: int  # for the GSO ECN bit
    gso: Mapping[int, int]  # GSO type -> its feature


TX_OFFLOADS = Offloads(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, GSO_FEATURE)
RX_OFFLOADS = Offloads(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, GUEST_GSO_FEATURE)

CONFIG = struct.Struct("<6sH")  # struct virtio_net_config: mac, status (5.1.4)
ETH_MAX_FRAME = 1518  # 1500 bytes of payload, Ethernet header, one VLAN tag
GSO_MAX_FRAME = 65550  # a TSO segment the TAP may hand us: 64 KiB, Ethernet header
# The longest frame a driver may send: a GSO frame of 64 KiB (Linux's GSO_MAX_SIZE) or a
# 65535-byte MTU's frame, with an Ethernet header and a VLAN tag. Firecracker and crosvm
# bound a transmit buffer alike (65562 bytes with the 12-byte header; ours 65566: the tag).
TX_MAX_FRAME = (1 << 16) + 18
RX_SCRATCH = 1 << 17  # more than any frame a TAP delivers: the tail of a frame too long
RX_BATCH = 64  # frames read per event, then an interrupt and the channel's turn
# After a failed TAP read (not EAGAIN): how long before the TAP is watched again. A failing
# TAP that polls readable would otherwise spin the device; and no kick may ever come to
# restart it (with EVENT_IDX the driver kicks only past avail_event, and Linux refills a
# full ring only as buffers are used), so the device comes back to it by itself.
RX_RETRY_S = 0.1
IOV_MAX = 1024  # buffers one readv/writev takes
# The MAC of a device spawned bare (the policy audit, a test): models.default_mac("",
# "virtio-net"), written out, as this process can import no hashlib once it is sandboxed
# (tests/unit/test_virtio_net.py checks that the two agree).
BARE_MAC = "52:54:00:62:42:ff"


class VirtioNetState(VirtioPciState, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 2
    mac: Annotated[bytes, schema.Len(6, 6)] = bytes(6)
    link_up: bool = True  # the operator's `ctl link`
    # v1 had no link to take down: it was up
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {1: lambda f: {**f, "link_up": True}}


def _mac_option(options: Mapping[str, object]) -> bytes:
    return parse_mac(str(options.get("mac") or BARE_MAC))


def parse_mac(text: str) -> bytes:
    """ "52:54:00:12:34:56" -> its 6 bytes; ConfigError unless a unicast address (the check
    config.py makes first)."""
    problem = mac_problem(text) if text else "is empty"
    if problem is not None:
        raise ConfigError(f"virtio-net: mac {text[:40]!r} {problem}")
    return bytes.fromhex(text.replace(":", ""))


@register
class VirtioNet(VirtioPciDevice):
    NAME = "virtio-net"
    WINDOW = 0x6000
    State = VirtioNetState
    DEVICE_ID = VIRTIO_ID_NET
    CLASS_CODE = 0x020000  # network controller, Ethernet

    def __init__(self, ctx: DeviceContext, mac: bytes, link_up: bool = True) -> None:
        self.tap = ctx.fds["tap"]
        # The monitor tried the TAP's offloads when it opened it (tun.open_tap), before any
        # process of ours: offloads are the TAP's, so a warm spare's own try would have
        # cleared the live process's. No word of it: a stand-in that is no TAP (a socketpair).
        takes_offloads = ctx.transport.get("tap_offloads", False)
        if not isinstance(takes_offloads, bool):
            raise TypeError("virtio-net: transport['tap_offloads'] is not a bool")
        self.takes_offloads = takes_offloads
        self.mac = mac
        self.link_up = link_up  # the operator's `ctl link`: frames go both ways only while up
        self.offloads = -1  # TUN_F_* set on the TAP now; -1: not known (a restart's TAP)
        # Read the TAP when it is readable: buffers are posted, or the link is down
        self.rx_watch = not link_up
        self.rx_retry_at: float | None = None  # a TAP read failed: watch it again then
        self.backend_gone = False  # the TAP stand-in's peer closed (a TAP never ends)
        self.counts = dict.fromkeys(("rx_frames", "rx_bytes", "rx_dropped", "tx_frames",
                                     "tx_bytes", "tx_dropped"), 0)  # fmt: skip
        self._scratch = bytearray(RX_SCRATCH)
        # A frame read from the TAP that the buffers posted could not take (MRG_RXBUF), its
        # header first: delivered before the TAP is read again.
        self._held: bytes | None = None
        self._tap_source = Source(self.tap, lambda: self.process(RX))
        super().__init__(ctx)

    @classmethod
    def setup(cls, ctx: DeviceContext) -> None:
        """Guest RAM, and a TAP's vnet header checked (a stand-in that is no TAP, a
        socketpair, has none: ENOTTY)."""
        super().setup(ctx)
        try:
            size = tun.vnet_hdr_size(ctx.fds["tap"])
        except OSError:
            return
        if size != HDR.size:
            raise ConfigError(f"virtio-net: the TAP's vnet header is not {HDR.size} bytes")

    @classmethod
    def from_options(cls, ctx: DeviceContext, options: Mapping[str, object]) -> Self:
        # config.py derives a mac for every device (VM and device names); a device spawned
        # bare (the policy audit, a test) gets the one of no VM.
        return cls(ctx, _mac_option(options))

    def check_options(self, options: Mapping[str, object]) -> None:
        mac = _mac_option(options)
        if mac != self.mac:
            raise ConfigError(
                f"virtio-net: mac is {mac.hex(':')} in the config, {self.mac.hex(':')} in the "
                "saved device the guest knows (a mac not given is derived from the VM's and "
                "the device's names: give it)"
            )

    @classmethod
    def from_state(cls, ctx: DeviceContext, state: Any) -> Self:
        if state.mac[0] & 1 or not any(state.mac):
            raise StateError("virtio-net state: mac is a multicast or the all-zero address")
        return cls(ctx, state.mac, state.link_up)

    @classmethod
    def restore(cls, ctx: DeviceContext, state: Any) -> Self:
        device = super().restore(ctx, state)
        if device.status & Status.FEATURES_OK:
            device.features_ok()  # the TAP gets the driver's offloads again
        return device

    def _check_state(self, s: VirtioPciState) -> None:
        # Only features the device accepted (FEATURES_OK) bind it: before that, or where it
        # refused them, driver_features is whatever a driver wrote, offered or not. (The
        # state does not say what was offered, so a snapshot taken in the middle of a
        # negotiation that asked for offloads restores on a TAP without them, and the
        # driver's FEATURES_OK is refused then, as on a device that never offered them.)
        taken = s.driver_features if s.status & Status.FEATURES_OK else 0
        if taken & OFFLOAD_FEATURES and not self.takes_offloads:
            raise StateError("virtio-net state: the driver took offloads this TAP lacks")
        super()._check_state(s)  # the rest of what was accepted: offered, consistent

    def model_fields(self) -> dict[str, Any]:
        return {"mac": self.mac, "link_up": self.link_up}

    def stats(self) -> dict[str, int]:
        # the link too: `ctl devices --json` shows it beside the traffic it explains
        return {**super().stats(), **self.counts, "link_up": int(self.link_up)}

    # -- what the driver sees ---------------------------------------------------------------
    def device_features(self) -> int:
        features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF
        return features | (OFFLOAD_FEATURES if self.takes_offloads else 0)

    def features_consistent(self, features: int) -> bool:
        return all(features & needs for f, needs in REQUIRES.items() if features & f)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP if self.link_up else 0)

    def link(self, up: bool | None) -> bool | None:
        if up is not None and up != self.link_up:
            self.link_up = up
            if not up:
                self._drop_held()  # lost with the cable, as what the TAP holds will be
            self.rx_watch = True  # down: drain the TAP; up: deliver again where posted
            self.config_changed()
        return self.link_up

    def features_ok(self) -> None:
        offloads = 0
        if self.driver_features & VIRTIO_NET_F_GUEST_CSUM:
            offloads = tun.TUN_F_CSUM
            for feature, flag in GUEST_OFFLOADS:
                offloads |= flag if self.driver_features & feature else 0
        self._set_offloads(offloads)

    def reset_model(self) -> None:
        self._set_offloads(0)
        self.rx_watch = not self.link_up  # a down link's TAP is drained, posted or not
        self.rx_retry_at = None
        self._drop_held()  # the driver's buffers are gone with the reset

    def _drop_held(self) -> None:
        if self._held is not None:
            self._held = None
            self.counts["rx_dropped"] += 1

    def _set_offloads(self, offloads: int) -> None:
        if offloads == self.offloads:
            return
        try:
            tun.set_offload(self.tap, offloads)
        except OSError as e:  # tried at open_tap: a TAP that took them then takes them now
            self._warn.warning("offload", "%s: TUNSETOFFLOAD failed: %s", self.NAME, e)
            return
        self.offloads = offloads

    # -- the event loop: the TAP while buffers are posted ------------------------------------
    monotonic = staticmethod(time.monotonic)  # (tests drive it by hand)

    def next_deadline(self) -> float | None:
        """TimedEvents: when a TAP that failed a read is to be watched again."""
        return None if self.quiesced else self.rx_retry_at

    def tick(self, now: float) -> None:
        if self.rx_retry_at is None or now < self.rx_retry_at:
            return  # woken early (something else came first)
        self.rx_retry_at = None
        self.rx_watch = True  # the TAP again: into the buffers still posted, or (link down) dropped

    def event_sources(self) -> Sequence[Source]:
        sources = super().event_sources()
        if self.rx_watch and not self.quiesced and not self.backend_gone:
            return [*sources, self._tap_source]
        return sources

    def process(self, q: int) -> None:
        if q != RX:
            super().process(q)
            return
        if not self.link_up:
            self._discard()
            return
        ring = self.rings[RX]
        if ring is None or not self._ready():
            self.rx_watch = False
            return
        try:
            delivered = self._receive(ring)
        except (QueueError, GuestRamError) as e:
            self.rx_watch = False
            self.ring_failed(RX, e)  # the frames delivered before it are notified
            return
        if delivered:
            self.signal_used(RX, ring)

    # -- transmit -----------------------------------------------------------------------------
    def handle(self, queue: int, chain: Chain) -> int:
        """A transmit chain: its frame goes to the TAP; nothing is written back.

        The TAP gets a copy of the header, checked, with hdr_len 0: the device MUST NOT rely
        on hdr_len (5.1.6.2.2), and tun refuses a frame whose hdr_len it finds wrong (larger
        than the frame, or below an Ethernet header), a value the spec lets the driver give;
        with 0 tun works out what it needs from csum_start and csum_offset. A copy also means
        the guest cannot change the header between the check and the TAP's read of it."""
        size = sum(length for _, length in chain.readable)
        if not self.link_up:  # sent into a pulled cable: done, and lost
            self.counts["tx_dropped"] += 1
            return 0
        if not HDR.size <= size <= HDR.size + TX_MAX_FRAME or len(chain.readable) > IOV_MAX:
            self.counts["tx_dropped"] += 1
            return 0
        header = bytearray(self._header_of(chain.readable))
        if not self._negotiated(header, TX_OFFLOADS):
            self.counts["tx_dropped"] += 1
            return 0
        header[HDR_LEN : HDR_LEN + 2] = b"\0\0"
        try:
            os.writev(self.tap, [header, *self.ram.iovecs(_past_header(chain), writable=False)])
        except OSError as e:  # the TAP refused the frame (a header it finds invalid)
            self.counts["tx_dropped"] += 1
            self._warn.warning("tx", "%s: the TAP refused a frame: %s", self.NAME, e)
            return 0
        self.counts["tx_frames"] += 1
        self.counts["tx_bytes"] += size - HDR.size
        return 0

    def _header_of(self, parts: Sequence[tuple[int, int]], size: int = HDR.size) -> bytes:
        """The first `size` bytes of a chain's header: most drivers put the whole header in
        the first buffer, read at once; else gathered across buffers."""
        gpa, length = parts[0]
        if length >= size:
            return self.ram.read(gpa, size)
        return self.ram.gather(parts, size)

    def _negotiated(self, header: bytes | bytearray, need: Offloads) -> bool:
        """The header (its flags and gso_type) asks only for offloads the driver negotiated:
        a frame it sends (5.1.6.2.1), or one the TAP hands us for it (5.1.6.4.1: no GSO type
        without its GUEST_ feature; a partial checksum without GUEST_CSUM is no fully
        checksummed packet; the TAP's offloads follow the driver's features, but a frame it
        queued under an earlier negotiation, before a reset, still carries the old ones)."""
        flags, gso_type = header[0], header[1]
        if not flags | gso_type:
            return True  # nearly every frame: nothing asked for
        features = self.driver_features
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not features & need.csum:
            return False
        if gso_type & VIRTIO_NET_HDR_GSO_ECN and not features & need.ecn:
            return False
        gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if gso == VIRTIO_NET_HDR_GSO_NONE:
            return True
        # A GSO type comes with NEEDS_CSUM, each way (5.1.6.2.1, 5.1.6.4.1): tun hands a GSO
        # skb whose checksum is not partial (a NIC's LRO frame) with DATA_VALID or no flag
        return bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and features & need.gso.get(gso, 0))

    # -- receive ------------------------------------------------------------------------------
    def _discard(self) -> None:
        """The link is down: up to RX_BATCH frames read from the TAP and dropped; the TAP is
        watched as long as it may hold more (rx_watch)."""
        for _ in range(RX_BATCH):
            if self._read_frame([]) is None:  # into the scratch alone; drained, or failed
                return
            self.counts["rx_dropped"] += 1
        self.rx_watch = True

    def _receive(self, ring: SplitQueue) -> int:
        """Frames from the TAP into posted buffers, at most RX_BATCH read; how many were
        delivered (a held frame first)."""
        delivered = read = 0
        while True:
            if self._held is not None:
                held = self._deliver_held(ring)
                if held is None:
                    self.rx_watch = False  # still too few buffers: a notify starts us again
                    return delivered
                delivered += held
            if read == RX_BATCH:
                break
            read += 1
            chains = self._take(ring)
            if not chains:
                self.rx_watch = False  # back-pressure: a notify starts us again
                return delivered
            n = self._read_frame(chains)
            if n is None:
                ring.unpop(len(chains))
                return delivered
            delivered += self._complete(ring, chains, n)
        self.rx_watch = True  # more may wait: the TAP polls readable again
        return delivered

    def _merge(self) -> bool:
        return bool(self.driver_features & VIRTIO_NET_F_MRG_RXBUF)

    def _take(self, ring: SplitQueue) -> list[Chain]:
        """The chains to read a frame into: one, or with MRG_RXBUF enough for an Ethernet
        frame (of those posted): a longer one, a TSO frame, takes more chains only as it
        needs them (_tail), where taking enough for 64 KiB up front walked ~43 of Linux's
        chains for every frame, and gave all but one or two back; [] when none is posted
        (notifications asked for)."""
        chains: list[Chain] = []
        room = buffers = 0
        while room < HDR.size + ETH_MAX_FRAME and buffers < IOV_MAX // 2:
            chain = ring.pop()
            if chain is None and not chains and ring.enable_notifications():
                chain = ring.pop()  # posted while we looked: no kick will come for it
            if chain is None:
                break
            chains.append(chain)
            room, buffers = room + _room(chain), buffers + len(chain.writable)
            if not self._merge():
                break
        return chains

    def _read_frame(self, chains: list[Chain]) -> int | None:
        """One frame from the TAP into the chains' buffers and the scratch tail: its size
        (header included), or None if none waits (or the TAP failed: counted, logged)."""
        views: list[memoryview | bytearray] = []
        for chain in chains:
            views += self.ram.iovecs(chain.writable, writable=True)
        try:
            n = os.readv(self.tap, [*views, self._scratch])
        except BlockingIOError:
            self.rx_watch = True
            return None
        except OSError as e:
            self.rx_watch = False  # no spinning on a failing TAP: again at RX_RETRY_S
            self.rx_retry_at = self.monotonic() + RX_RETRY_S
            self._warn.warning("rx", "%s: reading the TAP failed: %s", self.NAME, e)
            return None
        if n == 0:
            self.backend_gone = True
            return None
        return n

    def _complete(self, ring: SplitQueue, chains: list[Chain], n: int) -> int:
        """The frame of n bytes read into `chains` (and the scratch) goes to the driver: the
        chains it fills are used, the rest given back; 1, or 0 if it was dropped."""
        if self._merge() and any(_room(c) < HDR.size for c in chains):  # 5.1.6.3.1: MUST
            raise QueueError(f"a receive buffer of less than the {HDR.size}-byte header")
        room = sum(_room(c) for c in chains)
        if (
            n < HDR.size
            or n > room and not self._merge()
            or not self._negotiated(self._header_of(chains[0].writable, 2), RX_OFFLOADS)
        ):  # fmt: skip
            ring.unpop(len(chains))
            self.counts["rx_dropped"] += 1
            return 0
        if n > room and not self._tail(ring, chains, n - room):
            self._hold(ring, chains, room, n)
            return 0
        return self._used_by_frame(ring, chains, n)

    def _used_by_frame(self, ring: SplitQueue, chains: list[Chain], n: int) -> int:
        """The frame of n bytes, in the chains' buffers, goes to the driver: the chains it
        fills are used, together, the rest given back; 1."""
        used: list[tuple[int, int]] = []
        left = n
        for chain in chains:
            if left == 0:
                break
            take = min(left, _room(chain))
            used.append((chain.head, take))
            left -= take
        ring.unpop(len(chains) - len(used))
        header = chains[0].writable
        if not self.driver_features & VIRTIO_NET_F_GUEST_CSUM:
            # 5.1.6.4.1: flags MUST be 0 then; the TAP marks frames it validated DATA_VALID.
            self.ram.scatter(header, FLAGS_OFFSET, b"\0")
        self.ram.scatter(header, NUM_BUFFERS_OFFSET, struct.pack("<H", len(used)))
        ring.push_together(used)  # 5.1.6.4.1: a frame's buffers are used together
        self.counts["rx_frames"] += 1
        self.counts["rx_bytes"] += n - HDR.size
        return 1

    def _tail(self, ring: SplitQueue, chains: list[Chain], extra: int) -> bool:
        """MRG_RXBUF: more chains for the `extra` bytes past those read into (in the
        scratch), copied there; False if too few are posted (chains keeps those taken)."""
        tail = memoryview(self._scratch)[:extra]
        while tail:
            chain = ring.pop()
            if chain is None:
                return False
            chains.append(chain)
            if _room(chain) < HDR.size:  # 5.1.6.3.1, as for the chains _take took
                raise QueueError(f"a receive buffer of less than the {HDR.size}-byte header")
            tail = tail[self.ram.scatter(chain.writable, 0, tail) :]
        return True

    def _hold(self, ring: SplitQueue, chains: list[Chain], room: int, n: int) -> None:
        """Keep the frame of n bytes (`room` of them in the chains' buffers, the rest in the
        scratch) until the driver posts enough buffers; the chains go back unused."""
        head = self.ram.gather([part for chain in chains for part in chain.writable], room)
        self._held = head + bytes(self._scratch[: n - room])
        ring.unpop(len(chains))

    def _deliver_held(self, ring: SplitQueue) -> int | None:
        """The held frame into buffers posted since: 1 once it is delivered, 0 if dropped
        (a ring full of posted buffers cannot take it), None while too few are posted (a
        notify asked for)."""
        held = self._held
        assert held is not None
        told_beyond = -1  # more than this many were posted, enable_notifications() said
        while True:
            chains: list[Chain] = []
            room = 0
            while room < len(held) and (chain := ring.pop()) is not None:
                chains.append(chain)
                room += _room(chain)
            if room >= len(held):
                break
            ring.unpop(len(chains))
            if len(chains) <= told_beyond:  # else a driver's other vCPU, moving avail idx
                # forth and back, kept this loop going for as long as it liked
                raise QueueError(f"avail idx went back: {told_beyond + 1} receive buffers "
                                 f"were posted, then {len(chains)}")  # fmt: skip
            held_descriptors = sum(ring.ring_descriptors(c.head) for c in chains)
            if held_descriptors >= ring.size:  # every descriptor posted: no more can come
                self._held = None
                self.counts["rx_dropped"] += 1
                return 0
            if not ring.enable_notifications(beyond=len(chains)):
                return None
            told_beyond = len(chains)
        if any(_room(c) < HDR.size for c in chains):  # 5.1.6.3.1: MUST
            ring.unpop(len(chains))
            raise QueueError(f"a receive buffer of less than the {HDR.size}-byte header")
        self._held = None
        rest = memoryview(held)
        for chain in chains:
            rest = rest[self.ram.scatter(chain.writable, 0, rest) :]
        return self._used_by_frame(ring, chains, len(held))


def _room(chain: Chain) -> int:
    return sum(length for _, length in chain.writable)


def _past_header(chain: Chain) -> Sequence[tuple[int, int]]:
    """The (gpa, len) buffers of a transmit chain after its header's HDR.size bytes."""
    if chain.readable[0][1] == HDR.size:
        return chain.readable[1:]  # the header in a buffer of its own
    return skip_bytes(chain.readable, HDR.size)
