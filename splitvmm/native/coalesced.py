"""KVM's coalesced port writes: the ring in which KVM keeps a guest's writes to the ports
the monitor registered (VmFd.register_coalesced_pio), instead of exiting for each.

KVM appends each such write, as it happens, to one ring per VM, a page shared with user
space that every vCPU's mmap shows at the page KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)
names; the guest runs on without an exit. User space takes the entries from `first` up to
`last` and moves `first` on; once the ring is full, the next write to such a port exits as
any other does (Linux api.rst, KVM_REGISTER_COALESCED_MMIO; QEMU takes its ring the same
way, kvm_flush_coalesced_mmio_buffer).

One limit of the kernel's: a `rep outs` that fills the ring part-way through is cut short
(Linux 6.0 and later drop the rest of the chunk KVM emulates, up to a page; earlier kernels
send all of it to user space too): monitor/writebehind.py says what the monitor does about it.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

from splitvmm.native._kvm import ffi, lib

# The ring's layout (struct kvm_coalesced_mmio_ring, <linux/kvm.h>): first and last, then
# the entries (struct kvm_coalesced_mmio: the address, the length, pio, the data).
ENTRIES_OFFSET: int = lib.SV_COALESCED_RING_ENTRIES_OFFSET
ENTRY_SIZE: int = lib.SV_COALESCED_ENTRY_SIZE
LEN_OFFSET: int = lib.SV_COALESCED_ENTRY_LEN_OFFSET
DATA_OFFSET: int = lib.SV_COALESCED_ENTRY_DATA_OFFSET
DATA_SIZE: int = lib.SV_COALESCED_ENTRY_DATA_SIZE
# One entry read with one call (a port write is taken per guest byte: the per-field reads cost
# ~1 us more each): the address (the first field), the length, and the data.
_ENTRY = struct.Struct(f"<Q{LEN_OFFSET - 8}xI{DATA_OFFSET - LEN_OFFSET - 4}x{DATA_SIZE}s")
if _ENTRY.size != ENTRY_SIZE:  # the address is not first, or the data not last
    raise ImportError(f"struct kvm_coalesced_mmio is {ENTRY_SIZE} bytes, not {_ENTRY.size}")


class CoalescedRing:
    """The VM's ring of coalesced writes, read through one vCPU's mapping. Its owner takes
    entries from one thread at a time (monitor/writebehind.py holds a lock around take())."""

    def __init__(self, mapping: mmap.mmap, page: int) -> None:
        """`mapping`: a vCPU's kvm_run mmap; `page`: the ring's page in it (the value of
        KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO))."""
        start = page * mmap.PAGESIZE
        if page <= 0 or start + mmap.PAGESIZE > len(mapping):
            raise ValueError(f"coalesced ring page {page} is outside the vCPU's mapping")
        # SAFETY: the mapping is its vCPU's (VcpuFd), unmapped only when that fd closes, after
        # every vCPU thread ended; the ring is read only by vCPU threads and the flusher,
        # which the machine stops before it (monitor/machine.py run()).
        self._buf: Any = ffi.from_buffer(mapping)
        self._view = memoryview(mapping)[start : start + mmap.PAGESIZE]
        # first and last as aligned 32-bit words: one load or store each. KVM writes an entry,
        # then (smp_wmb) `last`; we load `last`, then the entries, then store `first`: x86
        # keeps loads and stores in order, so that is enough here (another architecture would
        # want an acquire load of `last` and a release store of `first`)
        self._index: Any = ffi.cast("volatile uint32_t *", self._buf + start)
        self.size = (mmap.PAGESIZE - ENTRIES_OFFSET) // ENTRY_SIZE  # KVM_COALESCED_MMIO_MAX

    def pending(self) -> int:
        """How many writes wait in the ring."""
        return int(self._index[1] - self._index[0]) % self.size

    def take(self) -> list[tuple[int, bytes]]:
        """The writes waiting, oldest first, as (port, data); the ring has room for them again."""
        first, last = self._index[0], self._index[1]
        view, writes = self._view, []
        for i in self._span(first, last):
            port, length, data = _ENTRY.unpack_from(view, ENTRIES_OFFSET + i * ENTRY_SIZE)
            if not 0 < length <= DATA_SIZE:
                raise ValueError(f"coalesced write of {length} bytes at port {port:#x}")
            writes.append((port, data[:length]))
        self._index[0] = last
        return writes

    def _span(self, first: int, last: int) -> range | list[int]:
        if first >= self.size or last >= self.size:
            raise ValueError(f"coalesced ring indices {first}, {last} are not below {self.size}")
        if first <= last:
            return range(first, last)
        return [*range(first, self.size), *range(last)]

    def close(self) -> None:
        self._view.release()
        self._index = self._buf = None
