"""Linux's native AIO (io_setup(2), io_submit(2), io_getevents(2)) for reads and writes on an
O_DIRECT fd: a virtio-blk device puts the guest's requests in flight on the disk together
and takes their completions as they come (QEMU's aio=native does the same).

On an O_DIRECT fd a request is queued to the disk by io_submit and the call returns; on any
other fd the kernel does the whole transfer inside io_submit, so this module is for O_DIRECT
fds only. The buffers are memoryviews (guest RAM, in place): each stays exported until its
request completes, so nothing can unmap or resize what the kernel writes into.

A process that ends with requests in flight waits for them in the kernel (exit_aio), so once
a device's process is gone, none of its writes can land after a successor's. The launcher
waits up to ORPHAN_WAIT_S (sandbox/launcher.py) for that before it reports the end, and says
when the process still ran (a disk stalled for longer); the monitor then starts no successor
for a device that holds a disk image (monitor/slot.py restart()): it fails for good. A
context is never destroyed: it goes with the process, as its requests do.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from splitvmm.native._sys import ffi, lib

PREADV: int = lib.IOCB_CMD_PREADV
PWRITEV: int = lib.IOCB_CMD_PWRITEV


class AioContext:
    """One AIO context with room for `depth` requests in flight. Each request is named by a
    caller's token (any int), which its completion gives back with the result: bytes moved,
    or -errno."""

    def __init__(self, depth: int) -> None:
        handle = ffi.new("aio_context_t *")
        if lib.sv_io_setup(depth, handle) < 0:
            err = ffi.errno
            raise OSError(err, f"io_setup({depth})")
        self._ctx = handle[0]
        self.depth = depth
        self._events = ffi.new("struct io_event[]", depth)
        # token -> what the kernel points into while the request is in flight: the iocb,
        # its iovec array, and the buffers' cffi handles (each keeps its buffer exported)
        self._in_flight: dict[int, tuple[Any, ...]] = {}

    def __len__(self) -> int:
        return len(self._in_flight)

    def submit(self, token: int, op: int, fd: int, offset: int, buffers: Sequence[Any]) -> None:
        """Queue one PREADV or PWRITEV of `buffers` at `offset` (OSError if the kernel
        refuses it: nothing is in flight then)."""
        if token in self._in_flight or len(self._in_flight) >= self.depth:
            raise ValueError(f"AIO request {token}: a token in flight, or no room")
        handles = [ffi.from_buffer(buf) for buf in buffers]
        iov = ffi.new("struct iovec[]", len(handles))
        for entry, handle, buf in zip(iov, handles, buffers, strict=True):
            entry.iov_base = handle
            entry.iov_len = len(buf)
        iocb = ffi.new("struct iocb *")
        iocb.aio_data = token
        iocb.aio_lio_opcode = op
        iocb.aio_fildes = fd
        iocb.aio_buf = int(ffi.cast("uintptr_t", iov))
        iocb.aio_nbytes = len(handles)  # for the vectored commands: the iovec count
        iocb.aio_offset = offset
        batch = ffi.new("struct iocb *[1]", [iocb])
        if lib.sv_io_submit(self._ctx, 1, batch) != 1:
            err = ffi.errno
            raise OSError(err, f"io_submit(offset={offset}, {len(handles)} buffers)")
        self._in_flight[token] = (iocb, iov, handles)

    def wait(self, least: int = 1, timeout_ns: int | None = None) -> list[tuple[int, int]]:
        """Block until at least `least` requests (at most those in flight) completed, or
        `timeout_ns` passed (None: no limit); each completion as (token, result). EINTR is
        retried (with the whole timeout again)."""
        least = min(least, len(self._in_flight))
        if not self._in_flight:
            return []
        limit = -1 if timeout_ns is None else timeout_ns
        while True:
            n = lib.sv_io_getevents(self._ctx, least, self.depth, self._events, limit)
            if n >= 0:
                break
            err = ffi.errno
            if err != errno.EINTR:  # (EINTR: a signal's handler ran; wait again)
                raise OSError(err, "io_getevents")
        done = []
        for event in self._events[0:n]:
            token = int(event.data)
            self._in_flight.pop(token, None)
            done.append((token, int(event.res)))
        return done
