"""The split virtqueue (virtio 1.2 2.7), device side: pure logic over a GuestRam.

Every value read from guest memory is hostile: indices, addresses, lengths, flags and chain
shapes are checked before use, and the work one pop() does is bounded (at most `size`
direct descriptors walked, and `max_chain` in a chain: the device's largest queue size), as
are the chains in flight (the driver has `size` descriptors: a device loop that pops until
it has enough is bounded too). A ring that breaks a rule raises QueueError; the transport
then sets DEVICE_NEEDS_RESET.

Memory ordering (virtio 1.2 2.7.13): this runs on x86-64, where stores are seen in program
order and loads are not reordered with other loads (TSO), and CPython performs each guest
access as its own load or store through the mapping, in program order. So "used ring entry
before used idx" and "avail idx before the ring entry it covers" need no barrier. A store
followed by a load of another location may be reordered, though, and two places need that
order (the driver's side of each has its own full barrier): publishing avail_event (or
clearing VIRTQ_USED_F_NO_NOTIFY) before re-reading avail idx, and publishing used idx before
reading used_event (or avail flags). full_fence() gives that order.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping, Sequence

from splitvmm.devprocs.virtio.guestram import U16, GuestRam, GuestRamError, RamWindow
from splitvmm.errors import SplitvmmError, StateError, shown
from splitvmm.record import Struct, field

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # virtio 1.2 2.7
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4  # virtio 1.2 2.7, table "Virtqueue Part"
DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len
RING_HEADER = 4  # flags u16, idx u16 before the ring of both avail and used
MAX_CHAIN_BYTES = 0xFFFF_FFFF  # a chain's buffers together: the used ring's len is a u32
U16_MASK = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = (1 << 64) - 1
_DESC_AT = (DESC.unpack_from, DESC.size)  # bound once: _collect runs for every descriptor

_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (x86 mfence's effect): taking and giving back a lock runs locked
    read-modify-write instructions (lock cmpxchg/xadd in glibc's sem_* or CPython's mutex),
    and every locked instruction orders all earlier loads and stores before all later ones."""
    with _FENCE:
        pass


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio 1.2 2.7.10: notify if `event` lies in [old, new), modulo 2^16 (Linux's
    vring_need_event)."""
    return (new - event - 1) & U16_MASK < (new - old) & U16_MASK


class QueueError(SplitvmmError):
    """A hostile or broken ring: the device goes NEEDS_RESET."""


class Chain(Struct):
    head: int  # descriptor index to return in the used ring
    readable: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len) driver->device
    writable: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len) device->driver


Descriptor = tuple[int, int, int, int]  # struct virtq_desc: addr, len, flags, next


class SplitQueue:
    """One enabled split virtqueue: takes available chains, returns used ones."""

    STATE_KEYS = (
        "size",
        "desc",
        "avail",
        "used",
        "event_idx",
        "indirect",
        "last_avail",
        "used_idx",
    )

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        desc: int,
        avail: int,
        used: int,
        event_idx: bool,
        indirect: bool,
        max_chain: int | None = None,
    ) -> None:
        """Addresses and size as the driver set them (common cfg): checked here. `max_chain`:
        the most descriptors a chain may have, the device's (2.7.4.1: a device MAY limit
        them); None: `size`. A driver may make a queue smaller than the device's to save
        memory (4.1.4.3) and still send, through an indirect table, the chains the device's
        own limits allow (virtio-blk's seg_max): Linux and QEMU bound an indirect chain
        only by its table, and so would a driver written from the spec."""
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        self.max_chain = max(size, max_chain or size)
        event_bytes = 2 if event_idx else 0  # used_event / avail_event
        self._ram = ram
        self.size = size
        self.desc, self._desc = self._part(desc, "descriptor table", DESC_ALIGN, DESC.size * size)
        avail_bytes, used_bytes = 4 + 2 * size + event_bytes, 4 + 8 * size + event_bytes
        self.avail, self._avail = self._part(avail, "avail ring", AVAIL_ALIGN, avail_bytes)
        self.used, self._used = self._part(used, "used ring", USED_ALIGN, used_bytes)
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0  # next avail ring index to take (wraps at 2^16)
        self.used_idx = 0  # the device's used idx (wraps at 2^16)
        self._notify = True  # whether the driver should kick (avail_event kept current)
        self._signalled: int | None = None  # used_idx at the last needs_notification()

    def _part(self, gpa: int, name: str, align: int, size: int) -> tuple[int, RamWindow]:
        """The part's gpa and its window: every later access is an offset into the window
        (bounded by its view), not a new look-up of a guest address."""
        if gpa % align:
            raise QueueError(f"{name} address {gpa:#x} is not {align}-byte aligned")
        try:
            return gpa, self._ram.window(gpa, size)
        except GuestRamError as e:
            raise QueueError(f"{name} {gpa:#x}+{size:#x} is not in RAM") from e

    # -- driver -> device ----------------------------------------------------------------
    def avail_idx(self) -> int:
        return int(U16.unpack_from(self._avail.view, 2)[0])

    def pop(self) -> Chain | None:
        """The next available chain with every value checked, or None if there is none."""
        last, size = self.last_avail, self.size
        if self._available(U16.unpack_from(self._avail.view, 2)[0]) == 0:
            return None
        if (last - self.used_idx) & U16_MASK >= size:  # its `size` descriptors all held here
            raise QueueError(f"a chain made available with {size} chains in flight, the "
                             "queue's size: a head the device has not returned")  # fmt: skip
        # TSO: this load is not done before the avail idx load above (no barrier needed)
        slot = last % size
        head: int = U16.unpack_from(self._avail.view, RING_HEADER + 2 * slot)[0]
        if head >= size:
            raise QueueError(f"avail ring[{slot}] head {head} >= queue size {size}")
        chain = Chain(head, [], [])
        found = self._collect(chain, self._desc.view, size, head, None)
        if found is not None:  # the chain goes on, and ends, in the table it points at
            where, desc = found
            table = self._indirect_table(where, desc)
            self._collect(chain, table, len(table) // DESC.size, 0, where)
        self.last_avail = (last + 1) & U16_MASK
        if self.event_idx and self._notify:
            self._write_avail_event()
        return chain

    def ring_descriptors(self, head: int) -> int:
        """How many of the ring's descriptors the chain at `head` holds (an indirect table
        counts one): for a device waiting for more chains, whether the driver has any left
        to post. At most the queue's size, whatever the table holds now."""
        view, size, unpack_from = self._desc.view, self.size, DESC.unpack_from
        index, count = head, 0
        while count < size:
            _, _, flags, nxt = unpack_from(view, DESC.size * index)
            count += 1
            if flags & VIRTQ_DESC_F_INDIRECT or not flags & VIRTQ_DESC_F_NEXT or nxt >= size:
                break
            index = nxt
        return count

    def _available(self, avail_idx: int) -> int:
        """The chains avail idx makes available past last_avail; QueueError if more than the
        queue holds (2.7: a driver has `size` descriptors), whichever way avail idx moved."""
        pending = (avail_idx - self.last_avail) & U16_MASK
        if pending > self.size:
            raise QueueError(
                f"avail idx {avail_idx} is {pending} entries past last_avail "
                f"{self.last_avail}, more than queue size {self.size}"
            )
        return pending

    def unpop(self, count: int) -> None:
        """Give back the last `count` chains pop() took, unserved: pop() takes them again.
        For a device that took more buffers than it used (a frame shorter than the receive
        buffers it was read into), so that taken = completed still holds between events."""
        if not 0 <= count <= (self.last_avail - self.used_idx) & U16_MASK:
            raise ValueError(f"unpop of {count} chains, more than are in flight")
        self.last_avail = (self.last_avail - count) & U16_MASK
        if count and self.event_idx and self._notify:
            self._write_avail_event()

    def _collect(
        self, chain: Chain, table: memoryview | bytes, count: int, index: int, outer: str | None
    ) -> tuple[str, Descriptor] | None:
        """Add the buffers of the chain from descriptor `index` of `table` (`count` entries:
        the ring's, or the indirect table `outer` points at) to `chain`, each checked; the
        first INDIRECT descriptor met in the ring, with its name, for pop() to follow. One
        loop for both tables, every check inline: this runs for every descriptor served."""
        readable, writable, check = chain.readable, chain.writable, self._ram.offset
        total = sum(length for _, length in readable + writable) if outer else 0
        prefix = "" if outer is None else f"{outer} indirect "
        taken, limit, unpack_from, step = len(readable) + len(writable), self.max_chain, *_DESC_AT
        start, end = self._ram.last_range()  # inside it: RAM, without a call per descriptor
        for _ in range(count):  # a chain longer than the table is a loop
            desc = unpack_from(table, step * index)
            addr, length, flags, nxt = desc
            if flags & VIRTQ_DESC_F_INDIRECT:
                if outer is None:
                    return f"descriptor {index}", desc
                raise QueueError(f"{prefix}descriptor {index} is INDIRECT inside an indirect table")
            if taken >= limit:
                raise QueueError(f"chain of head {chain.head} has more than {limit} "
                                 f"descriptors at {prefix}descriptor {index}")  # fmt: skip
            if not start <= addr <= end - length:  # else the full look-up: another range?
                try:
                    check(addr, length)  # (the offset itself is not needed here)
                except GuestRamError as e:
                    raise QueueError(f"{prefix}descriptor {index} addr {addr:#x} len "
                                     f"{length:#x} is not in RAM") from e  # fmt: skip
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"chain of head {chain.head} is over 4 GiB at {prefix}"
                                 f"descriptor {index}")  # fmt: skip
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"{prefix}descriptor {index} is device-readable after a "
                                 "device-writable descriptor")  # fmt: skip
            else:
                readable.append((addr, length))
            taken += 1
            if not flags & VIRTQ_DESC_F_NEXT:
                return None
            if nxt >= count:
                what = "queue" if outer is None else "indirect table"
                raise QueueError(f"{prefix}descriptor {index} next {nxt} >= {what} size {count}")
            index = nxt
        if outer is None:
            raise QueueError(f"chain of head {chain.head} loops (longer than queue size {count})")
        raise QueueError(f"{outer} indirect chain loops (longer than its {count} descriptors)")

    def _indirect_table(self, where: str, desc: Descriptor) -> memoryview:
        """virtio 1.2 2.7.5.3: the table `desc` points at, checked, read in place as the
        ring's own table is: the walk reads each descriptor once as it reaches it and checks
        it before use, so a guest changing the table meanwhile changes nothing relied on.
        The table may hold more descriptors than the queue (a driver may keep tables sized
        for its largest request on a queue it made smaller); the chain in it may have
        `max_chain` at most."""
        addr, length, flags, _ = desc  # the WRITE flag here means nothing (2.7.5.3.2)
        if not self.indirect:
            raise QueueError(f"{where} is INDIRECT but VIRTIO_F_INDIRECT_DESC is off")
        if flags & VIRTQ_DESC_F_NEXT:
            raise QueueError(f"{where} has both INDIRECT and NEXT")
        if length == 0 or length % DESC.size:
            raise QueueError(
                f"{where} indirect table len {length:#x} is not a non-zero multiple of 16"
            )
        try:
            return self._ram.buffer(addr, length, writable=False)
        except GuestRamError as e:
            raise QueueError(f"{where} indirect table {addr:#x}+{length:#x} is not in RAM") from e

    # -- device -> driver ----------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain `head` with `written` bytes written to its writable buffers: the used
        ring entry, then used idx (TSO keeps the stores in this order for the driver)."""
        if (self.last_avail - self.used_idx) & U16_MASK == 0:
            raise ValueError(f"push of head {head} with no chain in flight")
        if not 0 <= head < self.size or not 0 <= written <= U32_MAX:
            raise ValueError(f"push of head {head} written {written} is out of range")
        entry = RING_HEADER + USED_ELEM.size * (self.used_idx % self.size)
        view = self._used.view  # two stores, then one dirty mark for both
        view[entry : entry + USED_ELEM.size] = USED_ELEM.pack(head, written)
        self.used_idx = (self.used_idx + 1) & U16_MASK
        view[2:4] = U16.pack(self.used_idx)
        self._used.mark()

    def push_together(self, used: Sequence[tuple[int, int]]) -> None:
        """Return several chains as one (virtio 1.2 5.1.6.4.1: a merged receive frame's
        buffers): every used ring entry, then used idx once, so that a driver never sees
        some of them without the others."""
        if len(used) > (self.last_avail - self.used_idx) & U16_MASK:
            raise ValueError(f"push of {len(used)} chains, more than are in flight")
        view, idx = self._used.view, self.used_idx
        for head, written in used:
            if not 0 <= head < self.size or not 0 <= written <= U32_MAX:
                raise ValueError(f"push of head {head} written {written} is out of range")
            entry = RING_HEADER + USED_ELEM.size * (idx % self.size)
            view[entry : entry + USED_ELEM.size] = USED_ELEM.pack(head, written)
            idx = (idx + 1) & U16_MASK
        self.used_idx = idx
        view[2:4] = U16.pack(idx)
        self._used.mark()

    def needs_notification(self) -> bool:
        """After pushes: whether to interrupt the driver (virtio 1.2 2.7.10). Nothing pushed
        since the last call: no. With EVENT_IDX, if used_event lies in the entries pushed
        since; without it, unless avail flags say VIRTQ_AVAIL_F_NO_INTERRUPT."""
        old, new = self._signalled, self.used_idx
        self._signalled = new
        full_fence()  # used idx is visible before used_event / avail flags are read
        if old is None:
            return True  # the first since a (re)start: what the driver saw is unknown
        if self.event_idx:
            used_event = U16.unpack_from(self._avail.view, RING_HEADER + 2 * self.size)[0]
            return vring_need_event(used_event, new, old)
        flags = U16.unpack_from(self._avail.view, 0)[0]
        return new != old and not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (while the device is busy taking chains anyway)."""
        self._notify = False
        if not self.event_idx:
            self._used.write(0, U16.pack(VIRTQ_USED_F_NO_NOTIFY))

    def enable_notifications(self, beyond: int = 0) -> bool:
        """Ask the driver to kick for the next chain; True if chains arrived meanwhile (pop
        them: a kick for them may have been skipped before the request was seen). `beyond`:
        that many chains are available and left there (a device that needs more than they
        hold): the kick is asked for the next one after them, and True means more came."""
        self._notify = True
        if self.event_idx:
            self._write_avail_event((self.last_avail + beyond) & U16_MASK)
        else:
            self._used.write(0, U16.pack(0))
        full_fence()  # the request is visible before avail idx is read again
        return self._available(self.avail_idx()) > beyond

    def _write_avail_event(self, event: int | None = None) -> None:
        """Kick when the driver makes entry `event` (last_avail) available (2.7.10)."""
        event = self.last_avail if event is None else event
        self._used.write(RING_HEADER + USED_ELEM.size * self.size, U16.pack(event))

    # -- restarts and snapshots ----------------------------------------------------------
    def fresh(self) -> None:
        """The driver just enabled this queue: nothing is used yet, and the used ring in
        guest RAM says so (flags, idx and avail_event 0, as the device's own count is). A
        driver need not zero it (Linux does), and a crash restart takes the queue up from
        that idx (resume_from_used): a stale one made the restarted device skip requests
        the driver had made available, and the driver took old entries for their
        completions. The next needs_notification() then applies the spec's rule rather than
        answer yes to be safe, as after a restore or restart."""
        self._used.write(0, bytes(RING_HEADER))  # flags and idx
        if self.event_idx:
            self._write_avail_event()  # at last_avail: 0
        self._signalled = self.used_idx

    def resume_from_used(self) -> None:
        """After the device process restarted: take up again from the used ring's idx in
        guest memory, so an in-order device re-runs exactly the chains it had not returned."""
        self.used_idx = int(U16.unpack_from(self._used.view, 2)[0])
        self.last_avail = self.used_idx
        self._signalled = None

    def state(self) -> dict[str, int | bool]:
        return {key: getattr(self, key) for key in self.STATE_KEYS}

    @classmethod
    def from_state(cls, ram: GuestRam, state: Mapping[str, object]) -> SplitQueue:
        """A queue from state(): every field checked (StateError), as untrusted input."""
        if set(state) != set(cls.STATE_KEYS):
            raise StateError(f"queue state keys {shown(sorted(state))} are not {cls.STATE_KEYS}")
        size = _state_int(state, "size", MAX_QUEUE_SIZE)
        desc, avail, used = (_state_int(state, k, U64_MAX) for k in ("desc", "avail", "used"))
        event_idx, indirect = _state_bool(state, "event_idx"), _state_bool(state, "indirect")
        last_avail = _state_int(state, "last_avail", U16_MASK)
        used_idx = _state_int(state, "used_idx", U16_MASK)
        try:
            queue = cls(ram, size, desc, avail, used, event_idx, indirect)
        except QueueError as e:
            raise StateError(f"queue state: {e}") from e
        if (last_avail - used_idx) & U16_MASK > queue.size:
            raise StateError(
                f"queue state last_avail {last_avail} is more than size {queue.size} "
                f"past used_idx {used_idx}"
            )
        queue.last_avail, queue.used_idx = last_avail, used_idx
        return queue


def _state_int(state: Mapping[str, object], key: str, limit: int) -> int:
    value = state[key]
    if type(value) is not int or not 0 <= value <= limit:
        raise StateError(f"queue state {key} {shown(value)} is not an int in 0..{limit:#x}")
    return value


def _state_bool(state: Mapping[str, object], key: str) -> bool:
    value = state[key]
    if type(value) is not bool:
        raise StateError(f"queue state {key} {shown(value)} is not a bool")
    return value
