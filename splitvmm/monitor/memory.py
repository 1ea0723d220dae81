"""Guest RAM: one memfd, sealed so nobody can shrink or grow it, mapped in the monitor.

Device processes get the same memfd and map it themselves, so virtqueue data
never passes through the monitor. The seal matters: a device that could
ftruncate() the memfd would make the monitor's mapping fault (SIGBUS).
"""

from __future__ import annotations

import fcntl
import mmap
import os

from splitvmm.errors import SplitvmmError
from splitvmm.monitor.layout import ram_ranges
from splitvmm.native.mem import GuestMemoryError, GuestMemoryView, Region

__all__ = ["SEALS", "GuestMemory", "GuestMemoryError", "Region"]

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class GuestMemory(GuestMemoryView):
    """The guest's RAM as one sealed memfd, split into regions around the PCI hole."""

    def __init__(self, size: int, name: str = "guest-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as e:
            os.close(self.fd)
            if isinstance(e, OSError):  # ENOMEM: `ulimit -v` below vm.memory, ...
                raise SplitvmmError(
                    f"cannot map {size >> 20} MiB of guest RAM: {e.strerror or e}"
                ) from None
            raise
        regions, offset = [], 0
        for gpa, length in ram_ranges(size):
            regions.append(Region(gpa, length, offset))
            offset += length
        super().__init__(mapping, regions)

    def close(self) -> None:
        super().close()
        os.close(self.fd)
