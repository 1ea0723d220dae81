"""virtio-blk (virtio 1.2 5.2): a disk image behind one request queue.

The image is the fd the monitor opened (role `disk`, read-only when the `readonly` option
is set): the device opens nothing. Its size, taken once at start, is the capacity in
512-byte sectors. Data moves between the file and guest RAM with preadv/pwritev straight
on views of guest memory (GuestRam.buffer), never through a copy.

A request is a header (type, reserved, sector: 16 bytes the driver wrote), data buffers,
then a status byte the device writes last (5.2.6): the last byte of the device-writable
part, however the driver split it into descriptors (2.7.4). The device serves IN, OUT,
FLUSH, GET_ID, DISCARD and WRITE_ZEROES (the last two once the driver accepted their
features); other types (and flags it does not know) get UNSUPP, a request past the end of the disk or a write to a read-only one IOERR. A failed
request's data buffers are zeroed, so that the used len (data + status) is true. A
malformed request (no room for the status byte, a header cut short) is the driver's to
fix: IOERR when there is a status byte to write, else the queue is hostile (NEEDS_RESET).

Direct I/O: an image opened with O_DIRECT (the `direct` option: no copy in the host's page
cache, as QEMU's cache=none) takes whole DIRECT_IO_ALIGN blocks at aligned addresses. A
request whose offset and buffers are all aligned (a page-cache driver's usual request) goes
straight between the file and guest RAM as any other; the rest goes through a bounce buffer
of the device's, a block-aligned span of the disk at a time, and a write that covers part
of a block reads that block first. The monitor checked the image's size and a first block.
Aligned reads and writes are started with Linux AIO (native/aio.py: QEMU's aio=native), up to
AIO_DEPTH at once, so the guest's requests in flight are on the disk together; they finish
as the disk completes them, and reach the used ring in the order they were taken (the
transport's Pending). Any other request waits for those in flight first, so a FLUSH covers
every write before it and a bounced write's read-modify-write never races one.

Write cache: VIRTIO_BLK_F_FLUSH is offered. A driver that accepts it gets write-back (the
page cache) and FLUSH as its fdatasync; one that does not gets stable writes, each synced
before it completes (5.2.6.2), as QEMU does.

A failed write-back is for good. When fdatasync fails, Linux has marked the pages it could
not write clean: the page cache no longer matches the disk, no later fdatasync tries them
again, and the failure is reported once per open file. So once a sync of a page-cache image
failed, every later FLUSH (and stable write) is IOERR, as QEMU's file-posix does
(page_cache_inconsistent), until the VM stops. The failure is latched in the device's
progress page (progress.py) before the guest sees its IOERR, so a process restarted after a
crash, which shares the dead one's open file, keeps failing too; a snapshot carries it
(flush_error). A process killed during a failing fdatasync (a SIGKILL from outside: the
wait for the disk cannot be interrupted) dies with the failure taken and nothing latched.
So the monitor also hands each process the image opened again (role `disk-errors`), once
for the VM's life: a description of its own, which has reported nothing, so the kernel still
tells it of every failure since the VM started. A restarted process's first sync asks it
(native/files.py wait_writeback, which starts no writes) before its own fdatasync, and a
failure there is latched as any other. That question takes its answer as the fdatasync
does, so a process killed inside it would lose the failure again: it latches EIO in doubt
before it asks, and takes it back once the answer is that nothing failed (progress.py).
So a kill during a question that would have found nothing fails the later FLUSHes too:
when in doubt, the guest is told its data may be lost, never that it is safe. An O_DIRECT
image has no page cache to lose, as QEMU also reasons.

A full host: a write (or discard, or write-zeroes) that meets ENOSPC or EDQUOT stalls the
device (the transport's stall(): the request waits, the monitor pauses the VM, and its next
resume tries the request again), so that a guest never reads an I/O error the operator
could have spared it by making room: QEMU's default (werror=enospc) does the same. With
the `on_full = "error"` option such a request is IOERR, as any other failure. A failed
FLUSH of a page-cache image never stalls: what it lost is lost (above), and the retry would
find the error latched.

A slow disk is not a hung device: each disk call that may block (_host_call) sets the
host-I/O flag in the progress page meanwhile, and the monitor waits for a device whose flag
is set past its requests' and the heartbeat's deadlines (monitor/channel.py). Without it, a
file system frozen for a host's backup failed the device after 2 s.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, NoReturn, Self, TypeVar

from splitvmm.devprocs.base import DeviceContext, register
from splitvmm.devprocs.faults import RequestFaults
from splitvmm.devprocs.progress import Progress
from splitvmm.devprocs.virtio.guestram import skip_bytes
from splitvmm.devprocs.virtio.pci import Pending, Stalled, VirtioPciDevice, log
from splitvmm.devprocs.virtio.queue import Chain, QueueError
from splitvmm.devprocs.virtio.state import VirtioPciState
from splitvmm.errors import ConfigError, StateError
from splitvmm.native import aio, files
from splitvmm.protocol import schema
from splitvmm.protocol.models import (
    BLK_ID_BYTES,
    BLK_SECTOR,
    DIRECT_IO_ALIGN,
    VIRTIO_BLK,
    blk_serial_problem,
)
from splitvmm.protocol.schema import Upgrade

VIRTIO_ID_BLOCK = 2
SECTOR = BLK_SECTOR
ID_BYTES = BLK_ID_BYTES  # VIRTIO_BLK_ID_BYTES

# feature bits (5.2.3)
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# request types and status (5.2.6)
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES = 8, 11, 13
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
WRITE_ZEROES_FLAG_UNMAP = 1
Segments = Sequence[tuple[int, int, int]]  # a DISCARD's or WRITE_ZEROES's (sector, sectors, flags)
# What an io-error fault's `on` calls each request type (protocol/faults.py); a type not here
# (GET_ID, one the device does not know) touches no disk, and no fault counts it.
FAULT_KIND = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write", VIRTIO_BLK_T_FLUSH: "flush",
              VIRTIO_BLK_T_DISCARD: "write", VIRTIO_BLK_T_WRITE_ZEROES: "write"}  # fmt: skip

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # discard / write zeroes: sector, num_sectors, flags
# struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4)
# capacity, size_max, seg_max; geometry; blk_size; topology; writeback, num_queues; discard;
# write zeroes
CONFIG = struct.Struct("<QII HBB I BBHI BxH III IIB3x")
SEG_MAX = 254  # data segments a request may have (queue size minus header and status)
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_SEGMENTS = 1  # discard / write zeroes segments per request
IOV_MAX = 1024  # preadv/pwritev take at most this many buffers at once
ZERO_CHUNK = 1 << 20  # zeros written (to the disk, or to guest buffers) this much at a time
# Read-only private anonymous memory: the kernel's zero page, page-aligned, so O_DIRECT can
# write it. Private: the zygote maps it once for every device it forks, and a shared mapping
# would let any of them (mprotect is allowed) change what every other writes as zeros.
ZEROS = memoryview(mmap.mmap(-1, ZERO_CHUNK, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
BOUNCE_BYTES = 1 << 20  # O_DIRECT: the bounce buffer for unaligned requests (see above)
AIO_DEPTH = 32  # O_DIRECT: requests in flight at once (a Linux guest keeps up to a queue's)
PUNCH_HOLE = files.FALLOC_FL_PUNCH_HOLE | files.FALLOC_FL_KEEP_SIZE  # the kernel wants both
# Without KEEP_SIZE: the process's RLIMIT_FSIZE (the image's size: sandbox/device.py) then
# binds it, where ZERO_RANGE|KEEP_SIZE could allocate blocks past the end unbounded
ZERO_RANGE = files.FALLOC_FL_ZERO_RANGE
MAX_ERRNO = 4095  # the kernel's errno values are below it
HOST_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write the operator can make room for: stall


T = TypeVar("T")


class RequestError(Exception):
    """A request the device answers with a status (IOERR or UNSUPP)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class BlkRequest(Pending):
    """An aligned read or write on an O_DIRECT image, in flight on the disk."""

    __slots__ = ("data_in", "offset", "status_gpa", "total", "views", "write")

    def __init__(
        self,
        write: bool,
        offset: int,
        views: list[memoryview],
        total: int,
        data_in: list[tuple[int, int]],
        status_gpa: int,
    ) -> None:
        super().__init__()
        self.write, self.offset, self.views, self.total = write, offset, views, total
        self.data_in, self.status_gpa = data_in, status_gpa


class VirtioBlkState(VirtioPciState, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 2
    capacity: Annotated[int, schema.Range(0, (1 << 54) - 1)] = 0  # sectors, when saved
    readonly: bool = False
    serial: Annotated[bytes, schema.MaxLen(ID_BYTES)] = b""
    # The errno of a failed write-back (v2; 0: none): every FLUSH fails (module docstring)
    flush_error: Annotated[int, schema.Range(0, MAX_ERRNO)] = 0
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {1: lambda f: {**f, "flush_error": 0}}


@register
class VirtioBlk(VirtioPciDevice):
    NAME = "virtio-blk"
    WINDOW = 0x6000
    State = VirtioBlkState
    DEVICE_ID = VIRTIO_ID_BLOCK
    CLASS_CODE = 0x018000  # mass storage controller, other
    POLL_NS = 32_000  # a driver keeps requests in flight: see _arrives_within()
    MAX_IN_FLIGHT = AIO_DEPTH  # only an O_DIRECT image's requests are ever in flight
    request_faults: RequestFaults  # it serves requests: always one (Device's may be None)

    def __init__(
        self,
        ctx: DeviceContext,
        readonly: bool = False,
        serial: bytes = b"",
        pause_when_full: bool = True,
    ) -> None:
        super().__init__(ctx)
        self.disk = ctx.fds["disk"]
        self.disk_errors = ctx.fds["disk-errors"]  # FdKind.DISK_ERRORS
        self.capacity = ctx.made("capacity", int, f"{self.NAME}: the disk's size is unknown")
        self.readonly = readonly
        self.serial = serial
        bounce, context = ctx.prepared.get("bounce"), ctx.prepared.get("aio")
        # None: the image is not opened with O_DIRECT, and any buffer will do
        self.bounce = memoryview(bounce) if isinstance(bounce, mmap.mmap) else None
        self.aio = context if isinstance(context, aio.AioContext) else None
        self._progress = ctx.made("progress", Progress, f"{self.NAME}: no progress page")
        self._host_io = ctx.made("host_io", memoryview, f"{self.NAME}: no host-I/O flag")
        self._host_io[0] = 0  # a process killed inside a disk call left it set: this one is not
        self.flush_error = 0  # a failed write-back's errno: see the module docstring
        # A restarted process's first sync asks disk_errors first (after_restart)
        self._errors_unasked = False
        # on_full (protocol/models.py): a write the host has no room for stalls the device
        self.pause_when_full = pause_when_full
        self._requests: dict[int, BlkRequest] = {}  # AIO token -> its request, in flight
        self._token = 0
        # ctl devices --json. The failures: io_errors, the host's disk calls that failed
        # (QEMU's failed_*_operations); failed_requests and unsupported_requests, what the
        # guest was answered IOERR (for the host's failure, its own request's, or an io-error
        # fault's: injected_errors, stats()) and UNSUPP
        self.counts = dict.fromkeys(("aio_requests", "bounced_requests", "io_errors",
                                     "failed_requests", "unsupported_requests"), 0)  # fmt: skip
        self.request_faults = RequestFaults(self.MAX_IN_FLIGHT)  # `ctl inject-fault NAME io-error`

    @classmethod
    def setup(cls, ctx: DeviceContext) -> None:
        """Guest RAM, the disk's size (in whole sectors) and, for an image the monitor opened
        with O_DIRECT (the fd says so), a page-aligned bounce buffer, before the sandbox."""
        super().setup(ctx)
        disk = ctx.fds["disk"]
        size = ctx.prepared["image_size"] = os.fstat(disk).st_size
        ctx.prepared["capacity"] = size // SECTOR
        progress = ctx.made("progress", Progress, f"{cls.NAME}: no progress page")
        ctx.prepared["host_io"] = progress.host_io_flag()
        if fcntl.fcntl(disk, fcntl.F_GETFL) & os.O_DIRECT:
            ctx.prepared["bounce"] = mmap.mmap(-1, BOUNCE_BYTES, flags=mmap.MAP_PRIVATE)

    @classmethod
    def setup_sandboxed(cls, ctx: DeviceContext) -> None:
        """An O_DIRECT image's AIO context, in the process that serves (a fork leaves a
        context behind); the seccomp filter refuses io_setup afterwards, so a device cannot
        take the host's AIO events (fs.aio-max-nr, shared by every process) for itself."""
        if "bounce" not in ctx.prepared:
            return
        try:
            ctx.prepared["aio"] = aio.AioContext(AIO_DEPTH)
        except OSError as e:  # the host's AIO events used up (EAGAIN), or no AIO at all
            log.warning("virtio-blk: no AIO context (%s): direct requests one at a time", e)

    @classmethod
    def from_options(cls, ctx: DeviceContext, options: Mapping[str, object]) -> Self:
        readonly, serial = _guest_options(options)
        size = ctx.made("image_size", int, "virtio-blk: the image's size is unknown")
        if size < SECTOR:  # a guest would see a disk of no sectors, and say nothing
            raise ConfigError(f"virtio-blk: the image is {size} bytes, less than one "
                              f"{SECTOR}-byte sector")  # fmt: skip
        if size % SECTOR:  # as Firecracker and Cloud Hypervisor say; QEMU rounds up instead
            log.warning("virtio-blk: the image's last %d bytes are no whole %d-byte sector: "
                        "the guest does not see them", size % SECTOR, SECTOR)  # fmt: skip
        return cls(
            ctx, readonly=readonly, serial=serial, pause_when_full=VIRTIO_BLK.pauses(options)
        )

    def check_options(self, options: Mapping[str, object]) -> None:
        readonly, serial = _guest_options(options)
        if serial != self.serial:
            raise ConfigError(
                f"virtio-blk: serial is {serial.decode()!r} in the config, "
                f"{self.serial.decode()!r} in the saved device the guest knows"
            )
        if readonly != self.readonly:
            raise ConfigError(
                f"virtio-blk: readonly is {str(readonly).lower()} in the config, "
                f"{str(self.readonly).lower()} in the saved device the guest knows"
            )

    @classmethod
    def from_state(cls, ctx: DeviceContext, state: Any) -> Self:
        if not state.serial.isascii():
            raise StateError("virtio-blk state: serial is not ASCII")
        # on_full is the host's policy, not the guest's: from this start's options
        device = cls(
            ctx,
            readonly=state.readonly,
            serial=state.serial,
            pause_when_full=VIRTIO_BLK.pauses(ctx.options),
        )
        if device.capacity < state.capacity and not ctx.restarted:
            raise StateError(
                f"virtio-blk state: the image has {device.capacity} sectors, fewer than the "
                f"{state.capacity} of the saved device: not the image it was saved with"
            )
        # The capacity is what the guest was told. An image grown since (or, under a crash
        # restart, shrunk: the dead process served the same file) keeps it: no resize is
        # announced, and a request past the file's end is IOERR, as it was.
        device.capacity = state.capacity
        if state.flush_error:
            device._latch_flush_error(state.flush_error)
        return device

    def after_restart(self) -> None:
        """A failed write-back the dead process latched after its last checkpoint fails
        this process's FLUSHes too (the module docstring), before any request is served; one
        it took with it unlatched is asked of disk_errors by this process's first sync."""
        latched = self._progress.latched()
        if latched and not self.flush_error:
            self.flush_error = min(latched, MAX_ERRNO)
            if self._progress.latched_in_doubt():  # nobody said why FLUSH fails from now on
                self._warn.warning(
                    "write-back", "%s: a process was killed while it asked the image for a "
                    "failed write-back, whose answer died with it: every later FLUSH fails",
                    self.NAME,
                )  # fmt: skip
        self._errors_unasked = not self.flush_error and self.bounce is None  # (read-only: _flush)
        super().after_restart()

    def model_fields(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "readonly": self.readonly,
            "serial": self.serial,
            "flush_error": self.flush_error,
        }

    def stats(self) -> dict[str, int]:
        # injected_errors: of failed_requests, those an io-error fault failed
        return {**super().stats(), **self.counts, "injected_errors": self.request_faults.injected}

    # -- what the driver sees ---------------------------------------------------------------
    def device_features(self) -> int:
        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.readonly:
            return features | VIRTIO_BLK_F_RO
        return features | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config_bytes(self) -> bytes:
        return CONFIG.pack(
            self.capacity, 0, SEG_MAX,  # capacity, size_max (unused), seg_max
            0, 0, 0,  # geometry: cylinders, heads, sectors (unused)
            SECTOR, 0, 0, 1, 0,  # blk_size, topology: exp, align, min_io, opt_io (unused)
            0, 1,  # writeback (unused), num_queues (without VIRTIO_BLK_F_MQ: unused)
            MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,  # discard: max sectors, max seg, alignment
            MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,  # write zeroes: max sectors, max seg, unmap
        )  # fmt: skip

    # -- requests --------------------------------------------------------------------------------
    def handle(self, queue: int, chain: Chain) -> int | Pending:
        # 2.7.4: no assumption about how the driver laid the request out: the status byte is
        # the last byte of the device-writable part, after any empty descriptors there.
        writable, last = chain.writable, len(chain.writable)
        while last and not writable[last - 1][1]:
            last -= 1
        if not last:
            raise QueueError("a block request without a status byte")
        gpa, length = writable[last - 1]
        status_gpa = gpa + length - 1
        data_in = (
            writable[: last - 1] if length == 1 else [*writable[: last - 1], (gpa, length - 1)]
        )
        try:
            kind, sector = self._header(chain.readable)
            # (a read, most requests, is admitted as it is: no call for it)
            segments = () if kind == VIRTIO_BLK_T_IN else self._admitted(kind, chain.readable)
            if self.request_faults.armed and self._injected(queue, kind):
                raise RequestError(VIRTIO_BLK_S_IOERR)  # as a failing disk: nothing reaches it
            if self.aio is not None:
                started = self._start(kind, sector, chain.readable, data_in, status_gpa)
                if started is not None:
                    return started
                self._settle()
            written = self._serve(kind, sector, chain.readable, data_in, segments)
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            written, status = 0, self._failed(e)
        return self._complete(data_in, written, status_gpa, status)

    def _admitted(self, kind: int, readable: list[tuple[int, int]]) -> Segments:
        """The checks that refuse a request whatever the disk does, before anything else:
        5.2.6.2's UNSUPPs come before any other, and a read-only disk refuses a write; a
        DISCARD's or WRITE_ZEROES's segments, read once (none for any other type). An io-error
        fault counts only a request they admit: a failing disk still knows which commands it
        has (QEMU's blkdebug sits under the device's own checks)."""
        segmented = kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)
        if segmented:
            self._negotiated(kind)
        if FAULT_KIND.get(kind) == "write":
            self._writable()
        if segmented:
            return self._segment_list(kind, skip_bytes(readable, HEADER.size))
        return ()

    def _injected(self, queue: int, kind: int) -> bool:
        """Whether the io-error fault fails the request just taken from `queue` (FAULT_KIND
        names its kind): its place there is the ring's count of chains taken (RequestFaults
        says why a place)."""
        ring = self.rings[queue]
        assert ring is not None  # handle() serves a chain taken from it
        return self.request_faults.fails(FAULT_KIND.get(kind), ring, ring.last_avail)

    def _failed(self, e: RequestError) -> int:
        """The status a request answered with `e` gets, counted."""
        unsupported = e.status == VIRTIO_BLK_S_UNSUPP
        self.counts["unsupported_requests" if unsupported else "failed_requests"] += 1
        return e.status

    def _complete(
        self, data_in: list[tuple[int, int]], written: int, status_gpa: int, status: int
    ) -> int:
        """Finish a request: the used ring's len counts the bytes written from the first
        writable one on (2.7.8), and the status byte comes after the data buffers: what the
        request did not fill (all of them when it failed, GET_ID's past 20 bytes) is zeroed,
        so that len (data + status) is true."""
        total = self._zero_past(data_in, written)
        self.ram.write_u8(status_gpa, status)  # last: the request is done
        return total + 1

    # -- requests in flight (O_DIRECT) ------------------------------------------------------
    def _start(
        self,
        kind: int,
        sector: int,
        readable: list[tuple[int, int]],
        data_in: list[tuple[int, int]],
        status_gpa: int,
    ) -> BlkRequest | None:
        """An aligned IN or OUT, admitted, started on the disk (AIO), or None for handle() to
        serve in place; RequestError as _serve() would raise it."""
        if kind == VIRTIO_BLK_T_IN:
            bufs, write = data_in, False
        elif kind == VIRTIO_BLK_T_OUT:
            bufs, write = skip_bytes(readable, HEADER.size), True
        else:
            return None
        offset, total = self._extent(sector, bufs)
        if not total or len(bufs) > IOV_MAX or not _aligned(offset, bufs):
            return None
        assert self.aio is not None
        views = self.ram.iovecs(bufs, writable=not write)
        self._token += 1
        try:
            self._host_call(self.aio.submit, self._token, aio.PWRITEV if write else aio.PREADV,
                            self.disk, offset, views)  # fmt: skip
        except OSError as e:
            if e.errno == errno.EAGAIN:  # the kernel's AIO limit: served in place instead
                return None
            self._io_failed(e)
        request = BlkRequest(write, offset, views, total, data_in, status_gpa)
        self._requests[self._token] = request
        self.counts["aio_requests"] += 1
        return request

    def wait_pending(self, timeout_ns: int | None = None) -> None:
        """Each request in flight that finished (at least one, unless timeout_ns passed):
        its result checked, a short transfer completed in place, a stable write synced, its
        status written."""
        assert self.aio is not None
        for token, result in self._host_call(self.aio.wait, 1, timeout_ns):
            request = self._requests.pop(token)
            written, status = 0, VIRTIO_BLK_S_OK
            try:
                if result < 0:
                    self._io_failed(OSError(-result, os.strerror(-result)))
                if result < request.total:  # short (the image shrank?): the rest in place
                    self._vectored(request.offset + result, _advance(request.views, result),
                                   request.total - result, request.write)  # fmt: skip
                if request.write:
                    self._stable()
                else:
                    written = request.total
            except RequestError as e:
                written, status = 0, self._failed(e)
            except Stalled:  # it goes back to the ring (the transport's stall())
                request.views, request.stalled = [], True
                continue
            request.views = []  # the guest's buffers, exported no longer
            request.written = self._complete(request.data_in, written, request.status_gpa, status)

    def _settle(self) -> None:
        """Wait for every request in flight: the next one is served in place, after them."""
        while self._requests:
            self.wait_pending()

    def _header(self, readable: list[tuple[int, int]]) -> tuple[int, int]:
        if readable and readable[0][1] >= HEADER.size:  # the usual layout: read it in place
            kind, _, sector = self.ram.unpack(HEADER, readable[0][0])
            return kind, sector
        raw = self.ram.gather(readable, HEADER.size)
        if len(raw) < HEADER.size:
            raise RequestError(VIRTIO_BLK_S_IOERR)
        kind, _, sector = HEADER.unpack(raw)
        return kind, sector

    def _serve(
        self,
        kind: int,
        sector: int,
        readable: list[tuple[int, int]],
        into: list[tuple[int, int]],
        segments: Segments,
    ) -> int:
        """The bytes written into the guest's buffers (before the status byte) by a request
        _admitted() let through (`segments`: what it read); `readable` still holds the
        header."""
        match kind:
            case 0:  # VIRTIO_BLK_T_IN
                return self._transfer(sector, into, write=False)
            case 1:  # VIRTIO_BLK_T_OUT
                self._transfer(sector, skip_bytes(readable, HEADER.size), write=True)
                self._stable()
            case 4:  # VIRTIO_BLK_T_FLUSH
                self._flush()
            case 8:  # VIRTIO_BLK_T_GET_ID
                return self._get_id(into)
            case 11 | 13:  # VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES
                self._segments(kind, segments)
                self._stable()
            case _:
                raise RequestError(VIRTIO_BLK_S_UNSUPP)
        return 0

    def _negotiated(self, kind: int) -> None:
        """A DISCARD or WRITE_ZEROES from a driver that did not accept its feature is UNSUPP,
        as from a device that never had it: the driver turned the command down (and a
        read-only disk offers neither), so nothing on the disk changes for it."""
        feature = (
            VIRTIO_BLK_F_DISCARD if kind == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        )
        # (Accepted: a device whose driver runs it without FEATURES_OK serves nothing.)
        if not self.driver_features & feature:
            raise RequestError(VIRTIO_BLK_S_UNSUPP)

    def _writable(self) -> None:
        if self.readonly:
            raise RequestError(VIRTIO_BLK_S_IOERR)

    def _stable(self) -> None:
        """5.2.6.2: a driver that did not accept VIRTIO_BLK_F_FLUSH (offered, and no
        CONFIG_WCE) gets stable writes: the data is on the disk before the request completes
        (write-through, as QEMU turns its cache off for such a driver)."""
        if not self.driver_features & VIRTIO_BLK_F_FLUSH:
            self._flush()

    def _flush(self) -> None:
        """fdatasync, or IOERR for good once one failed on a page-cache image (the module
        docstring): latched before the guest can see this request's IOERR."""
        if self.flush_error:
            raise RequestError(VIRTIO_BLK_S_IOERR)
        if self.readonly:  # nothing of ours to write back; a failure an earlier writer left
            return  # in the file's error state would latch IOERR for good (QEMU: OK at once)
        try:
            if self._errors_unasked:  # what a dead process's sync may have taken with it
                self._errors_unasked = False
                # The answer is taken as the call returns, and a process killed inside it
                # (as inside a failing fdatasync) dies with it: no description would tell
                # the next one again. So a failure is latched first, in doubt, and taken back
                # once the answer is that nothing failed.
                self._progress.latch(errno.EIO, in_doubt=True)
                self._host_call(files.wait_writeback, self.disk_errors)
                self._progress.unlatch()
            self._host_call(os.fdatasync, self.disk)
        except OSError as e:
            if self.bounce is not None:  # O_DIRECT: nothing lost in a page cache
                self._io_failed(e)
            self.counts["io_errors"] += 1
            # The page cache lost the failed writes: IOERR now and later, never a stall (the
            # module docstring)
            self._latch_flush_error(e.errno or errno.EIO)
            # A kind of its own: said once (later FLUSHes fail without a word), it must not
            # be lost to a read's or a write's failure logged within the same second
            self._warn.warning(
                "write-back", "%s: write-back failed (%s): every later FLUSH fails", self.NAME, e
            )
            raise RequestError(VIRTIO_BLK_S_IOERR) from None

    def _latch_flush_error(self, code: int) -> None:
        self.flush_error = min(code, MAX_ERRNO)
        self._progress.latch(self.flush_error)

    def _zero_past(self, bufs: list[tuple[int, int]], done: int) -> int:
        """Zero the guest's buffers `bufs` past their first `done` bytes: their total size.
        Buffers that overlap are zeroed once (a driver may point many descriptors at one
        buffer), so the work is bounded by guest RAM, not by the chain's length."""
        total = 0
        for _, length in bufs:  # (a loop: a comprehension is a call of its own)
            total += length
        if done < total:
            for start, end in _merged(skip_bytes(bufs, done)):
                for view in self.ram.iovecs([(start, end - start)], writable=True):
                    for at in range(0, len(view), ZERO_CHUNK):
                        piece = view[at : at + ZERO_CHUNK]
                        piece[:] = ZEROS[: len(piece)]
        return total

    def _extent(self, sector: int, bufs: list[tuple[int, int]]) -> tuple[int, int]:
        """The disk offset and length of a transfer into or out of `bufs`: whole sectors,
        inside the disk, or IOERR."""
        total = 0
        for _, length in bufs:  # (a loop: a comprehension is a call of its own)
            total += length
        if total % SECTOR or sector + total // SECTOR > self.capacity:
            raise RequestError(VIRTIO_BLK_S_IOERR)
        return sector * SECTOR, total

    def _transfer(self, sector: int, bufs: list[tuple[int, int]], write: bool) -> int:
        offset, total = self._extent(sector, bufs)
        views = self.ram.iovecs(bufs, writable=not write)
        if self.bounce is None or _aligned(offset, bufs):
            self._vectored(offset, views, total, write)
        else:
            self.counts["bounced_requests"] += 1
            self._bounced(offset, views, total, write)
        return 0 if write else total

    def _vectored(self, offset: int, views: list[memoryview], left: int, write: bool) -> None:
        """`left` bytes between the disk at `offset` and `views`, in place."""
        call = os.pwritev if write else os.preadv
        while left:
            n = self._io(call, self.disk, views[:IOV_MAX], offset)
            if n == 0:  # the image shrank under us
                self._warn.warning(
                    "io", "%s: the image ends before byte %d: shrunk under the VM?", self.NAME,
                    offset + 1,
                )  # fmt: skip
                raise RequestError(VIRTIO_BLK_S_IOERR)
            left -= n
            if left:  # a short transfer, or more than IOV_MAX buffers: go on after it
                offset += n
                views = _advance(views, n)

    def _bounced(self, offset: int, views: list[memoryview], total: int, write: bool) -> None:
        """`total` bytes between the disk at `offset` and `views` through the bounce buffer,
        for an O_DIRECT image where they are not all aligned: each step moves a block-aligned
        span of the disk (at most the bounce buffer) whole; a write that covers only part of
        its first or last block reads that block into the span first."""
        bounce, end = self.bounce, offset + total
        assert bounce is not None
        at, done = offset - offset % DIRECT_IO_ALIGN, 0  # the span's start; bytes moved
        while at < end:
            stop = min(-(-end // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN, at + len(bounce))
            span = bounce[: stop - at]
            lo, hi = max(offset, at) - at, min(end, stop) - at  # the request's part of it
            if write:
                if lo:
                    self._vectored(at, [span[:DIRECT_IO_ALIGN]], DIRECT_IO_ALIGN, write=False)
                if hi < len(span):
                    tail = len(span) - DIRECT_IO_ALIGN
                    self._vectored(at + tail, [span[tail:]], DIRECT_IO_ALIGN, write=False)
                _copy(views, done, span[lo:hi], into_views=False)
                self._vectored(at, [span], len(span), write=True)
            else:
                self._vectored(at, [span], len(span), write=False)
                _copy(views, done, span[lo:hi], into_views=True)
            done += hi - lo
            at = stop

    def _get_id(self, into: list[tuple[int, int]]) -> int:
        data = self.serial.ljust(ID_BYTES, b"\0")
        written = 0
        for gpa, length in into:
            chunk = data[written : written + length]
            self.ram.write(gpa, chunk)
            written += len(chunk)
        return written

    def _segment_list(self, kind: int, out: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """The (sector, num_sectors, flags) of a DISCARD or WRITE_ZEROES, their flags known
        and no more than MAX_SEGMENTS of them; UNSUPP or IOERR otherwise."""
        # One segment more than allowed is read, enough to refuse more: an unknown flag past
        # it goes unseen, and such a request (over max_discard_seg, a driver's MUST NOT) is
        # IOERR rather than UNSUPP.
        raw = self.ram.gather(out, SEGMENT.size * (MAX_SEGMENTS + 1))
        if not raw or len(raw) % SEGMENT.size:
            raise RequestError(VIRTIO_BLK_S_IOERR)
        segments = list(SEGMENT.iter_unpack(raw))
        for _, _, flags in segments:  # 5.2.6.2: these MUSTs come before any other check
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or kind == VIRTIO_BLK_T_DISCARD and flags:
                raise RequestError(VIRTIO_BLK_S_UNSUPP)  # unmap is for write zeroes only
        if len(segments) > MAX_SEGMENTS:
            raise RequestError(VIRTIO_BLK_S_IOERR)
        return segments

    def _segments(self, kind: int, segments: Segments) -> None:
        for sector, count, flags in segments:
            if sector + count > self.capacity or count > MAX_DISCARD_SECTORS:
                raise RequestError(VIRTIO_BLK_S_IOERR)
            if not count:
                continue  # an empty range: nothing to discard or zero
            if kind == VIRTIO_BLK_T_DISCARD:
                self._discard(sector * SECTOR, count * SECTOR)
            else:
                self._write_zeroes(sector * SECTOR, count * SECTOR, flags)

    def _discard(self, offset: int, length: int) -> None:
        """Punch a hole. Discarding is a hint the device may ignore (5.2.6.2): where the file
        system has no holes (EOPNOTSUPP), the data stays and the request succeeds."""
        try:
            self._host_call(files.fallocate, self.disk, PUNCH_HOLE, offset, length)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                self._io_failed(e)

    def _write_zeroes(self, offset: int, length: int, flags: int) -> None:
        """The range reads as zeros afterwards (5.2.6.2). With the unmap flag the device may
        deallocate it: a hole where the file system has them; else (or without the flag) its
        blocks are zeroed in place; else (tmpfs has no ZERO_RANGE) zeros are written."""
        modes = (PUNCH_HOLE, ZERO_RANGE) if flags & WRITE_ZEROES_FLAG_UNMAP else (ZERO_RANGE,)
        for mode in modes:
            try:
                self._host_call(files.fallocate, self.disk, mode, offset, length)
                return
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    self._io_failed(e)
        zeros = [ZEROS] * (length // ZERO_CHUNK)
        if length % ZERO_CHUNK:
            zeros.append(ZEROS[: length % ZERO_CHUNK])
        if self.bounce is None or not (offset | length) % DIRECT_IO_ALIGN:
            self._vectored(offset, zeros, length, write=True)
        else:
            self._bounced(offset, zeros, length, write=True)

    def _io(self, call: Any, *args: Any) -> int:
        """A host I/O call; its failure is the request's (IOERR), logged, never the device's."""
        try:
            result = self._host_call(call, *args)
        except OSError as e:
            self._io_failed(e)
        return int(result or 0)

    def _host_call(self, call: Callable[..., T], *args: Any) -> T:
        """`call` on the disk, which may block for long (a frozen file system, a slow
        server, a large sync): the host-I/O flag says so meanwhile, and the monitor waits
        for this process past its requests' deadlines instead of failing it (progress.py)."""
        flag = self._host_io
        flag[0] = 1
        try:
            return call(*args)
        finally:
            flag[0] = 0

    def _io_failed(self, e: OSError) -> NoReturn:
        """The request's IOERR; a stall (Stalled) where the host only lacks room for it."""
        if e.errno in HOST_FULL and self.pause_when_full:
            raise self.stall(f"the disk's file system is full ({os.strerror(e.errno)})") from None
        self.counts["io_errors"] += 1
        self._warn.warning("io", "%s: disk I/O failed: %s", self.NAME, e)
        raise RequestError(VIRTIO_BLK_S_IOERR) from None


def _guest_options(options: Mapping[str, object]) -> tuple[bool, bytes]:
    """readonly and serial, the options the guest sees (F_RO, GET_ID); ConfigError if bad."""
    serial = str(options.get("serial", ""))
    problem = blk_serial_problem(serial)  # as config.py checked it
    if problem is not None:
        raise ConfigError(f"virtio-blk: serial {problem}")
    return bool(options.get("readonly", False)), serial.encode()


def _merged(bufs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (start, end) ranges the buffers cover, overlapping ones merged (each such union
    lies in one RAM range, as its buffers do; buffers that only touch are kept apart)."""
    out: list[tuple[int, int]] = []
    for gpa, length in sorted(bufs):
        if out and gpa < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], gpa + length))
        elif length:
            out.append((gpa, gpa + length))
    return out


def _aligned(offset: int, bufs: list[tuple[int, int]]) -> bool:
    """Whether O_DIRECT can move these guest buffers at this disk offset in place. A gpa is
    as aligned as the address it maps to: KVM's memslots are page-aligned on both sides."""
    if offset % DIRECT_IO_ALIGN:
        return False
    for gpa, length in bufs:
        if (gpa | length) % DIRECT_IO_ALIGN:
            return False
    return True


def _copy(views: list[memoryview], skip: int, span: memoryview, into_views: bool) -> None:
    """Copy between `span` and the bytes of `views` from `skip` on, as many as span holds:
    into the views (a read's data), or out of them into span (a write's)."""
    at = 0
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        n = min(len(view) - skip, len(span) - at)
        if into_views:
            view[skip : skip + n] = span[at : at + n]
        else:
            span[at : at + n] = view[skip : skip + n]
        at, skip = at + n, 0
        if at == len(span):
            return


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views after n bytes were transferred (a short preadv/pwritev)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views
