"""OwnedFd: the one shape of an object that owns a file descriptor (a KVM fd, an eventfd, a
seccomp listener): it closes it once, and is a context manager."""

from __future__ import annotations

import os
from typing import Self


class OwnedFd:
    """An owned fd, closed once, usable as a context manager."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
