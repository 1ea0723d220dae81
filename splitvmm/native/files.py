"""File operations the standard library lacks: fallocate(2) with a mode (a virtio-blk
device's discard and write-zeroes punch holes in, or zero ranges of, its disk image)."""

from __future__ import annotations

from splitvmm.native._sys import ffi, lib

FALLOC_FL_KEEP_SIZE: int = lib.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE: int = lib.FALLOC_FL_PUNCH_HOLE  # needs KEEP_SIZE with it
FALLOC_FL_ZERO_RANGE: int = lib.FALLOC_FL_ZERO_RANGE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError (EOPNOTSUPP where the file system cannot) naming the call."""
    if lib.sv_fallocate(fd, mode, offset, length) < 0:
        err = ffi.errno
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length})")
