"""The virtio 1.x PCI transport (virtio 1.2 4.1), device side, as a RegisterDevice.

The function's flat window (protocol.models.PciFunction.regions()): its configuration space
at 0 (config_space.py), BAR 0's registers, BAR 1's MSI-X table and PBA (msix.py). BAR 0:

    0x0000  common configuration (4.1.4.3): features, status, queue set-up
    0x1000  ISR status (4.1.4.5): one byte, reading clears it
    0x2000  the device-specific configuration (the model's config_bytes/config_write)
    0x3000  queue notify addresses, 4 bytes apart (4.1.4.4); the monitor's ioeventfds take
            the guest's writes there (fd roles notify<q>): a write that reaches us over
            the channel is a notify too

Common configuration fields are accessed at their natural width (4.1.3.1; a 64-bit field
also as two 32-bit halves); any other access is a guest mistake: counted, reads give zeros.

A queue is processed when its notify eventfd fires, only while DRIVER_OK is set and neither
NEEDS_RESET nor FAILED: every available chain, in order, each completed before the next,
then one interrupt if the driver wants one. A model may instead start a chain and finish it
later (handle() returns a Pending: a request in flight on the host, such as an O_DIRECT
read queued to the disk); then up to MAX_IN_FLIGHT chains are in flight at once, the
model's wait_pending() waits for them (REFILL_POLL_NS at a time while the ring is dry, so
that a chain the driver adds meanwhile, without a kick, starts at once), and chains still
go to the used ring in the order they were taken. Either way process() returns with nothing
in flight, so the rest of this holds for both. Every BUDGET_NS it asks its event loop
whether anything else waits (a frame on the channel, another fd): if so, it triggers its
own notify eventfd and returns, to take up the rest once the loop has served them; if not,
it goes on. Nothing is published per batch: a crash restart takes each queue's position
from its used ring in guest RAM (taken = completed, in order), and the state a checkpoint
carries changes only with register writes, which the runtime's checkpoints and the
monitor's journal cover. The journal's frames are re-applied to the registers only: no ring
is opened or run meanwhile, since a ring a frame enabled may be memory the driver has reset
and given up since (writing its used ring, or running its stale descriptors, would write
into guest memory that is no longer the device's). Once they are, after_restart() takes up
each queue the last frame leaves enabled, and interrupts once for it, since the dead
process may have completed chains and died before it could (a spurious interrupt costs the
driver a look at its used ring; a lost one would leave it waiting; raised any earlier, a
replayed ISR read would clear it). A hostile ring or a buffer outside guest RAM
(QueueError, GuestRamError) stops the device: NEEDS_RESET, a configuration-change
interrupt, nothing more until the driver resets it.

A chain the host cannot serve now, through no fault of the driver's (its write met a full
file system), stalls the device (stall()): the chain and every one taken after it go back
to the ring unused (SplitQueue.unpop; those after it are done again later, as a restart
would), the queues serve nothing more, and the monitor is asked to pause the VM (a "stall"
event). The driver sees requests that take long, never an error. The monitor's resume of
the VM asks the device to retry(), and it takes the chain up again: done, or stalled anew.
A snapshot meanwhile saves the queue with the chain not taken, so a restore tries it too.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Self

from splitvmm.devprocs.base import DeviceContext, RegisterDevice, Source
from splitvmm.devprocs.progress import Progress
from splitvmm.devprocs.virtio import config_space
from splitvmm.devprocs.virtio.config_space import (
    COMMON_SIZE,
    DEVICE_CFG_OFFSET,
    DEVICE_CFG_SIZE,
    ISR_OFFSET,
)
from splitvmm.devprocs.virtio.guestram import GuestRam, GuestRamError
from splitvmm.devprocs.virtio.msix import NO_VECTOR, Intx, Msix
from splitvmm.devprocs.virtio.queue import Chain, QueueError, SplitQueue
from splitvmm.devprocs.virtio.state import MsixEntryState, QueueState, VirtioPciState
from splitvmm.errors import StateError
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol.models import MODELS, PciFunction
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.record import replace

log = logging.getLogger("splitvmm.dev.virtio")

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2
MAX_QUEUE_SIZE = 32768  # virtio 1.2 2.7: a split queue's size, a power of 2
# Why a device needs a reset whose driver set DRIVER_OK with no features accepted (3.1.1)
NOT_NEGOTIATED = "DRIVER_OK without FEATURES_OK: no features were accepted"


class Status(enum.IntFlag):
    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    NEEDS_RESET = 0x40
    FAILED = 0x80


class Common(enum.IntEnum):
    """struct virtio_pci_common_cfg (virtio 1.2 4.1.4.3): offset of each field."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    MSIX_CONFIG = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A


WIDTH = {f: 4 for f in Common if f < Common.MSIX_CONFIG} | {
    **dict.fromkeys((Common.DEVICE_STATUS, Common.CONFIG_GENERATION), 1),
    **dict.fromkeys((Common.QUEUE_DESC, Common.QUEUE_DRIVER, Common.QUEUE_DEVICE), 8),
}


def field_of(offset: int, size: int) -> tuple[Common, int] | None:
    """(field, bit shift) of a common-cfg access of `size` at `offset`: the field at its
    width, or half of a 64-bit field; None for any other access."""
    for base, shift in ((offset, 0), (offset - 4, 32)):
        if base not in Common._value2member_map_:
            continue
        width = WIDTH.get(Common(base), 2)
        if width == size and shift == 0 or width == 8 and size == 4:
            return Common(base), shift
    return None


class Pending:
    """A chain a model started and finishes later: `written` (the bytes written into its
    writable buffers, as handle() returns) is set once it is done, or `stalled` once the
    model found it cannot be done now (VirtioPciDevice.stall)."""

    __slots__ = ("stalled", "written")

    def __init__(self) -> None:
        self.written: int | None = None
        self.stalled = False


class Stalled(Exception):
    """Raised by handle() (VirtioPciDevice.stall): the chain cannot be served now."""


class VirtioPciDevice(RegisterDevice):
    """A virtio device on PCI; a model says what it is (DEVICE_ID, CLASS_CODE, features,
    its configuration) and what a chain on one of its queues does (handle)."""

    DEVICE_ID: ClassVar[int]  # virtio 1.2 5: 2 block, 4 entropy
    CLASS_CODE: ClassVar[int]  # PCI class, subclass, programming interface
    QUEUE_SIZE: ClassVar[int] = 256  # the largest queue the device offers (power of 2)
    # How long process() keeps looking at a queue it has just drained before it asks the
    # driver to kick again and sleeps (0: not at all). See _arrives_within().
    POLL_NS: ClassVar[int] = 0
    # How long one process() call runs before it asks whether anything else waits: the event
    # loop serves the channel (register reads, posted writes, the supervisor's heartbeat) and
    # other fds only between two calls. Handing the loop back when nothing waits cost ~55 us
    # a time (one pass around it), 4-6% of a sequential read's throughput (bench/blk.py).
    BUDGET_NS: ClassVar[int] = 1_000_000
    # Chains a model may have in flight at once (handle() returning Pending); 1 for a model
    # that finishes every chain in handle().
    MAX_IN_FLIGHT: ClassVar[int] = 1
    # With chains in flight and the ring dry, how long a wait for them lasts before the ring
    # is looked at again (the driver refills it without a kick: see process()). The kernel
    # adds the process's timer slack (50 us by default): a look every ~70-100 us.
    REFILL_POLL_NS: ClassVar[int] = 20_000
    clock_ns = staticmethod(time.monotonic_ns)  # (tests drive it by hand)
    MAPPED_FDS = ("ram", "dirty")
    State: ClassVar[type[VirtioPciState]]

    # -- what a model says -------------------------------------------------------------------
    def device_features(self) -> int:
        """The model's own feature bits (the transport adds VERSION_1, EVENT_IDX, INDIRECT)."""
        return 0

    def features_consistent(self, features: int) -> bool:
        """Whether the features the driver took hang together: a model whose features
        depend on one another (virtio-net, 5.1.3.1) refuses a set that takes one without
        what it requires, at FEATURES_OK (2.2.1: the device MUST fail to set it then)."""
        return True

    def config_bytes(self) -> bytes:
        """The device-specific configuration as the driver reads it (little-endian)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the device configuration: none is writable unless a model says."""
        self.ctx.counters.bad_access += 1

    @abc.abstractmethod
    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Serve one chain; the bytes written into its writable buffers, or a Pending that
        wait_pending() finishes. GuestRamError or QueueError: the chain is hostile (the
        device goes NEEDS_RESET)."""

    def wait_pending(self, timeout_ns: int | None = None) -> None:
        """Block until at least one Pending that handle() returned is done (its `written`
        set), or timeout_ns passed (None: no limit). Only a model whose handle() returns
        Pending is asked."""
        raise NotImplementedError(f"{self.NAME}: handle() returned Pending")

    def reset_model(self) -> None:
        """Device reset (status 0): the model's own state back to its initial values."""
        return None  # deliberately empty: a model with no state of its own

    def features_ok(self) -> None:
        """The driver's features (driver_features) were accepted (FEATURES_OK): a model
        that sets its backend up from them (a TAP's offloads) does it here."""
        return None  # deliberately empty: most models read the features as they serve

    def model_fields(self) -> dict[str, Any]:
        """The model's fields of its State (beyond the transport's)."""
        return {}

    @classmethod
    def from_state(cls, ctx: DeviceContext, state: Any) -> Self:
        """A device with the model's fields of `state`, each checked (StateError)."""
        return cls(ctx)

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def setup(cls, ctx: DeviceContext) -> None:
        """Map guest RAM (fd roles ram and dirty, placed by transport["ram"]) and the
        progress page's byte per queue (fd role progress: which used rings it wrote)."""
        ctx.prepared["ram"] = GuestRam.map(ctx.fds["ram"], ctx.fds["dirty"], ram_ranges(ctx))
        progress = ctx.prepared["progress"] = Progress(ctx.fds["progress"])
        ctx.prepared["rings_written"] = progress.rings_written()
        ctx.prepared["vectors_unmasked"] = progress.vectors_unmasked()
        ctx.prepared["msix_enabled"] = progress.msix_enabled_flag()

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        function = MODELS[self.NAME].transport
        if not isinstance(function, PciFunction) or function.notify is None:
            raise TypeError(f"{type(self).__name__}: its descriptor is not a virtio function")
        self.function = function
        self.ram = ctx.made("ram", GuestRam, f"{self.NAME}: guest RAM is not mapped")
        self.queue_count = function.notify.queues
        # Whether the device wrote each queue's used ring header (_start_ring): the process
        # after a crash reads what this one stored (_write_unwritten)
        self._written = ctx.made("rings_written", memoryview, f"{self.NAME}: no progress page")
        if self.queue_count > len(self._written):
            raise TypeError(f"{self.NAME}: {self.queue_count} queues, the progress page has "
                            f"a byte for {len(self._written)}")  # fmt: skip
        self._bar0 = function.region_of_bar(0)
        self._bar1 = function.region_of_bar(1)
        unmasked = ctx.made("vectors_unmasked", memoryview, f"{self.NAME}: no progress page")
        enabled = ctx.made("msix_enabled", memoryview, f"{self.NAME}: no progress page")
        self.msix = Msix([EventFd(ctx.fds[f"msix{k}"]) for k in range(function.msix_vectors)],
                         ctx.events, unmasked, enabled)  # fmt: skip
        ctx.events.on_route_done = self.msix.route_done
        self.intx = Intx(EventFd(ctx.fds["intx"]), self._intx_level)
        self._notify = [EventFd(ctx.fds[f"notify{q}"]) for q in range(self.queue_count)]
        self._resample = EventFd(ctx.fds["intx_resample"])
        self._sources = [Source(self._resample.fd, self._on_resample)]
        self._notify_sources = [
            Source(fd.fd, functools.partial(self._on_notify, q))
            for q, fd in enumerate(self._notify)
        ]
        # Memory decode on, as the monitor starts the function (monitor/pci/function.py: its
        # BARs come pre-assigned, as firmware leaves them): the register says what decodes.
        self.command = config_space.COMMAND_MEMORY
        self.cfg_access = config_space.CfgAccess()
        gsi = ctx.transport.get("intx_gsi")
        self.interrupt_line = gsi if isinstance(gsi, int) and 0 <= gsi <= 0xFF else 0xFF
        self.quiesced = False
        self.stalled: str | None = None  # why the queues wait for a resume (stall())
        self._warn = RateLimitedLog(log)
        self.notifications = 0  # notifies served: the guest's (ioeventfd, slow path), our own
        self.interrupts = 0  # queue and configuration interrupts signalled
        self.polls = self.poll_hits = 0  # looks for more after a drain; those that found some
        self.budget_yields = 0  # process() calls that stopped at BUDGET_NS (and came back)
        self.budget_renewals = 0  # budgets renewed, as nothing else waited
        self._reset()

    def _reset(self) -> None:
        """Device reset (virtio 1.2 2.4): everything but the PCI function's own registers."""
        self.status = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = NO_VECTOR
        self.config_generation = getattr(self, "config_generation", 0)
        self.queue_select = 0
        self.isr = 0
        self.queues = [self._fresh_queue() for _ in range(self.queue_count)]
        self.rings: list[SplitQueue | None] = [None] * self.queue_count
        # Queues whose enable a restart re-applied unconfirmed (ctx.replay_unconfirmed): the
        # dead process may never have applied it, so the used ring may hold a stale idx
        self._enabled_unconfirmed: set[int] = set()
        # Queues enabled while Bus Master Enable was clear: their used ring's header is not
        # written yet (_start_ring), and nothing was taken from them
        self._unwritten: set[int] = set()
        self.stalled = None  # the chains it waited to serve are the driver's to forget
        self._drop_unmapped_pending()  # every event is unmapped now: nothing may fire (2.4.1)
        self.reset_model()

    def _drop_unmapped_pending(self) -> None:
        """A vector pending behind its mask is dropped once no event maps to it: the device
        MUST NOT deliver an interrupt for an event whose vector is NO_VECTOR (4.1.5.2, 4.1.5.3),
        nor any after a reset (2.4.1), and unmasking it would send the old message."""
        mapped = 0
        for vector in (self.msix_config, *(queue.msix_vector for queue in self.queues)):
            if vector != NO_VECTOR:
                mapped |= 1 << vector
        self.msix.pending &= mapped

    def _fresh_queue(self) -> QueueState:
        return QueueState(size=self.QUEUE_SIZE, msix_vector=NO_VECTOR, enabled=False,
                          desc=0, driver=0, device=0, last_avail=0, used_idx=0)  # fmt: skip

    def set_command(self, value: int) -> None:
        """The PCI command register, as the guest wrote it (config_space.py). Bus Master
        Enable gates every DMA (_ready) and MSI-X message: a guest clears it to stop a
        device it hands over (Linux's pci_device_shutdown before a kexec). Set again, the
        queues are looked at, as after resume: what the driver made available meanwhile
        came with kicks that found the device unable to serve them, and the used rings
        enabled meanwhile are written first (_start_ring)."""
        mastered = value & ~self.command & config_space.COMMAND_MASTER
        self.command = value
        self.msix.set_bus_master(bool(value & config_space.COMMAND_MASTER))
        if mastered:
            self._write_unwritten()
        if mastered and not self.quiesced:
            self._kick_live_queues()

    def _write_unwritten(self) -> None:
        """Bus Master Enable is set: each ring enabled without it gets its used ring's
        header now. In a restart's replay the dead process wrote them, where the monitor
        knows it applied the frame. Where it does not, the dead process may have written
        them and served chains before its sync was answered (its other vCPUs saw them done),
        or never applied it (a stale idx in guest RAM): the progress page says which
        (_start_ring), and after_restart() writes those it did not."""
        unwritten, self._unwritten = self._unwritten, set()
        if self.ctx.replaying:
            if self.ctx.replay_unconfirmed:
                self._enabled_unconfirmed |= {q for q in unwritten if not self._written[q]}
            return
        for q in sorted(unwritten):
            self._start_ring(q)

    # -- the window --------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        value = self._read(offset, size)
        if value is None:
            self.ctx.counters.bad_access += 1
            return bytes(size)
        return value

    def _read(self, offset: int, size: int) -> bytes | None:
        if offset < self._bar0.start:
            return config_space.read(self, offset, size)
        if offset >= self._bar1.start:
            return self.msix.read(offset - self._bar1.start, size)
        offset -= self._bar0.start
        if offset < COMMON_SIZE:
            return self._common_read(offset, size)
        if offset == ISR_OFFSET and size == 1:
            isr, self.isr = self.isr, 0  # reading clears it (and the line stays down at EOI)
            return bytes([isr])
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            raw = self.config_bytes()[offset - DEVICE_CFG_OFFSET :][:size]
            return raw.ljust(size, b"\0")
        if self._notify_queue(offset) is not None:
            return bytes(size)  # a notify address reads as nothing
        return None

    def write(self, offset: int, data: bytes) -> None:
        if not self._write(offset, data):
            self.ctx.counters.bad_access += 1

    def _write(self, offset: int, data: bytes) -> bool:
        if offset < self._bar0.start:
            return config_space.write(self, offset, data)
        if offset >= self._bar1.start:
            return self.msix.write(offset - self._bar1.start, data)
        offset -= self._bar0.start
        if offset < COMMON_SIZE:
            return self._common_write(offset, data)
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            self.config_write(offset - DEVICE_CFG_OFFSET, data)
            return True
        queue = self._notify_queue(offset)
        if queue is None:
            return False
        self.notifications += 1
        self.process(queue)  # a notify that took the slow path
        return True

    def _notify_queue(self, offset: int) -> int | None:
        notify = self.function.notify
        assert notify is not None  # checked in __init__
        q, rest = divmod(offset - notify.offset, notify.multiplier)
        return q if offset >= notify.offset and 0 <= q < self.queue_count else None

    # -- common configuration ----------------------------------------------------------------
    def _common_read(self, offset: int, size: int) -> bytes | None:
        found = field_of(offset, size)
        if found is None:
            return None
        field, shift = found
        value = self._common_get(field) >> shift
        return (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _common_get(self, field: Common) -> int:
        queue = self._selected()
        match field:
            case Common.DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            case Common.DEVICE_FEATURE:
                return self._offered() >> (32 * self.device_feature_select) & 0xFFFF_FFFF
            case Common.DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            case Common.DRIVER_FEATURE:
                return self.driver_features >> (32 * self.driver_feature_select) & 0xFFFF_FFFF
            case Common.MSIX_CONFIG:
                return self.msix_config
            case Common.NUM_QUEUES:
                return self.queue_count
            case Common.DEVICE_STATUS:
                return self.status
            case Common.CONFIG_GENERATION:
                return self.config_generation
            case Common.QUEUE_SELECT:
                return self.queue_select
        if queue is None:  # queue_select past num_queues: a queue of size 0 (4.1.4.3.1), whose
            # vector is mapped to nothing (NO_VECTOR, 4.1.5.1.2), never to vector 0
            return NO_VECTOR if field is Common.QUEUE_MSIX_VECTOR else 0
        return self._queue_get(field, queue)

    def _queue_get(self, field: Common, queue: QueueState) -> int:
        return {
            Common.QUEUE_SIZE: queue.size,
            Common.QUEUE_MSIX_VECTOR: queue.msix_vector,
            Common.QUEUE_ENABLE: int(queue.enabled),
            Common.QUEUE_NOTIFY_OFF: self.queue_select,  # notify at offset + q * multiplier
            Common.QUEUE_DESC: queue.desc,
            Common.QUEUE_DRIVER: queue.driver,
            Common.QUEUE_DEVICE: queue.device,
        }.get(field, 0)  # notify data, reset: neither feature is offered

    def _selected(self) -> QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < self.queue_count else None

    def _common_write(self, offset: int, data: bytes) -> bool:
        found = field_of(offset, len(data))
        if found is None:
            return False
        field, shift = found
        value = int.from_bytes(data, "little")
        if field in (Common.QUEUE_DESC, Common.QUEUE_DRIVER, Common.QUEUE_DEVICE):
            old = self._common_get(field)
            mask = ((1 << 8 * len(data)) - 1) << shift
            value = old & ~mask | value << shift
        return self._common_set(field, value)

    def _common_set(self, field: Common, value: int) -> bool:
        match field:
            case Common.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
            case Common.DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
            case Common.DRIVER_FEATURE:
                return self._set_driver_features(value)
            case Common.MSIX_CONFIG:
                self.msix_config = value if value < self.msix.vectors else NO_VECTOR
                self._drop_unmapped_pending()
            case Common.DEVICE_STATUS:
                self._set_status(value)
            case Common.QUEUE_SELECT:
                self.queue_select = value
            case _:
                return self._queue_set(field, value)
        return True

    def _set_driver_features(self, value: int) -> bool:
        select = self.driver_feature_select
        if select >= 4 or self.status & Status.FEATURES_OK:
            return False  # past 128 bits, or features already accepted: ignored
        mask = 0xFFFF_FFFF << (32 * select)
        self.driver_features = self.driver_features & ~mask | value << (32 * select)
        return True

    def _queue_set(self, field: Common, value: int) -> bool:
        queue, q = self._selected(), self.queue_select
        if queue is None or queue.enabled and field != Common.QUEUE_MSIX_VECTOR:
            return False  # no such queue, or a live queue's layout (4.1.4.3.2: MUST NOT)
        match field:
            case Common.QUEUE_SIZE if 0 < value <= self.QUEUE_SIZE and value & (value - 1) == 0:
                self.queues[q] = replace(queue, size=value)
            case Common.QUEUE_MSIX_VECTOR:
                vector = value if value < self.msix.vectors else NO_VECTOR
                self.queues[q] = replace(queue, msix_vector=vector)
                self._drop_unmapped_pending()
            case Common.QUEUE_ENABLE if value == 1 and self.status & Status.FEATURES_OK:
                # 3.1.1: a driver sets its queues up after FEATURES_OK. One enabled before
                # would be laid out (EVENT_IDX's fields) by features it may still change,
                # and a snapshot's or a restart's ring, laid out by the accepted ones,
                # would not be the ring the device ran (or would not fit in RAM at all).
                self._enable_queue(q)
            case Common.QUEUE_DESC:
                self.queues[q] = replace(queue, desc=value)
            case Common.QUEUE_DRIVER:
                self.queues[q] = replace(queue, driver=value)
            case Common.QUEUE_DEVICE:
                self.queues[q] = replace(queue, device=value)
            case _:
                return False  # read-only, or a value the field cannot take
        return True

    def _enable_queue(self, q: int) -> None:
        self.queues[q] = replace(self.queues[q], enabled=True, last_avail=0, used_idx=0)
        if self.ctx.replaying:
            # Unconfirmed, it may be an enable the dead process never applied, with Bus
            # Master Enable or without: a model that goes by records of the old ring's used
            # idx (virtio_console.py) must know either way
            if self.ctx.replay_unconfirmed:
                self._enabled_unconfirmed.add(q)  # after_restart() applies it as a live one
            if not self.command & config_space.COMMAND_MASTER:
                self._unwritten.add(q)  # the dead process wrote nothing: nor did it run it
            return  # after_restart() opens it where the dead process left it
        self._open_ring(q)
        self._start_ring(q)

    def _start_ring(self, q: int) -> None:
        """Queue q's ring was just enabled: nothing is used yet, and its used ring in guest
        RAM is to say so (SplitQueue.fresh). That write is a DMA (PCI 3.0 6.2.2): without
        Bus Master Enable it waits for the bit (set_command), and the queue, which cannot
        run meanwhile, stays at 0. A snapshot or a restart meanwhile finds a used ring the
        device has not written (_load, after_restart). The progress page is told which,
        after the write and before any chain is served from the ring (_write_unwritten)."""
        ring = self.rings[q]
        master = bool(self.command & config_space.COMMAND_MASTER)
        if ring is not None and master:
            ring.fresh()
        elif ring is not None:
            self._unwritten.add(q)
        self._written[q] = ring is not None and master

    def _open_ring(self, q: int) -> None:
        try:
            self.rings[q] = self._new_ring(q)
        except (QueueError, GuestRamError) as e:
            self.needs_reset(f"queue {q}: {e}")

    def _new_ring(self, q: int) -> SplitQueue:
        """Queue q's rings where its state says they are, at its last_avail and used_idx;
        QueueError or GuestRamError if they are not in guest RAM."""
        queue = self.queues[q]
        ring = SplitQueue(
            self.ram, queue.size, queue.desc, queue.driver, queue.device,
            event_idx=bool(self.driver_features & VIRTIO_F_EVENT_IDX),
            indirect=bool(self.driver_features & VIRTIO_F_INDIRECT_DESC),
            max_chain=self.QUEUE_SIZE,
        )  # fmt: skip
        ring.last_avail, ring.used_idx = queue.last_avail, queue.used_idx
        return ring

    # -- status and features (virtio 1.2 2.1, 2.2, 3.1) ------------------------------------------
    def _offered(self) -> int:
        return TRANSPORT_FEATURES | self.device_features()

    def _refusal(self, features: int) -> str | None:
        """Why the device refuses these features at FEATURES_OK (2.2.1), or None: one rule
        for a driver's FEATURES_OK and a restored state's (untrusted) accepted set."""
        if extra := features & ~self._offered():
            return f"the driver took features {extra:#x}, which this device does not offer"
        if not features & VIRTIO_F_VERSION_1:  # 6.1: a device MAY fail without it; this one does
            return f"the driver's features {features:#x} lack VIRTIO_F_VERSION_1, which it requires"
        if not self.features_consistent(features):
            return f"the driver's features {features:#x} take one without a feature it requires"
        return None

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        # 2.1.2: the driver MUST NOT clear a bit; only a reset does. FEATURES_OK cleared
        # anyway stays set: else the driver could write other features under queues set up
        # with the accepted ones. DRIVER_OK may go: Windows' virtio drivers clear it to stop
        # the device before a power-off (ParaNdis_PowerOff), and the queues then stop.
        value |= self.status & Status.FEATURES_OK
        if value & Status.FEATURES_OK and not self.status & Status.FEATURES_OK:
            if self._refusal(self.driver_features) is not None:
                value &= ~Status.FEATURES_OK  # refused: the driver reads it back clear
        accepted_now = value & ~self.status & Status.FEATURES_OK
        started_now = value & ~self.status & Status.DRIVER_OK
        self.status = value & ~Status.NEEDS_RESET | self.status & Status.NEEDS_RESET
        if accepted_now:
            self.features_ok()
        if started_now and not self.status & Status.FEATURES_OK:
            # 3.1.1: a driver MUST have its features accepted first. Without that nothing
            # was negotiated, and the models read driver_features as they serve: an error
            # state (2.1.2), where the device would otherwise run on unchecked features.
            self.needs_reset(NOT_NEGOTIATED)
        elif started_now and self.status & Status.NEEDS_RESET:
            # Set during set-up (a ring refused at queue_enable), when 2.1.2 asks for no
            # notification: a driver that reads status only when told would run a dead
            # device. Told now, as the driver starts it.
            self._interrupt(ISR_CONFIG, self.msix_config)
        if self.status & Status.DRIVER_OK:
            self.process_all()  # buffers made available before DRIVER_OK wait for it

    def needs_reset(self, why: str) -> None:
        """The device cannot go on (a hostile ring): NEEDS_RESET, then tell the driver."""
        if self.status & Status.NEEDS_RESET:
            return
        self.status |= Status.NEEDS_RESET
        self._warn.warning("needs_reset", "%s: %s: the device needs a reset", self.NAME, why)
        self.ctx.events.report(f"{self.NAME}: {why}: the device needs a reset")
        if self.status & Status.DRIVER_OK:  # 2.1.2: a configuration change notification
            self._interrupt(ISR_CONFIG, self.msix_config)

    # -- queues -----------------------------------------------------------------------------------
    def _ready(self) -> bool:
        """Whether the queues may run: the driver is done (DRIVER_OK, and neither NEEDS_RESET
        nor FAILED) and the function may master the bus (every ring access and buffer is a
        DMA: PCI 3.0 6.2.2)."""
        live = not self.quiesced and not self.ctx.replaying
        master = self.command & config_space.COMMAND_MASTER
        return self._driver_ok() and bool(master) and live

    def _driver_ok(self) -> bool:
        """DRIVER_OK on accepted features (FEATURES_OK), and neither NEEDS_RESET nor FAILED:
        the driver runs the device, and driver_features is what was negotiated."""
        status = self.status
        good, bad = Status.DRIVER_OK | Status.FEATURES_OK, Status.NEEDS_RESET | Status.FAILED
        return status & (good | bad) == good

    def process_all(self) -> None:
        for q in range(self.queue_count):
            self.process(q)

    def process(self, q: int) -> None:
        """Every available chain of queue q, in order, with the driver's kicks off meanwhile
        (2.7.10: a kick per chain would cost the guest an exit each, and this loop looks
        anyway); an interrupt, if wanted, each time the ring runs dry, then POLL_NS for more
        before kicks are asked for again. Every BUDGET_NS, a driver that keeps the ring from
        running dry gets the rest in a later call if anything else waits for the event loop,
        and in this one if nothing does. A frame that arrives meanwhile is served within one
        budget, plus one for each busy queue (this one included): the loop runs the fds'
        callbacks, their notifies among them, before a frame."""
        ring = self.rings[q]
        if ring is None or not self._ready() or self.stalled is not None:
            return
        deadline = self.clock_ns() + self.BUDGET_NS
        told_more = False  # enable_notifications() said a chain came after the last drain
        try:
            ring.disable_notifications()
            while True:
                done = self._drain(q, ring, deadline)
                if done:
                    self.signal_used(q, ring)
                if self.stalled is not None:  # kicks stay off: retry() looks again
                    return
                left = deadline - self.clock_ns()
                # A round that served nothing after being told more came counts too: a driver
                # whose other vCPU moves avail idx forth and back is told so at every ask.
                if (done or told_more) and left <= 0:
                    if self.ctx.waiting():  # kicks stay off: our own notify brings us back
                        self.budget_yields += 1
                        self._notify[q].trigger()
                        return
                    self.budget_renewals += 1  # nothing else waits: go on
                    deadline = self.clock_ns() + self.BUDGET_NS
                    continue
                if done and self._arrives_within(ring, min(self.POLL_NS, left)):
                    self.poll_hits += 1
                    continue  # no kick, no wake-up: the driver's next chain came meanwhile
                if not ring.enable_notifications():  # kick me at the next one...
                    return
                ring.disable_notifications()  # ...unless it came meanwhile
                told_more = True
        except (QueueError, GuestRamError) as e:
            self.ring_failed(q, e)

    def ring_failed(self, q: int, error: Exception) -> None:
        """Queue q's ring broke a rule (`error`): NEEDS_RESET. The chains completed before
        the bad one are the driver's: their notification is due (2.7.7.2) whatever the
        device does next, and a driver that ignores NEEDS_RESET (Linux does) would wait for
        them forever."""
        ring = self.rings[q]
        if ring is not None:
            self.signal_used(q, ring)
        self.needs_reset(f"queue {q}: {error}")

    def signal_used(self, q: int, ring: SplitQueue) -> None:
        """The used buffer notification of queue q, if the driver wants one now (2.7.7.2,
        2.7.10)."""
        if ring.needs_notification():
            self._interrupt(ISR_QUEUE, self.queues[q].msix_vector)

    def _drain(self, q: int, ring: SplitQueue, deadline: int) -> int:
        """Serve chains until the ring is empty or the deadline has passed; how many. With
        chains in flight (Pending), it takes more while there is room and time, waits for
        the model when there is not, and returns once every one it took is done."""
        done = 0
        in_flight: collections.deque[tuple[int, Pending]] = collections.deque()
        lost = False  # an error of the model's own: completions it took may be gone
        try:
            while True:
                chain = None  # one chain at least, past the deadline or not, as it was set
                room = len(in_flight) < self.MAX_IN_FLIGHT and self.stalled is None
                looked = room and (not done and not in_flight or self.clock_ns() < deadline)
                if looked:
                    chain = ring.pop()
                if chain is not None:
                    try:
                        result = self.handle(q, chain)
                    except Stalled:
                        result = Pending()
                        result.stalled = True
                    if isinstance(result, Pending):
                        in_flight.append((chain.head, result))
                        continue
                    if not in_flight:
                        ring.push(chain.head, result)
                        done += 1
                        if self.clock_ns() >= deadline:
                            return done
                        continue
                    finished = Pending()  # done, but after those in flight before it
                    finished.written = result
                    in_flight.append((chain.head, finished))
                elif not in_flight:
                    return done
                elif in_flight[0][1].stalled:  # every chain before it used: give it back
                    self._give_back(ring, in_flight)
                    return done
                else:
                    # Chains used so far are the driver's now: their interrupt is not held
                    # back until every one in flight is done (that would turn its queue
                    # depth into batches)
                    self.signal_used(q, ring)
                    # The ring was dry: the driver refills it (without a kick, as kicks are
                    # off) once it sees a chain done, so look again every REFILL_POLL_NS
                    self.wait_pending(self.REFILL_POLL_NS if looked else None)
                while in_flight and (written := in_flight[0][1].written) is not None:
                    ring.push(in_flight.popleft()[0], written)
                    done += 1
        except BaseException as e:
            lost = not isinstance(e, QueueError | GuestRamError)
            raise
        finally:
            if not lost:  # a hostile chain: what is in flight still writes into guest RAM
                self._wait_in_flight(in_flight)
            self._use_finished(ring, in_flight)

    def _give_back(
        self, ring: SplitQueue, in_flight: collections.deque[tuple[int, Pending]]
    ) -> None:
        """The stalled chain first in `in_flight`, and every one taken after it, back to the
        ring unused, once those still on the host are done: the device takes them up again
        on resume (the module docstring). Their effects so far (a write done, a status byte
        written) are done again then, as a restart would."""
        self._wait_in_flight(in_flight)
        ring.unpop(len(in_flight))
        in_flight.clear()

    def stall(self, why: str) -> Stalled:
        """The chain being served cannot be now (`why`: what the host lacks): its device
        stalls (the module docstring), and the monitor is asked, once, to pause the VM. The
        exception for handle() to raise; a model that finds it on a Pending sets `stalled`."""
        if self.stalled is None:
            self.stalled = why
            self._warn.warning("stall", "%s: %s: waiting for the VM's resume", self.NAME, why)
            self.ctx.events.stall(why)
        return Stalled(why)

    def _wait_in_flight(self, in_flight: Sequence[tuple[int, Pending]]) -> None:
        """Wait for what is in flight on the host, which still writes into guest RAM: a
        hostile chain ends the drain (NEEDS_RESET follows), and those before it are used as
        the chains before the bad one are (ring_failed: their notification is due); a stall
        gives them back (_give_back). A stalled chain is waited for no more: nothing of it
        is on the host."""

        def on_host() -> int:
            return sum(p.written is None and not p.stalled for _, p in in_flight)

        unfinished = on_host()
        while unfinished:
            self.wait_pending()
            before, unfinished = unfinished, on_host()
            if unfinished == before:  # the model lost them (an error of its own): no spin
                return

    def _use_finished(self, ring: SplitQueue, in_flight: Sequence[tuple[int, Pending]]) -> None:
        """Use the chains finished in order, up to the first that is not. After an error of
        the model's own (a bug, MemoryError under the address-space limit), which ends the
        process (its on_crash policy applies), a completion it had taken from the kernel may
        be lost with the error, its status byte never written: a restart takes the queue up
        from the used ring and serves the rest again, where using them all told the driver
        "done" (status 0, or whatever its byte held) for writes that had failed."""
        with contextlib.suppress(QueueError, GuestRamError):
            for head, pending in in_flight:
                if pending.written is None:
                    return
                ring.push(head, pending.written)

    def _arrives_within(self, ring: SplitQueue, ns: int) -> bool:
        """Whether the driver makes a chain available within `ns`, looking all along.

        A device that sleeps once the ring is dry costs the driver's next request a kick (an
        exit) and itself a wake-up, and the waker's CPU is where the scheduler tends to wake
        it: on the vCPU's, which then stops running the guest that would refill the ring. A
        driver with requests in flight refills it within microseconds of seeing one done,
        so a device that served something looks a little longer (QEMU's iothreads poll for
        up to 32 us by default, poll-max-ns, for the same reason). Only after a drain that
        served chains: an idle device never polls."""
        if ns <= 0:
            return False
        self.polls += 1
        deadline = self.clock_ns() + ns
        last = ring.last_avail
        while ring.avail_idx() == last:
            if self.clock_ns() >= deadline:
                return False
        return True

    # -- interrupts ---------------------------------------------------------------------------------
    def _interrupt(self, cause: int, vector: int) -> None:
        self.interrupts += 1
        if self.msix.enabled:
            # 4.1.4.5.2: the queue bit is set only while MSI-X is off (the ISR is unused with
            # it on, 4.1.5.1); the configuration bit always. Left set, it would raise INTx
            # once MSI-X goes off, for interrupts already delivered as messages.
            self.isr |= cause & ISR_CONFIG
            self.msix.signal(vector)
        else:
            self.isr |= cause
            self.intx.update()

    def interrupt_status(self) -> bool:
        """PCI Status bit 3: the OR of the ISR while MSI-X is off (virtio 1.2 4.1.4.5.1),
        whatever the Interrupt Disable bit says (PCI 3.0 6.2.3)."""
        return bool(self.isr) and not self.msix.enabled

    def _intx_level(self) -> bool:
        """INTA# asserted: an interrupt pending and INTx not disabled in the command register."""
        return self.interrupt_status() and not self.command & config_space.COMMAND_INTX_DISABLE

    def config_changed(self) -> None:
        """The model changed its configuration (4.1.4.3: generation, then the interrupt)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & Status.DRIVER_OK:
            self._interrupt(ISR_CONFIG, self.msix_config)

    # -- the event loop -------------------------------------------------------------------------------
    def event_sources(self) -> Sequence[Source]:
        """The INTx resample fd always; the notify fds unless quiesced (their count waits)."""
        return self._sources if self.quiesced else self._sources + self._notify_sources

    def _on_notify(self, q: int) -> None:
        self._notify[q].drain()
        self.notifications += 1
        self.process(q)

    def _on_resample(self) -> None:
        self._resample.drain()
        self.intx.update()

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "notifications": self.notifications,
            "interrupts": self.interrupts,
            "polls": self.polls,  # the CPU spent looking: at most POLL_NS each
            "poll_hits": self.poll_hits,
            "budget_yields": self.budget_yields,
            "budget_renewals": self.budget_renewals,
        }

    def quiesce(self) -> None:
        self.quiesced = True  # nothing is in flight: each notify is served to the end

    def harvest_dirty(self) -> None:
        self.ram.harvest_dirty()  # nothing is in flight: _drain returns once all it took is done

    def resume(self) -> None:
        """What came while quiesced is served by the event loop, after the reply: each live
        queue's notify is signalled. The monitor's vCPUs wait for that reply, and nothing else
        reaches the loop meanwhile (ctx.waiting() would let a drain run to the ring's end)."""
        self.quiesced = False
        self._kick_live_queues()

    def retry(self) -> None:
        """The VM resumes after the stall: the chain that stalled is tried again."""
        self.stalled = None
        if not self.quiesced:
            self._kick_live_queues()

    def _kick_live_queues(self) -> None:
        """Signal each open ring's notify: the event loop serves what waits there."""
        for q, ring in enumerate(self.rings):
            if ring is not None:
                self._notify[q].trigger()

    # -- state --------------------------------------------------------------------------------------
    def save(self) -> VirtioPciState:
        queues = tuple(
            replace(s, last_avail=r.last_avail, used_idx=r.used_idx) if r is not None else s
            for s, r in zip(self.queues, self.rings, strict=True)
        )
        table = tuple(MsixEntryState(e.address, e.data, bool(e.control & 1))
                      for e in self.msix.entries)  # fmt: skip
        return self.State(
            command=self.command, interrupt_line=self.interrupt_line,
            msix_enabled=self.msix.enabled, msix_function_mask=self.msix.function_mask,
            msix_table=table, msix_pending=self.msix.pending,
            pci_cfg_bar=self.cfg_access.bar, pci_cfg_offset=self.cfg_access.offset,
            pci_cfg_length=self.cfg_access.length, status=self.status,
            device_feature_select=self.device_feature_select,
            driver_feature_select=self.driver_feature_select,
            driver_features=self.driver_features, msix_config=self.msix_config,
            config_generation=self.config_generation, queue_select=self.queue_select,
            isr=self.isr, queues=queues, **self.model_fields(),
        )  # fmt: skip

    @classmethod
    def restore(cls, ctx: DeviceContext, state: Any) -> Self:
        device = cls.from_state(ctx, state)
        device._check_state(state)
        device._load(state)
        return device

    def _check_state(self, s: VirtioPciState) -> None:
        where = f"{self.NAME} state"
        if len(s.queues) != self.queue_count or len(s.msix_table) != self.msix.vectors:
            raise StateError(f"{where}: {len(s.queues)} queues and {len(s.msix_table)} MSI-X "
                             f"vectors, the device has {self.queue_count} and {self.msix.vectors}")  # fmt: skip
        if s.msix_pending >> self.msix.vectors:
            raise StateError(f"{where}: msix_pending names a vector the table lacks")
        vectors = [s.msix_config, *(q.msix_vector for q in s.queues)]
        if any(v != NO_VECTOR and v >= self.msix.vectors for v in vectors):
            raise StateError(f"{where}: an MSI-X vector past the table's {self.msix.vectors}")
        for q, queue in enumerate(s.queues):
            if not 0 < queue.size <= self.QUEUE_SIZE or queue.size & (queue.size - 1):
                raise StateError(f"{where}: queue {q} size {queue.size} is not one offered")
        # accepted features bind the device (restore()): those it would have accepted only
        refusal = self._refusal(s.driver_features) if s.status & Status.FEATURES_OK else None
        if refusal is not None:
            raise StateError(f"{where}: {refusal}")

    def _load(self, s: VirtioPciState) -> None:
        # Only the bits a driver can write, as its write would leave them (untrusted input)
        self.command = s.command & config_space.COMMAND_WRITABLE
        self.interrupt_line = s.interrupt_line
        self.cfg_access = config_space.CfgAccess(s.pci_cfg_bar, s.pci_cfg_offset, s.pci_cfg_length)
        self.status, self.isr = s.status, s.isr
        self.device_feature_select = s.device_feature_select
        self.driver_feature_select = s.driver_feature_select
        self.driver_features, self.msix_config = s.driver_features, s.msix_config
        self.config_generation, self.queue_select = s.config_generation, s.queue_select
        self.queues = list(s.queues)
        if not s.status & Status.FEATURES_OK:
            # Saved by a release that took a queue enable before FEATURES_OK: not enabled,
            # as this one leaves it live (_queue_set), or the ring runs laid out by features
            # the driver may still change, and the VM's next snapshot may not restore.
            self.queues = [replace(q, enabled=False) for q in self.queues]
        if not s.command & config_space.COMMAND_MASTER:
            # Enabled without Bus Master Enable, a queue took nothing and its used ring may
            # not be written yet (_start_ring). The state cannot tell it from one that used
            # none (or 65536) before the bit went: the write when it is set again leaves
            # that one's used ring as it was (at rest: flags, idx and avail_event 0).
            self._unwritten = {q for q, queue in enumerate(self.queues)
                               if queue.enabled and queue.last_avail == queue.used_idx == 0}  # fmt: skip
        for entry, saved in zip(self.msix.entries, s.msix_table, strict=True):
            entry.address, entry.data, entry.control = saved.address, saved.data, int(saved.masked)
        self.msix.pending = s.msix_pending
        self._drop_unmapped_pending()  # as a running device would have (untrusted input)
        self.msix.bus_master = bool(s.command & config_space.COMMAND_MASTER)
        self.msix.set_control(s.msix_enabled, s.msix_function_mask)  # asks for the routes again
        if self.ctx.restarted:
            return  # after_restart() opens the queues, once the journal is replayed
        # INTA# is a level: up while the ISR is set (4.1.4.5.1). The saved IOAPIC may lack it
        # (KVM injects an irqfd from a worker, maybe after the irqchip was read); raised
        # again, a level already up changes nothing.
        self.intx.update()
        if self.status & Status.NEEDS_RESET:
            return  # no ring is opened: the driver resets the device first
        if self.status & Status.DRIVER_OK and not self.status & Status.FEATURES_OK:
            # Saved by a release that served such a driver: _driver_ok() now never runs its
            # queues, and the driver, told nothing, would wait for ever (_set_status).
            self.needs_reset(NOT_NEGOTIATED)
            return
        live = [q for q, queue in enumerate(self.queues) if queue.enabled]
        checked = {q: self._saved_ring(q) for q in live}  # every queue before any opens
        for q, (_, in_ram) in checked.items():
            if in_ram is not None and in_ram != self.queues[q].used_idx:
                self.needs_reset(f"queue {q}: the used ring's index in guest RAM is {in_ram}, "
                                 f"the device's {self.queues[q].used_idx}: the driver wrote it")  # fmt: skip
                return
        for q, (ring, _) in checked.items():
            self.rings[q] = ring
            self._notify[q].trigger()  # a kick the snapshot missed

    def _saved_ring(self, q: int) -> tuple[SplitQueue, int | None]:
        """A snapshot's live queue q and its used ring's index in guest RAM (None for one
        the device has not written: _unwritten, not read either), or StateError
        where its state contradicts itself or the guest RAM saved with it (before any vCPU
        runs: a guest left to meet it at its first kick hung, or read an I/O error). A
        snapshot is taken quiesced: no request is in flight, so the device has taken what it
        completed (last_avail = used_idx); the rings were in guest RAM, or the device would
        have needed a reset (its status says NEEDS_RESET then, and none is opened).

        Its used ring's index in guest RAM says so too (_load compares it), unless the guest
        wrote there: the ring is the device's, but it lies in the guest's RAM, and a hostile
        or broken driver that wrote its index (or put two queues on one ring) must not make
        its VM's snapshot one that cannot be restored. The device then needs a reset and
        opens no ring, as it would had it met the write running."""
        queue, where = self.queues[q], f"{self.NAME} state: queue {q}"
        if queue.last_avail != queue.used_idx:
            raise StateError(f"{where}: last_avail {queue.last_avail} is not used_idx "
                             f"{queue.used_idx}, but a snapshot has no request in flight")  # fmt: skip
        try:
            ring = self._new_ring(q)
            return ring, None if q in self._unwritten else self.ram.u16(queue.device + 2)
        except (QueueError, GuestRamError) as e:
            raise StateError(f"{where}: {e}") from None

    def after_restart(self) -> None:
        """Each queue the dead process left enabled, from where the used ring in guest RAM
        says it is (what it completed after its last checkpoint is done, once), with a kick
        it may have missed and an interrupt it may not have sent (the module docstring). A
        queue whose enable the replay re-applied past what the monitor knows the dead process
        applied starts at 0 as a live enable does: that ring may hold a stale idx. So does
        one enabled without Bus Master Enable, whose used ring the device has not written."""
        for q, queue in enumerate(self.queues):
            if not queue.enabled or self.status & Status.NEEDS_RESET:
                continue
            fresh = q in self._enabled_unconfirmed
            if not fresh and q not in self._unwritten:
                self._position_from_used_ring(q)
            self._open_ring(q)
            if fresh:
                # Its enable may never have reached the dead process, which then zeroed
                # nothing; if it did, its sync was never answered, so the driver had not
                # gone on to DRIVER_OK and no chain was taken: at 0 either way, as live.
                # A ring enabled without Bus Master Enable whose set of the bit is past
                # what the monitor knows was applied, and whose header the dead process
                # did not record writing (_write_unwritten), starts at 0 too: it left a
                # stale idx there (requests skipped), or died before it served any.
                self._start_ring(q)
            self._notify[q].trigger()
            # Not _ready(): with Bus Master Enable clear the interrupt pends (the ISR, the
            # PBA) until the guest sets it, as one raised meanwhile would.
            if self.rings[q] is not None and self._driver_ok():
                self._interrupt(ISR_QUEUE, self.queues[q].msix_vector)

    def _position_from_used_ring(self, q: int) -> None:
        """Take up queue q where its used ring in guest RAM says the device was: chains
        complete in order, one used entry each, so taken = completed = used idx."""
        try:
            used_idx = self.ram.u16(self.queues[q].device + 2)
        except GuestRamError:
            return  # _open_ring finds the same fault and sets NEEDS_RESET
        self.queues[q] = replace(self.queues[q], last_avail=used_idx, used_idx=used_idx)


def ram_ranges(ctx: DeviceContext) -> list[tuple[int, int, int]]:
    """transport["ram"]: [[gpa, size, memfd offset], ...] (the monitor's, trusted)."""
    ranges = ctx.transport.get("ram")
    if not isinstance(ranges, list):
        raise TypeError("transport['ram'] is not a list of [gpa, size, offset]")
    return [(int(gpa), int(size), int(off)) for gpa, size, off in ranges]
