"""WriteBehind: guest writes to the registers a device model declares write-behind
(ModelDescriptor.write_behind) cost no exit. KVM keeps them in its ring of coalesced writes
(native/coalesced.py) and the monitor delivers them later, in order, several to a message.

Why. A polled 8250 driver makes two exits a byte: an LSR read, which the device's register
mirror answers in the monitor (monitor/mirror.py), and a THR write, posted to the device,
whose ZeroMQ send wakes the I/O threads of both sides. Held, the write costs neither: the
next LSR read counts it against the device's THR credit, and a hundred writes or so go to
the device as the parts of one message.

When held writes reach the device; each rule keeps the device's view what it would be had
every write exited:

* Before any other exit is served, by whichever vCPU takes it (VcpuThread._handle_exit):
  any access, to any device, reaches its device after every write the guest made before it.
  One exception, the point of all this: a read that the device's register mirror answers
  exactly with the held writes counted (RegisterMirror.answer: the credit the device gives
  for writes at that offset covers them), while every held write is that device's, at one
  port. Such a read is one the device need not see (the mirror's rules), so it may come
  before them.
* Before a vCPU parks (a pause; a snapshot quiesces the devices once every vCPU has parked,
  so no write is left in the ring) and when a vCPU thread ends (the VM's last output).
* Within TICK_S otherwise: while armed, a flusher thread looks at the ring every TICK_S, so a
  guest that writes and then runs without exits (or halts in the kernel's irqchip) has its
  bytes out, and sees their interrupts, about a millisecond later.

Arming. KVM tells nobody when it adds to the ring, so something has to look, and looking
every TICK_S for an idle VM's whole life would be wake-ups for nothing. So the registers start
unregistered: the first write to one exits as any write does, is served, and arms
write-behind (KVM_REGISTER_COALESCED_MMIO, a few us, on that vCPU's thread); the flusher
disarms it after IDLE_TICKS looks that found nothing (the unregister waits out a grace period
of ~8 ms, on the flusher's thread) and delivers what came meanwhile.

A full ring makes the next write exit: it is served after the ring's writes, as any exit is.
A host whose KVM cannot coalesce port writes (no KVM_CAP_COALESCED_PIO) gets no write-behind:
the writes exit, as they did before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from splitvmm.errors import KvmError
from splitvmm.native.coalesced import CoalescedRing
from splitvmm.native.kvm import VmFd
from splitvmm.record import Struct

log = logging.getLogger("splitvmm.writebehind")

# How often an armed flusher looks at the ring. It delivers what waited since its last look
# (what a vCPU did not take meanwhile): a held write waits at most two ticks.
TICK_S = 0.001
IDLE_TICKS = 50  # looks that found nothing before it disarms (50 ms without such a write)
# A read the mirror could answer delivers the held writes instead, on the vCPU's own thread,
# once this many wait: the flusher's deliveries take the GIL from the vCPUs.
HELD_BATCH = 32
CLOSE_WAIT_S = 5.0


class HeldWriter(Protocol):
    """What a device's slot offers for its held writes (monitor/slot.py)."""

    name: str

    def read_held(self, offset: int, size: int, held: int, held_at: int) -> bytes | None: ...
    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None: ...


class Zone(Struct, frozen=True):
    """One write-behind register: ports [port, port + size) of the device whose port window
    is [base, base + window)."""

    port: int
    size: int
    device: HeldWriter
    base: int
    window: int


class WriteBehind:
    def __init__(
        self,
        vm: VmFd,
        ring: CoalescedRing,
        zones: Sequence[Zone],
        tick_s: float = TICK_S,
        idle_ticks: int = IDLE_TICKS,
    ) -> None:
        self._vm, self._ring, self._zones = vm, ring, tuple(zones)
        self._by_port = {z.port + i: z for z in self._zones for i in range(z.size)}
        self.ports = frozenset(self._by_port)  # a write exit here arms (VcpuThread)
        self._only_port = next(iter(self.ports)) if len(self.ports) == 1 else None
        self._tick_s, self._idle_ticks = tick_s, idle_ticks
        self._lock = threading.Lock()  # one taker of the ring at a time, delivery included
        self._cond = threading.Condition()  # armed, closing, broken
        self.armed = False  # read without the lock by vCPUs: a stale False re-arms, a no-op
        self._closing = False
        self._broken = False  # KVM refused a zone: no write-behind for this VM
        self.delivered = 0  # writes taken from the ring and handed to their devices
        self._thread = threading.Thread(target=self._flusher, name="write-behind", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def pending(self) -> bool:
        """Whether KVM holds writes (without the lock: a vCPU asks at every exit)."""
        return self._ring.pending() != 0

    def read(self, port: int, size: int) -> bytes | None:
        """A read exit at `port` while writes are held: the device's mirror answer, if every
        held write is that device's, at one port, and the mirror is exact with them counted;
        None: deliver them first (flush), then read as usual."""
        with self._lock:
            if self._only_port is not None:  # (no need to look at the entries)
                held: tuple[int, int] | None = (self._ring.pending(), self._only_port)
            else:
                held = self._ring.one_port()
            if held is None or not 0 < held[0] < HELD_BATCH:
                return None
            count, at = held
            zone = self._by_port.get(at)
            if zone is None or not zone.base <= port < zone.base + zone.window:
                return None
            return zone.device.read_held(port - zone.base, size, count, at - zone.base)

    def flush(self) -> None:
        """Deliver every held write, in the order made; one message for each run of writes
        to one device."""
        with self._lock:
            writes = self._ring.take()
            device: HeldWriter | None = None
            run: list[tuple[int, bytes]] = []
            for port, data in writes:
                zone = self._by_port.get(port)
                if zone is None:  # KVM holds only what we registered: not ours to deliver
                    log.warning("a held write at port %#x that no device registered", port)
                    continue
                if zone.device is not device and run:
                    self._deliver(device, run)
                    run = []
                device = zone.device
                run.append((port - zone.base, data))
            if run:
                self._deliver(device, run)

    def _deliver(self, device: HeldWriter | None, run: list[tuple[int, bytes]]) -> None:
        assert device is not None
        self.delivered += len(run)
        device.write_many(run)

    def arm(self) -> None:
        """A write at one of `ports` exited (a vCPU's thread, after serving it): hold the
        next ones. A zone KVM refuses turns write-behind off for the VM, with a warning."""
        with self._cond:
            if self.armed or self._broken or self._closing:
                return
            done: list[Zone] = []
            try:
                for zone in self._zones:
                    self._vm.register_coalesced_pio(zone.port, zone.size)
                    done.append(zone)
            except KvmError as e:
                log.warning("write-behind off: %s", e)
                self._broken = True
                if self._unregister(done):
                    return
            self.armed = True  # (a zone left registered: the flusher keeps delivering)
            self._cond.notify_all()

    def _flusher(self) -> None:
        idle, last_oldest = 0, -1
        while True:
            with self._cond:
                while not self.armed and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._cond.wait(self._tick_s)  # a close wakes it at once
            oldest = self._ring.oldest()
            if not self.pending():
                idle += 1
            elif oldest == last_oldest:  # waiting since the last look: deliver them
                self.flush()
                idle = 0
            else:  # new since the last look, or a vCPU takes them: look again next tick
                idle = 0
            last_oldest = self._ring.oldest()
            if idle >= self._idle_ticks:
                self._disarm()
                idle = 0

    def _disarm(self) -> None:
        with self._cond:
            if not self.armed or self._broken or not self._unregister(self._zones):
                return  # (broken: a zone may be left registered, so the flusher stays on)
            self.armed = False
        self.flush()  # what KVM held before the zones went

    def _unregister(self, zones: Sequence[Zone]) -> bool:
        """Whether KVM let go of every zone in `zones`."""
        ok = True
        for zone in zones:
            try:
                self._vm.unregister_coalesced_pio(zone.port, zone.size)
            except KvmError as e:
                log.warning("write-behind: %s", e)
                self._broken, ok = True, False
        return ok

    def close(self) -> None:
        """Stop the flusher and deliver what is left (every vCPU thread has ended)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)
        self.flush()
