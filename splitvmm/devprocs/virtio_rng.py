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
# The most one request gets. The device MAY use less than the whole buffer (5.4.6), and a
# chain may ask for up to 4 GiB (descriptors may overlap, so any guest can): filled whole,
# one such request held the event loop, heartbeat included, for seconds. Linux asks for 64
# bytes at a time (drivers/char/hw_random/virtio-rng.c), QEMU's default period gives 1 KiB.
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
        """Random bytes into the writable buffers, in order, MAX_SLICE at most: the count
        the device got. The driver uses len bytes (5.4.6.1), so a short getrandom (a signal
        during a large read) ends the chain there rather than counting bytes never written
        (2.7.8)."""
        written = 0
        for gpa, length in chain.writable:
            want = min(length, MAX_SLICE - written)
            data = os.getrandom(want)
            self.ram.write(gpa, data)
            written += len(data)
            if len(data) < want or written == MAX_SLICE:
                return written
        return written
