"""WriteBehind: guest writes to the registers a device model declares write-behind
(ModelDescriptor.write_behind) cost no exit. KVM keeps them in its ring of coalesced writes
(native/coalesced.py) and the monitor delivers them later, in order, several to a message.

Why. A polled 8250 driver makes two exits a byte: an LSR read, which the device's register
mirror answers in the monitor (monitor/mirror.py), and a THR write, posted to the device,
whose send wakes the device. Held, the write costs neither: the next LSR read counts it
against the device's THR credit, and up to HELD_BATCH writes go to the device in one write
(one wake-up).

The ring is the VM's; the monitor moves what it holds into one queue per device (collect)
and hands each queue to its device under that device's own lock (serving, flush), so a device that
is slow to take its writes (restarting, or hostile) holds up only accesses to itself.

When held writes reach the device; each rule keeps the device's view what it would be had
every write exited:

* Before any other access of that device's port window by any vCPU is served
  (VcpuThread._handle_exit): the access comes after every write the guest made before it.
  One exception, the point of all this: a read that the device's register mirror answers
  exactly with the held writes counted (RegisterMirror.answer: the credit the device gives
  for writes at that offset covers them), while every held write of that device is at one
  offset and fewer than HELD_BATCH wait. Such a read is one the device need not see (the
  mirror's rules), so it may come before them. Accesses to other devices do not wait:
  posted writes to two device processes were never ordered with each other.
* Before a vCPU parks (a pause; a snapshot quiesces the devices once every vCPU has parked,
  so no write is left held), and when the VM ends (close(), before the devices' last sync).
* Within about two ticks otherwise: while armed, a flusher thread looks every TICK_S and
  delivers what waited since its last look, so a guest that writes and then runs without
  touching the device (or halts in the kernel's irqchip) has its bytes out, and sees their
  interrupts, about a millisecond later. So write-behind suits registers of drivers that
  poll: the model says when (ModelDescriptor.write_behind_while: the 8250 while IER has THRI
  off and LCR's DLAB is clear; a driver that waits for the THRE interrupt gets its writes
  served as they come, as before).

Arming. KVM tells nobody when it adds to the ring, so something has to look, and looking
every TICK_S for an idle VM's whole life would be wake-ups for nothing. The registers start
unregistered: a write to one exits as any write does, is served, and arms write-behind if
the device's mirror says its model wants it now (KVM_REGISTER_COALESCED_MMIO, ~75 us here
with the guest running, on that vCPU's thread); the flusher disarms it after IDLE_TICKS
looks that found nothing new, or once the model no longer wants it (the unregister waits out
a grace period, ~8 ms here, on the flusher's thread; a write exit meanwhile does not wait to
arm again), and delivers what came meanwhile. The model's wish is read from its latest
MIRROR, which may trail the driver's last write by a frame: a hint for when to hold writes,
never an answer to the guest.

A full ring makes the next write exit: it is served after the device's held writes, as any
access is. What KVM does with a `rep outs` that fills the ring part-way depends on the host
kernel: Linux 6.0 and later drop the rest of it (x86.c emulator_pio_in_out), earlier ones
send the whole string to user space as well, so that the held part would be delivered
twice; so the monitor arms write-behind only on Linux 6.0 or later (MIN_KERNEL). A guest
that writes an 8250's THR with `rep outsb`, blind, loses the part of the string (KVM
emulates it a page at a time) that does not fit in the ring's 169 entries, as the chip loses
what overflows its 16-byte FIFO. A host whose KVM cannot coalesce port writes (no
KVM_CAP_COALESCED_PIO) gets no write-behind: the writes exit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from splitvmm.errors import KvmError
from splitvmm.native.coalesced import CoalescedRing
from splitvmm.native.kvm import VmFd
from splitvmm.protocol.models import condition_holds
from splitvmm.record import Struct

log = logging.getLogger("splitvmm.writebehind")

# How often an armed flusher looks at the ring. It delivers what waited since its last look
# and a vCPU did not deliver meanwhile: a held write waits at most two ticks.
TICK_S = 0.001
IDLE_TICKS = 50  # looks that found nothing new before it disarms (50 ms without such a write)
# A read the mirror could answer delivers the held writes instead, on the vCPU's own thread,
# once this many wait: the flusher's deliveries take the GIL from the vCPUs.
HELD_BATCH = 32
WISH_TICKS = 16  # how often the flusher asks whether the models still want write-behind
MIN_KERNEL = (6, 0)  # a `rep outs` that fills the ring is not also sent to user space
MAX_PIO_SIZE = 4  # bytes of the widest port access (`outl`)


class HeldWriter(Protocol):
    """What a device's slot offers for its held writes (monitor/slot.py)."""

    name: str

    def read_held(self, offset: int, size: int, held: int, held_at: int) -> bytes | None: ...
    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None: ...
    def mirrored_values(self, offsets: Sequence[int]) -> list[bytes] | None: ...


class Zone(Struct, frozen=True):
    """One write-behind register: ports [port, port + size) of the device whose port window
    is [base, base + window); wanted while every condition of `when` holds of its mirror
    (none: always)."""

    port: int
    size: int
    device: HeldWriter
    base: int
    window: int
    when: tuple[tuple[int, int, int], ...] = ()  # (mirrored offset, mask, value) each


class _Held:
    """One device's writes taken from the ring and not yet delivered."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.writes: list[tuple[int, bytes]] = []
        self.offset: int | None = None  # the offset every write is at; None: several
        self.lock = threading.Lock()  # one delivery at a time, and accesses wait for it
        self.deliveries = 0


class _Serving:
    """WriteBehind.serving()'s access: its device's lock, held until the block ends; `with`
    gives the mirror's answer (None: none)."""

    __slots__ = ("_lock", "_answer")

    def __init__(self, lock: threading.Lock, answer: bytes | None) -> None:
        self._lock, self._answer = lock, answer

    def __enter__(self) -> bytes | None:
        return self._answer

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def kernel_holds_rep_outs_once(release: str) -> bool:
    """Whether a host kernel of this release (os.uname().release) sends no write of a `rep
    outs` both to the ring and to user space (the module docstring)."""
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_KERNEL


class WriteBehind:
    def __init__(
        self,
        vm: VmFd,
        ring: CoalescedRing,
        zones: Sequence[Zone],
        fail: Callable[[str], None],
        tick_s: float = TICK_S,
        idle_ticks: int = IDLE_TICKS,
    ) -> None:
        """`fail`: stops the VM when the flusher cannot go on (a monitor bug)."""
        self._vm, self._ring, self._zones = vm, ring, tuple(zones)
        self._fail = fail
        self._by_port = {z.port + i: z for z in self._zones for i in range(z.size)}
        self._held = {id(z.device): _Held(z) for z in self._zones}
        # each registered port: its device's queue and the port's offset in the window
        self._queue_of = {
            port: (self._held[id(z.device)], port - z.base) for port, z in self._by_port.items()
        }
        # With one port registered in all (an 8250's THR), every write in the ring is that
        # queue's, at that offset: a read counts them where they are, and they are taken from
        # the ring when delivered or at the flusher's tick, not at each read (serving()).
        self._sole = next(iter(self._queue_of.values())) if len(self._queue_of) == 1 else None
        # every port of every such device's window, and the ports below it from which a port
        # access (4 bytes at most) runs into it, whose part there the bus gives the device
        # (monitor/bus.py): an access at one of them waits for its writes
        self._window = {
            port: self._held[id(z.device)]
            for z in self._zones
            for port in range(z.base - MAX_PIO_SIZE + 1, z.base + z.window)
        }
        self.ports = frozenset(self._window)
        self.write_ports = frozenset(self._by_port)  # a write exit here may arm
        self._tick_s, self._idle_ticks = tick_s, idle_ticks
        self._ring_lock = threading.Lock()  # the ring, and every device's queue
        self._cond = threading.Condition()  # armed, closing, broken
        self.armed = False  # read without the lock by vCPUs: a stale False asks arm(), a no-op
        self._closing = False
        self._broken = False  # KVM refused a zone: write-behind stays as it is
        # Writes to the other registers of the windows, counted: the model's wish may change
        # with each. A wish declined at a count is not asked again (a round with the device's
        # channel) until the count moves.
        self._wish_changes = 0
        self._declined_at = -1
        self.collected = 0  # writes taken from the ring
        self._thread = threading.Thread(target=self._flusher, name="write-behind", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the vCPUs' side ---------------------------------------------------------------------
    def serving(self, port: int, size: int | None = None) -> _Serving:
        """An exit at `port`, of a device's window (in `ports`), served inside (`with`): the
        device's held writes go first, and no held write goes to it until the access is
        served (one another vCPU made meanwhile, which a read answered from the mirror
        counted as coming before this access, must not come after it). With `size`, a read
        of `size` bytes: the mirror's answer if exact with the held writes counted (then
        nothing is delivered), else None.

        Nothing held for the device (the ring and its queue empty, looked at under the
        ring's lock, which the flusher holds while it moves writes from one to the other) is
        the common case, a forwarded read's: then nothing is collected or delivered, and
        the access only holds the device's lock. A class, not @contextmanager: its
        generator cost each forwarded read ~0.5 us more here (a vCPU's exits run on cold
        caches, where it is more: bench/exit_rtt.py)."""
        held = self._window[port]
        lock = held.lock
        lock.acquire()
        try:
            with self._ring_lock:
                idle = not held.writes and not self._ring.pending()
            answer = None
            if not idle:
                answer = self._answer_locked(held, port, size) if size is not None else None
                if answer is None:
                    self._deliver_locked(held)
        except BaseException:
            lock.release()
            raise
        return _Serving(lock, answer)

    def _answer_locked(self, held: _Held, port: int, size: int) -> bytes | None:
        """A read's answer from the mirror (serving()), `held`'s lock held."""
        sole = self._sole
        at: int | None
        with self._ring_lock:
            if sole is not None and sole[0] is held:
                count, at = len(held.writes) + self._ring.pending(), sole[1]
            else:
                self._collect_locked()
                count, at = len(held.writes), held.offset
        if 0 < count < HELD_BATCH and at is not None and port >= held.zone.base:
            return held.zone.device.read_held(port - held.zone.base, size, count, at)
        return None

    def flush(self) -> None:
        """Deliver every device's held writes (a vCPU about to park, the VM's end)."""
        for held in self._held.values():
            with held.lock:
                self._deliver_locked(held)

    def _collect(self) -> None:
        """Move what the ring holds to each device's queue, in order (the flusher's look)."""
        if not self._ring.pending():  # (a vCPU's own writes are in it by now)
            return
        with self._ring_lock:
            self._collect_locked()

    def _collect_locked(self) -> None:
        """collect(), the ring's lock held."""
        for port, data in self._ring.take():
            queue = self._queue_of.get(port)
            if queue is None:  # KVM holds only what we registered: not ours to deliver
                log.warning("a held write at port %#x that no device registered", port)
                continue
            held, offset = queue
            if not held.writes:
                held.offset = offset
            elif held.offset != offset:
                held.offset = None
            held.writes.append((offset, data))
            self.collected += 1

    def _deliver_locked(self, held: _Held) -> None:
        """Hand `held`'s queue to its device (its lock held: an access waits for this), with
        what the ring holds for it (a read may have counted them there: serving())."""
        with self._ring_lock:
            self._collect_locked()
            writes, held.writes = held.writes, []
        if writes:
            held.deliveries += 1
            held.zone.device.write_many(writes)

    def arm(self, port: int) -> None:
        """A write at `port` (in `write_ports`) exited, on a vCPU's thread after it was served:
        hold the next ones, if the device's model wants it now. A zone KVM refuses leaves
        write-behind as it is for the VM, with a warning."""
        if self._broken or self._declined_at == self._wish_changes:
            return
        zone = self._by_port[port]
        changes = self._wish_changes  # (a write that changes it meanwhile makes us ask again)
        wish = self._wish(zone)
        if wish is not True:
            if wish is False:  # not again until the driver writes another register
                self._declined_at = changes
            return
        if not self._cond.acquire(blocking=False):
            return  # the flusher is disarming (a grace period): the next write asks again
        try:
            if self.armed or self._broken or self._closing:
                return
            for z in self._zones:
                try:
                    self._vm.register_coalesced_pio(z.port, z.size)
                except KvmError as e:
                    log.warning("write-behind off: %s", e)
                    self._broken = True  # (zones registered so far stay: still served)
                    break
                self.armed = True  # the flusher delivers for what is registered
            self._cond.notify_all()
        finally:
            self._cond.release()

    def written(self, port: int) -> None:
        """A write exit at `port`, of a device's window (in `ports`), was served (a vCPU's
        thread): one to a write-behind register arms it; one to another register may have
        changed what the model wants (the 8250's IER), so the next arm() asks again."""
        if port in self.write_ports:
            if not self.armed:
                self.arm(port)
        else:
            self._wish_changes += 1

    def _wish(self, zone: Zone) -> bool | None:
        """Whether the zone's model wants write-behind now, by its device's latest MIRROR (one
        for every condition: the 8250's offset 1 means IER or DLM by the LCR beside it);
        None: no answer now (no MIRROR yet, as after a restart, or the device not live)."""
        if not zone.when:
            return True
        values = zone.device.mirrored_values([offset for offset, _, _ in zone.when])
        if values is None:
            return None
        return all(
            condition_holds(current, mask, value)
            for current, (_, mask, value) in zip(values, zone.when, strict=True)
        )

    # -- the flusher ---------------------------------------------------------------------------
    def _flusher(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a monitor bug: held writes would wait for ever
            log.exception("write-behind's flusher failed")
            self._fail(f"write-behind: internal error: {e!r}")

    def _serve(self) -> None:
        idle = ticks = 0
        seen = {key: (-1, False) for key in self._held}
        last_collected = self.collected
        while True:
            with self._cond:
                while not self.armed and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._cond.wait(self._tick_s)  # a close wakes it at once
            self._collect()
            for key, held in self._held.items():
                waiting = bool(held.writes)
                if waiting and seen[key] == (held.deliveries, True):  # waited a whole tick
                    with held.lock:
                        self._deliver_locked(held)
                seen[key] = (held.deliveries, bool(held.writes))
            if self.collected != last_collected:
                idle, last_collected = 0, self.collected
            else:
                idle += 1
            ticks += 1
            # the model's wish, from the device's mirror (a round with its channel): now and
            # then; meanwhile what it holds still goes out within two ticks
            unwanted = ticks % WISH_TICKS == 0 and any(self._wish(z) is False for z in self._zones)
            if idle >= self._idle_ticks or unwanted:
                self._disarm()
                idle = 0

    def _disarm(self) -> None:
        with self._cond:
            if not self.armed or self._broken:
                return  # (broken: a zone may be left registered, so the flusher stays on)
            for zone in self._zones:
                try:
                    self._vm.unregister_coalesced_pio(zone.port, zone.size)
                except KvmError as e:
                    log.warning("write-behind: %s", e)
                    self._broken = True
            if self._broken:
                return
            self.armed = False
        self.flush()  # what KVM held before the zones went

    def close(self) -> None:
        """Stop the flusher and deliver what is left (every vCPU thread has ended). The
        flusher may be in a delivery to a slow device: its own deadlines bound the wait."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
