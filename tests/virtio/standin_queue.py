"""Test-only stand-in for splitvmm/devprocs/virtio/queue.py (written on another branch):
a plain split virtqueue (virtio 1.2 2.7) with the contract's API and its main checks;
installed by tests/conftest.py only while the real module is missing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splitvmm.devprocs.virtio.guestram import GuestRam

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1


class QueueError(Exception):
    """A hostile or broken ring."""


@dataclass
class Chain:
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class SplitQueue:
    def __init__(
        self, ram: GuestRam, size: int, desc: int, avail: int, used: int,
        event_idx: bool, indirect: bool,
    ) -> None:  # fmt: skip
        if not 0 < size <= 32768 or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 up to 32768")
        if desc % 16 or avail % 2 or used % 4:
            raise QueueError("misaligned ring")
        ram.check(desc, 16 * size)
        ram.check(avail, 6 + 2 * size)
        ram.check(used, 6 + 8 * size)
        self.ram, self.size, self.desc, self.avail, self.used = ram, size, desc, avail, used
        self.event_idx, self.indirect = event_idx, indirect
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0  # used_idx at the last needs_notification()

    def pop(self) -> Chain | None:
        avail_idx = self.ram.u16(self.avail + 2)
        if (avail_idx - self.last_avail) & 0xFFFF > self.size:
            raise QueueError("avail idx moved by more than the queue size")
        if avail_idx == self.last_avail:
            return None
        head = self.ram.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        if head >= self.size:
            raise QueueError(f"head {head} >= size {self.size}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = Chain(head)
        self._walk(chain, self.desc, self.size, head, nested=False)
        return chain

    def _walk(self, chain: Chain, table: int, size: int, index: int, nested: bool) -> None:
        for _ in range(size):
            d = table + 16 * index
            addr, length = self.ram.u64(d), self.ram.u32(d + 8)
            flags, nxt = self.ram.u16(d + 12), self.ram.u16(d + 14)
            if flags & DESC_F_INDIRECT:
                if nested or not self.indirect or flags & DESC_F_NEXT or length % 16 or not length:
                    raise QueueError("bad indirect descriptor")
                self._walk(chain, addr, length // 16, 0, nested=True)
                return
            self.ram.check(addr, length)
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise QueueError("readable descriptor after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return
            if nxt >= size:
                raise QueueError(f"next {nxt} >= {size}")
            index = nxt
        raise QueueError("descriptor chain loops")

    def push(self, head: int, written: int) -> None:
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        self.ram.write_u32(slot, head)
        self.ram.write_u32(slot + 4, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.ram.write_u16(self.used + 2, self.used_idx)

    def needs_notification(self) -> bool:
        old, new = self._signalled, self.used_idx
        self._signalled = new
        if self.event_idx:
            event = self.ram.u16(self.avail + 4 + 2 * self.size)
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.ram.u16(self.avail) & AVAIL_F_NO_INTERRUPT

    def enable_notifications(self) -> None:
        if self.event_idx:
            self.ram.write_u16(self.used + 4 + 8 * self.size, self.last_avail)

    def state(self) -> dict[str, Any]:
        return {"last_avail": self.last_avail, "used_idx": self.used_idx}
