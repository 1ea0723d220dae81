"""The driver's side of a split virtqueue in a fake guest memory, for device-side tests (as
vm-virtio's MockSplitQueue and Firecracker's VirtQueue): descriptors, avail ring, used ring."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from splitvmm.devprocs.virtio.guestram import GuestRam
from splitvmm.devprocs.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)

DESC = struct.Struct("<QIHH")
RAM_SIZE = 0x10_0000  # 1 MiB of fake guest RAM at gpa 0
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x8_0000, 0x9_0000  # rings for queues up to 16384
DATA_GPA = 0xC_0000  # where tests put buffers and indirect tables


def fake_ram(size: int = RAM_SIZE) -> GuestRam:
    """Flat guest RAM [0, size) over bytearrays."""
    return GuestRam.from_buffers(bytearray(size), bytearray(4096), [[0, size, 0]])


def descriptor(addr: int, length: int, flags: int = 0, next_: int = 0) -> bytes:
    return DESC.pack(addr, length, flags, next_)


def chain(
    buffers: Sequence[tuple[int, int, bool]], first: int = 0, modulo: int = 1 << 16
) -> list[bytes]:
    """Descriptors for (gpa, len, device-writable) buffers at indices first, first + 1, ...
    (modulo `modulo`), each but the last chained to the next."""
    out = []
    for i, (gpa, length, writable) in enumerate(buffers):
        last = i + 1 == len(buffers)
        flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
        out.append(descriptor(gpa, length, flags, 0 if last else (first + i + 1) % modulo))
    return out


class DriverQueue:
    """A driver that lays chains out in the descriptor table and makes them available."""

    def __init__(self, ram: GuestRam, size: int, event_idx: bool = False) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.avail_idx = 0
        self.next_free = 0  # the next descriptor add() takes

    def device(self, indirect: bool = False, max_chain: int | None = None) -> SplitQueue:
        """The device's view of this queue."""
        return SplitQueue(
            self.ram, self.size, DESC_GPA, AVAIL_GPA, USED_GPA, self.event_idx, indirect, max_chain
        )

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.ram.write(DESC_GPA + DESC.size * index, descriptor(addr, length, flags, next_))

    def add(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Chain (gpa, len, device-writable) buffers in free descriptors; the head."""
        head = self.next_free
        for desc in chain(buffers, head, self.size):
            self.ram.write(DESC_GPA + DESC.size * self.next_free, desc)
            self.next_free = (self.next_free + 1) % self.size
        return head

    def add_indirect(self, table_gpa: int, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """One descriptor pointing at an indirect table of the buffers; the head."""
        data = b"".join(chain(buffers))
        self.ram.write(table_gpa, data)
        head = self.next_free
        self.set_desc(head, table_gpa, len(data), VIRTQ_DESC_F_INDIRECT)
        self.next_free = (head + 1) % self.size
        return head

    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then move avail idx past them."""
        for head in heads:
            slot = AVAIL_GPA + 4 + 2 * (self.avail_idx % self.size)
            self.ram.write_u16(slot, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write_u16(AVAIL_GPA + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write_u16(AVAIL_GPA, flags)

    def set_used_event(self, value: int) -> None:
        self.ram.write_u16(AVAIL_GPA + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return self.ram.u16(USED_GPA + 2)

    def used_flags(self) -> int:
        return self.ram.u16(USED_GPA)

    def used_elem(self, slot: int) -> tuple[int, int]:
        """(id, len) of used ring entry `slot`."""
        return self.ram.u32(USED_GPA + 4 + 8 * slot), self.ram.u32(USED_GPA + 8 + 8 * slot)

    def avail_event(self) -> int:
        return self.ram.u16(USED_GPA + 4 + 8 * self.size)
