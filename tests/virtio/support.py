"""A virtio device in a unit test: its host resources (guest RAM and dirty-log memfds,
eventfds for notify/MSI-X/INTx, a disk file), a driver that programs the PCI transport
through the device's window, and split virtqueues built in guest RAM the way a driver does
(virtio 1.2 2.7), written from the spec, not from the device's code."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from select import POLLIN, poll
from typing import TypeVar

from splitvmm.cli.policy import stand_in_fds, stand_in_transport
from splitvmm.devprocs.base import DeviceContext, load_model
from splitvmm.devprocs.virtio.pci import VirtioPciDevice
from splitvmm.protocol import control
from splitvmm.protocol.models import MODELS, FdKind
from splitvmm.record import Struct, field, replace

COMMAND, COMMAND_MASTER = 0x04, 0x0004  # the PCI command register and Bus Master Enable
BAR0 = 0x1000  # BAR 0's registers in the flat window
BAR1 = 0x5000  # BAR 1's (MSI-X)
ISR = BAR0 + 0x1000
DEVICE_CFG = BAR0 + 0x2000
NOTIFY = BAR0 + 0x3000
F_VERSION_1, F_EVENT_IDX, F_INDIRECT = 1 << 32, 1 << 29, 1 << 28
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
S = TypeVar("S", bound=Struct)


def host_fds(
    name: str, disk: Path | None = None, peers: dict[str, int] | None = None
) -> dict[str, int]:
    """An fd for each role of the model's descriptor, as the monitor would make them (the
    policy auditor's stand-ins), with `disk` as the disk image; a TAP's far end (a
    socketpair's) into `peers`."""
    given = {} if disk is None else {FdKind.DISK: os.open(disk, os.O_RDWR | os.O_CLOEXEC)}
    where = disk.parent if disk else Path("/nonexistent")
    return stand_in_fds(MODELS[name], where, given, peers)


def nothing_waits() -> bool:
    """A unit test's event loop, which is none: nothing else waits for the device. With the
    model's default (work may wait), a process() that a loaded host's real clock let run past
    BUDGET_NS handed its work back to a loop that never runs, and a kick was left half done
    (a test flaked under load). A test of the budget says what waits, on a SteppingClock."""
    return False


def context(fds: dict[str, int], restarted: bool = False) -> DeviceContext:
    return DeviceContext(
        fds=fds, transport=stand_in_transport(), restarted=restarted, waiting=nothing_waits
    )


def prepared(name: str, fds: dict[str, int], restarted: bool = False) -> DeviceContext:
    """A context on these fds, after the model's setup() (guest RAM mapped) and what it
    makes inside the sandbox (this process is the one that serves)."""
    ctx = context(fds, restarted=restarted)
    load_model(name).setup(ctx)
    load_model(name).setup_sandboxed(ctx)
    return ctx


@contextlib.contextmanager
def replaying(device: VirtioPciDevice) -> Iterator[None]:
    """What runtime.run does around a crash restart's journal: the frames re-applied in the
    block reach the registers only (ctx.replaying), then after_restart() takes the queues up."""
    device.ctx.replaying = True
    try:
        yield
    finally:
        device.ctx.replaying = False
    device.after_restart()


def close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


class SteppingClock:
    """A device's clock_ns, advanced by hand: `step` ns at each reading. Its process() then
    takes as long on a loaded host as on an idle one: its budget and its polls end after as
    many readings, never in the middle of what a test set up."""

    def __init__(self, step: int = 1_000) -> None:
        self.now, self.step = 0, step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def signalled(fd: int) -> int:
    """How many times an eventfd was written since the last look (0: not at all)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def serve_ready(dev: VirtioPciDevice) -> int:
    """Run the callback of each fd the device watches that polls readable now, as one step
    of its event loop does (devprocs/eventloop.py, without the channel); how many ran."""
    sources = dev.event_sources()
    poller = poll()
    for source in sources:
        poller.register(source.fd, POLLIN)
    readable = {fd for fd, _ in poller.poll(0)}
    ready = [s for s in sources if s.fd in readable]
    for source in ready:
        source.on_readable()
    return len(ready)


class Channel(Struct):
    """The monitor's end of the events a device sends (DeviceEvents.connect)."""

    frames: list[dict[str, object]] = field(default_factory=list)

    def send(self, frame: bytes) -> bool:
        self.frames.append(control.decode(frame))  # every field checked, as the monitor would
        return True

    def ops(self, op: str) -> list[dict[str, object]]:
        return [f for f in self.frames if f["op"] == op]


# -- the driver -----------------------------------------------------------------------------
class Driver:
    """Programs a virtio PCI function through its window, as a driver does (4.1.5)."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        self.dev = dev

    def rd(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.read(offset, size), "little")

    def wr(self, offset: int, value: int, size: int) -> None:
        self.dev.write(offset, value.to_bytes(size, "little"))

    def common(self, field: int, size: int) -> int:
        return self.rd(BAR0 + field, size)

    def set_common(self, field: int, value: int, size: int) -> None:
        self.wr(BAR0 + field, value, size)

    def status(self) -> int:
        return self.common(0x14, 1)

    def set_status(self, value: int) -> None:
        self.set_common(0x14, value, 1)

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.set_common(0x00, select, 4)
            features |= self.common(0x04, 4) << (32 * select)
        return features

    def enable_bus_master(self) -> None:
        """What a driver's PCI side does first (Linux's pci_set_master): without Bus Master
        Enable the function may not touch guest memory nor send an MSI-X message."""
        self.wr(COMMAND, self.rd(COMMAND, 2) | COMMAND_MASTER, 2)

    def negotiate(self, features: int) -> int:
        """Bus mastering on, then ACKNOWLEDGE, DRIVER, the features, FEATURES_OK: the status
        read back."""
        self.enable_bus_master()
        self.set_status(ACK)
        self.set_status(ACK | DRIVER)
        for select in (0, 1):
            self.set_common(0x08, select, 4)
            self.set_common(0x0C, features >> (32 * select) & 0xFFFFFFFF, 4)
        self.set_status(ACK | DRIVER | FEATURES_OK)
        return self.status()

    def setup_queue(self, q: int, ring: Ring, vector: int = 0xFFFF) -> None:
        self.set_common(0x16, q, 2)
        self.set_common(0x18, ring.size, 2)
        self.set_common(0x1A, vector, 2)
        for off, gpa in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            self.set_common(off, gpa & 0xFFFFFFFF, 4)  # as two halves, as Linux does
            self.set_common(off + 4, gpa >> 32, 4)
        self.set_common(0x1C, 1, 2)

    def start(self, ring: Ring, features: int = F_VERSION_1, vector: int = 0xFFFF) -> None:
        """The whole initialisation (3.1.1) with queue 0 on `ring`."""
        assert self.negotiate(features) & FEATURES_OK
        self.setup_queue(0, ring, vector)
        self.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)

    def kick_if_needed(self, ring: Ring, old_idx: int, q: int = 0, event_idx: bool = False) -> bool:
        """After making chains available from avail idx `old_idx` on: kick only where the
        device asked for it (2.7.10 with EVENT_IDX: the new chains passed avail_event;
        without: VIRTQ_USED_F_NO_NOTIFY clear), as a driver that suppresses its kicks does.
        Whether it kicked."""
        new = ring.avail_idx
        if event_idx:
            avail_event = ring.ram.u16(ring.used + 4 + 8 * ring.size)  # type: ignore[attr-defined]
            needed = (new - avail_event - 1) & 0xFFFF < (new - old_idx) & 0xFFFF
        else:
            needed = not ring.ram.u16(ring.used) & 1  # type: ignore[attr-defined]
        if needed:
            self.kick(q)
        return bool(needed)

    def kick(self, q: int = 0) -> None:
        """What the guest's notify write does: the monitor's ioeventfd fires."""
        os.eventfd_write(self.dev.ctx.fds[f"notify{q}"], 1)
        for source in self.dev.event_sources():
            if source.fd == self.dev.ctx.fds[f"notify{q}"]:
                source.on_readable()


class Ring:
    """A split virtqueue as the driver lays it out in guest RAM."""

    def __init__(self, ram: object, size: int = 16, base: int = 0x1000) -> None:
        self.ram = ram
        self.size = size
        self.desc, self.avail, self.used = base, base + 0x1000, base + 0x2000
        self.next_desc = 0
        self.avail_idx = 0
        self.seen_used = 0
        self.heap = 0x10000  # buffers from here

    def _w(self, gpa: int, data: bytes) -> None:
        self.ram.write(gpa, data)  # type: ignore[attr-defined]

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Room in RAM for a buffer: its bytes, or that many zeros."""
        raw = bytes(data) if isinstance(data, int) else data
        gpa = self.heap
        self._w(gpa, raw)
        self.heap += (len(raw) + 15) & ~15 or 16
        return gpa, len(raw)

    def add(self, parts: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Make a chain of (gpa, len, device-writable) available; its head."""
        if indirect:
            table, _ = self.buffer(16 * len(parts))
            self._descs(table, parts, 0)
            head = self._descs(self.desc, [(table, 16 * len(parts), False)], self.next_desc,
                               flags=DESC_INDIRECT)  # fmt: skip
        else:
            head = self._descs(self.desc, parts, self.next_desc)
        self.publish(head)
        return head

    def _descs(
        self, table: int, parts: list[tuple[int, int, bool]], first: int, flags: int = 0
    ) -> int:
        index = first
        for i, (gpa, length, writable) in enumerate(parts):
            last = i == len(parts) - 1
            f = flags | (DESC_WRITE if writable else 0) | (0 if last else DESC_NEXT)
            nxt = (index + 1) % (self.size if table == self.desc else len(parts))
            self._w(table + 16 * index, struct.pack("<QIHH", gpa, length, f, 0 if last else nxt))
            index = nxt
        if table == self.desc:
            self.next_desc = index
        return first

    def publish(self, head: int) -> None:
        self._w(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._w(self.avail + 2, struct.pack("<H", self.avail_idx))

    def skip_to(self, idx: int) -> None:
        """The rings as after `idx` chains made available and used (mod 2^16), in guest RAM
        and in the driver's own counts: near the 16-bit wrap, where no driver gets in a
        unit test's time (its device restored there: queue_at())."""
        self._w(self.avail + 2, struct.pack("<H", idx))
        self._w(self.used + 2, struct.pack("<H", idx))
        self.avail_idx = self.seen_used = idx

    def set_used_event(self, value: int) -> None:
        self._w(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def set_avail_flags(self, flags: int) -> None:
        self._w(self.avail, struct.pack("<H", flags))

    def used_idx(self) -> int:
        return int(self.ram.u16(self.used + 2))  # type: ignore[attr-defined]

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, written) entries the device added since the last call."""
        out = []
        end = self.used_idx()
        while self.seen_used != end:
            slot = self.used + 4 + 8 * (self.seen_used % self.size)
            out.append(struct.unpack("<II", self.ram.read(slot, 8)))  # type: ignore[attr-defined]
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out


def queue_at(state: S, queue: int, idx: int) -> S:
    """A virtio device's saved `state` with queue `queue` as after `idx` chains taken and
    returned (mod 2^16): the device's side of Ring.skip_to()."""
    queues = list(state.queues)  # type: ignore[attr-defined]
    queues[queue] = replace(queues[queue], last_avail=idx, used_idx=idx)
    return replace(state, queues=tuple(queues))


def iter_caps(read: object) -> Iterator[tuple[int, int]]:
    """(offset, cap id) of each capability, walking the list from 0x34."""
    at = read(0x34, 1)  # type: ignore[operator]
    seen = 0
    while at and seen < 48:
        yield at, read(at, 1)  # type: ignore[operator]
        at = read(at + 1, 1)  # type: ignore[operator]
        seen += 1
