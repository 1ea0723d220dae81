"""virtio-rng (virtio 1.2 5.4): one request queue whose writable buffers the device fills
with random bytes from the host kernel (getrandom(2), never blocking once the pool is up).
No feature bits of its own and no configuration space."""

from __future__ import annotations

import os
from typing import ClassVar

from splitvmm.devprocs.base import register
from splitvmm.devprocs.virtio.pci import VirtioPciDevice
from splitvmm.devprocs.virtio.queue import Chain
from splitvmm.devprocs.virtio.state import VirtioPciState

VIRTIO_ID_RNG = 4
# A request may ask for a lot (a chain of up to queue-size buffers): fill it a slice at a
# time, so a hostile driver cannot make the device allocate more than this at once.
MAX_SLICE = 64 << 10


class VirtioRngState(VirtioPciState, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1


@register
class VirtioRng(VirtioPciDevice):
    NAME = "virtio-rng"
    WINDOW = 0x6000
    State = VirtioRngState
    DEVICE_ID = VIRTIO_ID_RNG
    CLASS_CODE = 0xFF0000  # unclassified device

    def handle(self, queue: int, chain: Chain) -> int:
        written = 0
        for gpa, length in chain.writable:
            for at in range(0, length, MAX_SLICE):
                n = min(MAX_SLICE, length - at)
                self.ram.write(gpa + at, os.getrandom(n))
                written += n
        return written
