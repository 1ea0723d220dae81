"""Host addresses of mappings, for KVM memory slots (hva never leaves native/)."""

from __future__ import annotations

import mmap

from splitvmm.native._kvm import ffi


def mapping_address(mapping: mmap.mmap, offset: int = 0) -> int:
    """The host virtual address of `mapping[offset]`.

    SAFETY: the address is only valid while `mapping` stays open; callers hand it
    to KVM for a memory slot whose lifetime is bounded by the mapping's owner
    (GuestMemory closes the mapping only after the VM fd is closed).
    """
    buf = ffi.from_buffer(mapping)
    return int(ffi.cast("uintptr_t", buf)) + offset
