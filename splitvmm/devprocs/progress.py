"""What a device's processes keep for each other, where one's death does not take it (fd
role `progress`, FdKind.PROGRESS: a memfd page the monitor makes once per device; each
process of the device gets the same one): its queues' progress (virtio-console, each way),
a latched error (virtio-blk), and which used rings the device wrote (every virtio device).

The monitor learns a device's checkpoints only when it reads the device's channel (around
its own requests, and the heartbeat's ping once a second), and what the device had queued
on its side dies with it: the checkpoint a restart starts from may be older than the last
completion the guest sees in its used ring. What a restart must know, and that checkpoint
cannot say, is where in the output stream the chain at the used ring's idx starts. So
the device writes it here, (used idx, output count), before the used idx says so; the
process started after its crash reads it (the record of the used idx it finds in guest
RAM).

The same holds for input: a restart must drop from the input it replays what the dead
process had delivered, and the receive used entries since the checkpoint say how much only
while fewer than a ring's worth completed (bulk input through 8-byte INPUT frames completes
hundreds between two checkpoints the monitor reads). So the receive queue has records of its
own, (used idx, input count: the bytes delivered so far), in a second pair of slots (stream
RECEIVE, past the host-I/O flag); transmit's are stream TRANSMIT.

Two slots a stream: the record of used idx u lives in slot u % 2, so writing the next idx's
record never overwrites the current one's. Each record is (used idx, count, crc32 of both): one
pwrite(2), which SIGKILL does not cut short, and the crc turns away a page that holds no
record yet or that a compromised process scribbled on. pwrite, not a mapping: CPython's
mmap keeps a dup of the fd, which the sandbox closes and the channel's socket then reuses,
and the mapping's finalizer would close the channel.

A host-I/O flag, byte PROGRESS_HOST_IO_BYTE (protocol/models.py), past the slots: 1 while the device is inside a host I/O call
that may block for long (a disk's read, write or sync: virtio-blk), 0 otherwise. The
monitor reads it when a request to the device misses its deadline (monitor/channel.py): a
device waiting on its disk is slow, not hung, and is waited for rather than failed, as QEMU
and crosvm wait for theirs (a frozen file system, a slow NFS server, a large sync). It is a
byte store in a mapping, not a pwrite: it is set and cleared around every such call (~40 ns
against ~1-2 us a request). A compromised device may set it for good, and only its own
guest waits for it then, as it would for a device that answered but served nothing.

A third slot holds a latched error: a nonzero code (crc'd the same way) that a device
records once, before the guest can see its effect, and that every later process of the
device reads back. virtio-blk latches a failed write-back there (its fdatasync's errno):
the kernel reports such a failure once per open file, and the restarted process shares the
dead one's, so it would otherwise answer the next FLUSH with OK. A latch made in doubt
(the record's count 1) is one a process made before a question whose answer only it would
have heard, and takes back once the answer is that nothing failed: found by the next process,
it stands, since what its maker may have heard is lost with it.

Past the receive records, a byte per virtqueue (RINGS_AT, MAX_QUEUES of them): 1 once the
device wrote the used ring header of the queue's ring (virtio/pci.py _start_ring), 0 while
the ring it was enabled on has none of the device's yet (Bus Master Enable was clear). A
restart cannot tell from guest RAM whether the dead process applied a set of the bit whose
sync it never answered: the stale idx a driver left in a ring the device never wrote reads
like the idx of one it wrote and served chains from. The byte tells. It is stored after the
header and before any chain is served, so a byte of 1 means every used idx in that ring is
the device's. Byte stores in a mapping, as the host-I/O flag (no syscall, which virtio-rng's
and virtio-net's policies lack): a store is whole once made, and a process that dies leaves
those it made in the page.

Past those, at VECTORS_AT (protocol/models.py PROGRESS_VECTORS_AT), a byte per MSI-X vector:
1 while the device would send the vector's message, 0 while MSI-X is off, the function or
the vector is masked, Bus Master Enable is clear, or the monitor has not routed the message
the entry holds now (refused, or not answered yet: the route still holds an older message, or
none) (virtio/msix.py stores each change). The byte before them is 1 while MSI-X Enable is
set: the monitor then raises no INTx for the dead device (PCI 3.0 6.8.2.3). The
monitor reads them (pread) for a device it leaves dead, whose vectors it signals so that a
waiting driver looks at the device: only those a live device could have sent. A compromised
device may store 1s, and its own guest gets interrupts it could have sent it anyway.
"""

from __future__ import annotations

import os
import struct
import zlib

from splitvmm.errors import StateError
from splitvmm.native.mem import map_shared_page
from splitvmm.protocol.models import (
    PROGRESS_HOST_IO_BYTE,
    PROGRESS_MAX_VECTORS,
    PROGRESS_MSIX_ENABLED_BYTE,
    PROGRESS_VECTORS_AT,
)

RECORD = struct.Struct("<QQ")  # used idx, output (or input) count
CRC = struct.Struct("<I")
SLOT = RECORD.size + CRC.size
LATCH = RECORD.size  # the latched error's slot: (code, 0) in a record of its own
HOST_IO = PROGRESS_HOST_IO_BYTE  # the host-I/O flag, past two progress slots and the latch
TRANSMIT, RECEIVE = 0, 1  # the streams: where each pair of slots starts
# A transmit record's count is signed, stored modulo 2**64: after a restore, the chain at the
# used idx may start before the new line's count 0 (the snapshotted VM's line took part of it)
COUNT_MOD, SIGNED_FROM = 1 << 64, 1 << 63
STREAM_AT = (0, HOST_IO + 8)  # receive's pair was added past the flag, where the page had room
RINGS_AT = STREAM_AT[RECEIVE] + 2 * SLOT  # a byte per virtqueue: its used ring was written
MAX_QUEUES = 64  # virtqueues the page has a byte for
VECTORS_AT = PROGRESS_VECTORS_AT  # a byte per MSI-X vector: it may fire (the module docstring)
SIZE = VECTORS_AT + PROGRESS_MAX_VECTORS  # what the page must hold


class Progress:
    """The records in the device's progress memfd. Made before the sandbox (Device.setup);
    what the process before this one left is read when the device is restored (records()),
    not at set-up: a warm spare (monitor/slot.py) runs its set-up long before the crash it
    takes over from."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < SIZE:
            raise StateError(f"progress memfd: {size} bytes, {SIZE} needed")
        self.fd = fd
        self._page: memoryview | None = None  # mapped once, for the process's life

    def write(self, used_idx: int, count: int, stream: int = TRANSMIT) -> None:
        """Record that the chain at `used_idx` starts at output count `count` (TRANSMIT), or
        that `count` input bytes were delivered before it (RECEIVE)."""
        record = RECORD.pack(used_idx, count % COUNT_MOD)
        os.pwrite(self.fd, _sealed(record), STREAM_AT[stream] + (used_idx % 2) * SLOT)

    def latch(self, code: int, in_doubt: bool = False) -> None:
        """Latch a nonzero error `code`: every later process of the device reads it back.
        `in_doubt`: latched only in case this process dies before it knows whether it must
        be, taken back by unlatch() once it knows it need not."""
        if code <= 0:
            raise ValueError(f"latch: {code} is no error code")
        os.pwrite(self.fd, _sealed(RECORD.pack(code, int(in_doubt))), 2 * SLOT)

    def unlatch(self) -> None:
        """Take back a latch made in doubt (latch(in_doubt=True)); no other is ever taken
        back."""
        os.pwrite(self.fd, _sealed(RECORD.pack(0, 0)), 2 * SLOT)

    def latched(self) -> int:
        """The latched error code, or 0 where none was latched (or the slot holds no record:
        a compromised process may scribble on the page, but only over its own device's)."""
        return self._latch()[0]

    def latched_in_doubt(self) -> bool:
        """Whether the latch was made in doubt by a process that died before it knew."""
        code, in_doubt = self._latch()
        return bool(code and in_doubt)

    def _latch(self) -> tuple[int, int]:
        """The latch slot's (code, in doubt), (0, 0) where it holds no record."""
        slot = os.pread(self.fd, SLOT, 2 * SLOT)
        record = slot[:LATCH]
        if len(slot) < SLOT or zlib.crc32(record) != CRC.unpack_from(slot, LATCH)[0]:
            return 0, 0
        code, in_doubt = RECORD.unpack(record)
        return code, in_doubt

    def host_io_flag(self) -> memoryview:
        """The page's host-I/O flag, writable: map it before the sandbox; it stays mapped for
        the process's life (native/mem.py map_shared_page: no dup of the fd for the sandbox
        to close)."""
        return self._mapped()[HOST_IO : HOST_IO + 1]

    def rings_written(self) -> memoryview:
        """The page's byte per virtqueue (the module docstring), writable; mapped as the
        host-I/O flag is."""
        return self._mapped()[RINGS_AT : RINGS_AT + MAX_QUEUES]

    def vectors_unmasked(self) -> memoryview:
        """The page's byte per MSI-X vector (the module docstring), writable; mapped as the
        host-I/O flag is."""
        return self._mapped()[VECTORS_AT:SIZE]

    def msix_enabled_flag(self) -> memoryview:
        """The page's MSI-X Enable byte (protocol/models.py PROGRESS_MSIX_ENABLED_BYTE),
        writable; mapped as the host-I/O flag is."""
        at = PROGRESS_MSIX_ENABLED_BYTE
        return self._mapped()[at : at + 1]

    def _mapped(self) -> memoryview:
        if self._page is None:
            self._page = map_shared_page(self.fd, SIZE)
        return self._page

    def records(self, stream: int = TRANSMIT) -> dict[int, int]:
        """used idx -> count, of the stream's slots whose crc holds (pread64 on this fd: the
        device's policy allows it, as it allows pwrite64)."""
        page = os.pread(self.fd, SIZE, 0)
        found: dict[int, int] = {}
        for at in (STREAM_AT[stream], STREAM_AT[stream] + SLOT):
            record = page[at : at + RECORD.size]
            (crc,) = CRC.unpack_from(page, at + RECORD.size)
            if len(record) == RECORD.size and zlib.crc32(record) == crc:
                used_idx, count = RECORD.unpack(record)
                signed = stream == TRANSMIT and count >= SIGNED_FROM
                found[used_idx] = count - COUNT_MOD if signed else count
        return found


def _sealed(record: bytes) -> bytes:
    """A record and its crc32: one slot, written with one pwrite."""
    return record + CRC.pack(zlib.crc32(record))


assert 3 * SLOT <= HOST_IO < STREAM_AT[RECEIVE], "the host-I/O flag lies between the records"
assert RINGS_AT + MAX_QUEUES <= PROGRESS_MSIX_ENABLED_BYTE < VECTORS_AT, "past the rings'"
