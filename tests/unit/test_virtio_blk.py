"""virtio-blk (devprocs/virtio_blk.py) against a disk image in a temporary file, driven
through the PCI transport and a split ring laid out as a driver does (virtio 1.2 5.2)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import cffi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitvmm.devprocs import virtio_blk
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.progress import Progress
from splitvmm.devprocs.runtime import _serve_control, build_device
from splitvmm.devprocs.virtio_blk import VirtioBlk
from splitvmm.errors import ConfigError, ProtocolError, StateError
from splitvmm.native import files
from splitvmm.native.aio import AioContext
from splitvmm.protocol import codec, control, faults
from splitvmm.protocol.models import PROGRESS_HOST_IO_BYTE
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.record import Struct, replace
from tests.failing_disk import TOO_MUCH, failing_fs
from tests.unit.test_stats import FakeSocket
from tests.virtio.support import (
    ACK,
    DEVICE_CFG,
    DRIVER,
    DRIVER_OK,
    F_EVENT_IDX,
    F_VERSION_1,
    FEATURES_OK,
    NEEDS_RESET,
    Channel,
    Driver,
    Ring,
    SteppingClock,
    close_fds,
    host_fds,
    prepared,
    replaying,
    serve_ready,
    signalled,
)

SECTORS = 64
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
OK, IOERR, UNSUPP = 0, 1, 2
F_RO, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 1 << 5, 1 << 9, 1 << 13, 1 << 14


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * SECTORS)  # sector n holds 0..255 twice
    return path


@pytest.fixture
def fds(disk: Path) -> Iterator[dict[str, int]]:
    fds = host_fds("virtio-blk", disk)
    yield fds
    close_fds(fds)


def make(fds: dict[str, int], **options: object) -> VirtioBlk:
    """The device; nothing else waits for its event loop (there is none), so a kick serves
    every chain, however long the disk takes. Its clock reads 1 us later at each look, so
    that its 1 ms budget (process() interrupts at each one it spends, ring dry or not) ends
    after as many looks on a loaded host as on an idle one: a CI host that stalled between
    two chains once split a batch in two, and a test that expected one interrupt saw two."""
    dev = VirtioBlk.from_options(prepared("virtio-blk", fds), options)
    dev.ctx.waiting = lambda: False
    dev.clock_ns = SteppingClock(step=1_000)  # type: ignore[method-assign]
    return dev


@pytest.fixture
def blk(fds: dict[str, int]) -> VirtioBlk:
    return make(fds, serial="disk-0001")


def started(dev: VirtioBlk, features: int | None = None) -> tuple[Driver, Ring]:
    """The device started with `features`; by default VERSION_1 and the DISCARD and
    WRITE_ZEROES commands where it offers them (a driver sends those only once it took
    them), but not FLUSH: writes are stable."""
    driver, ring = Driver(dev), Ring(dev.ram)
    if features is None:
        features = F_VERSION_1 | dev.device_features() & (F_DISCARD | F_WRITE_ZEROES)
    driver.start(ring, features)
    return driver, ring


def request(ring: Ring, kind: int, sector: int, data: list[tuple[bytes | int, bool]]) -> int:
    """Header, data buffers (bytes to send, or a length to receive), status: its gpa."""
    header = ring.buffer(struct.pack("<IIQ", kind, 0, sector))
    parts = [(*header, False)]
    parts += [(*ring.buffer(d), writable) for d, writable in data]
    status = ring.buffer(1)
    ring.add([*parts, (*status, True)])
    return status[0]


def status_of(dev: VirtioBlk, gpa: int) -> int:
    return dev.ram.read(gpa, 1)[0]


def test_virtio_blk_config_reports_capacity_and_block_size(blk):
    driver = Driver(blk)

    assert driver.rd(DEVICE_CFG, 8) == SECTORS
    assert driver.rd(DEVICE_CFG + 12, 4) == 254  # seg_max
    assert driver.rd(DEVICE_CFG + 20, 4) == 512  # blk_size


def test_virtio_blk_features_offer_flush_discard_write_zeroes(blk):
    features = Driver(blk).device_features()

    assert features & (1 << 9) and features & F_DISCARD and features & F_WRITE_ZEROES
    assert not features & F_RO


def test_virtio_blk_readonly_offers_ro_without_discard(fds):
    features = Driver(make(fds, readonly=True)).device_features()

    assert features & F_RO and not features & F_DISCARD


def test_virtio_blk_serial_longer_than_20_bytes_refused(fds):
    with pytest.raises(ConfigError, match="serial"):
        make(fds, serial="x" * 21)


def test_virtio_blk_serial_not_ascii_refused(fds):
    """5.2.6: the GET_ID answer is an ASCII string."""
    with pytest.raises(ConfigError, match="serial.*ASCII"):
        make(fds, serial="dísk")


def test_virtio_blk_in_reads_sectors_into_guest_buffers(blk):
    driver, ring = started(blk)
    status = request(ring, IN, 2, [(512, True), (512, True)])

    driver.kick()

    ((_, written),) = ring.take_used()
    assert written == 1025 and status_of(blk, status) == OK
    data_gpa = status - 1024
    assert blk.ram.read(data_gpa, 1024) == bytes(range(256)) * 4


def test_virtio_blk_out_writes_sectors_to_the_disk(blk, disk):
    driver, ring = started(blk)
    status = request(ring, OUT, 3, [(b"\xab" * 512, False)])

    driver.kick()

    assert status_of(blk, status) == OK and ring.take_used()[0][1] == 1
    assert disk.read_bytes()[3 * 512 : 4 * 512] == b"\xab" * 512


def test_virtio_blk_image_of_less_than_a_sector_is_refused_naming_its_size(tmp_path):
    """A guest would see a disk of no sectors and say nothing of it."""
    small = tmp_path / "small.img"
    small.write_bytes(bytes(511))
    fds = host_fds("virtio-blk", small)
    try:
        with pytest.raises(ConfigError, match="the image is 511 bytes, less than one 512-byte"):
            VirtioBlk.from_options(prepared("virtio-blk", fds), {})
    finally:
        close_fds(fds)


def test_virtio_blk_image_past_its_last_whole_sector_says_what_the_guest_misses(tmp_path, caplog):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 300))
    fds = host_fds("virtio-blk", odd)
    try:
        dev = VirtioBlk.from_options(prepared("virtio-blk", fds), {})
    finally:
        close_fds(fds)

    assert dev.capacity == 8
    assert "the image's last 300 bytes are no whole 512-byte sector" in caplog.text


def test_virtio_blk_out_on_readonly_disk_is_ioerr(fds, disk):
    dev = make(fds, readonly=True)
    driver, ring = started(dev)
    status = request(ring, OUT, 0, [(b"\xab" * 512, False)])

    driver.kick()

    assert status_of(dev, status) == IOERR and disk.read_bytes()[:2] == b"\x00\x01"


@pytest.mark.parametrize(
    "kind, sector, want",
    [(IN, SECTORS - 1, IOERR), (99, 0, UNSUPP)],
    ids=["in-past-end", "unknown"],
)
def test_virtio_blk_failed_request_has_its_buffers_zeroed_and_counted(blk, kind, sector, want):
    """The status byte follows the data buffers, so len (2.7.8: bytes written from the first
    writable one on) counts them too: the device zeroes them rather than leave them unknown."""
    driver, ring = started(blk)
    status = request(ring, kind, sector, [(1024, True)])
    blk.ram.write(status - 1024, b"\xee" * 1024)

    driver.kick()

    assert status_of(blk, status) == want and ring.take_used()[0][1] == 1025
    assert blk.ram.read(status - 1024, 1024) == bytes(1024)


def failures(dev: VirtioBlk) -> tuple[int, int, int]:
    """The stats() counters of failure: the host's, and the guest's answers."""
    stats = dev.stats()
    return stats["io_errors"], stats["failed_requests"], stats["unsupported_requests"]


def test_virtio_blk_stats_count_the_host_failures_apart_from_the_guest_answers(
    blk, monkeypatch, write_back_fails
):
    """ctl devices --json: a read the disk failed and a failed write-back are the host's
    (io_errors); every IOERR the guest read, the later FLUSH included, and every UNSUPP is
    counted as its answer."""

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", preadv)
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    statuses = [
        request(ring, IN, 0, [(512, True)]),  # the disk fails it
        request(ring, IN, SECTORS, [(512, True)]),  # past the end: the guest's mistake
        request(ring, 99, 0, [(512, True)]),  # an unknown type
        request(ring, FLUSH, 0, []),  # the write-back fails
        request(ring, FLUSH, 0, []),  # failed for good, without asking the disk
        request(ring, GET_ID, 0, [(20, True)]),
    ]

    driver.kick()

    assert [status_of(blk, s) for s in statuses] == [IOERR, IOERR, UNSUPP, IOERR, IOERR, OK]
    assert failures(blk) == (2, 4, 1)


def test_virtio_blk_stats_count_a_full_disk_only_when_it_fails_the_write(fds, host_full):
    """A write the host has no room for stalls (no failure: the guest sees none); with
    on_full = "error" it is the host's failure and the guest's IOERR."""
    stalling = make(fds)
    driver, ring = started(stalling)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()
    failing = make(fds, on_full="error")
    driver, ring = started(failing)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()

    assert (stalling.stalled is not None, failures(stalling)) == (True, (0, 0, 0))
    assert failures(failing) == (1, 1, 0)


def test_virtio_blk_get_id_into_a_larger_buffer_zeroes_and_counts_the_rest(blk):
    driver, ring = started(blk)
    status = request(ring, GET_ID, 0, [(32, True)])
    blk.ram.write(status - 32, b"\xee" * 32)

    driver.kick()

    assert blk.ram.read(status - 32, 32) == b"disk-0001".ljust(32, b"\0")
    assert ring.take_used()[0][1] == 33 and status_of(blk, status) == OK


def test_virtio_blk_failed_request_zeroes_a_buffer_named_twice_once(blk, monkeypatch):
    """A driver may point many descriptors at one buffer: the work is its size, not the
    chain's length (a guest could otherwise name 16 MiB 256 times per request)."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<IIQ", IN, 0, SECTORS))  # past the end: IOERR
    data, status = ring.buffer(512), ring.buffer(1)
    ring.add([(*header, False), (*data, True), (*data, True), (*status, True)])
    blk.ram.write(data[0], b"\xee" * 512)
    zeroed: list[tuple[int, int]] = []
    real = blk.ram.iovecs

    def iovecs(parts: list[tuple[int, int]], writable: bool) -> list[memoryview]:
        if writable and parts and parts[0][0] == data[0]:
            zeroed.extend(parts)
        return real(parts, writable)

    monkeypatch.setattr(blk.ram, "iovecs", iovecs)
    driver.kick()

    assert status_of(blk, status[0]) == IOERR and ring.take_used()[0][1] == 1025
    assert zeroed == [(data[0], 512)] and blk.ram.read(data[0], 512) == bytes(512)


def test_virtio_blk_in_of_partial_sector_is_ioerr(blk):
    driver, ring = started(blk)
    status = request(ring, IN, 0, [(100, True)])

    driver.kick()

    assert status_of(blk, status) == IOERR


def synced(monkeypatch: pytest.MonkeyPatch, ring: Ring) -> list[int]:
    """The used idx at each fdatasync the device makes from now on."""
    seen: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen.append(ring.used_idx())
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return seen


@pytest.mark.parametrize("kind", [OUT, WRITE_ZEROES, DISCARD])
def test_virtio_blk_writes_are_stable_before_completion_without_flush_negotiated(
    blk, monkeypatch, kind
):
    """5.2.6.2: FLUSH offered but not accepted (and no CONFIG_WCE): a completed write is
    stable, so it reaches the disk before the used ring says it is done."""
    driver, ring = started(blk)  # VERSION_1 only
    seen = synced(monkeypatch, ring)
    data = b"\xab" * 512 if kind == OUT else struct.pack("<QII", 1, 1, 0)
    status = request(ring, kind, 1, [(data, False)])

    driver.kick()

    assert status_of(blk, status) == OK and seen == [0] and ring.used_idx() == 1


def test_virtio_blk_writes_wait_for_flush_when_the_driver_took_it(blk, monkeypatch):
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    seen = synced(monkeypatch, ring)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()
    assert seen == []

    status = request(ring, FLUSH, 0, [])
    driver.kick()

    assert status_of(blk, status) == OK and seen == [1]


def test_virtio_blk_flush_on_a_readonly_disk_is_ok_without_a_sync(fds, write_back_fails):
    """Nothing of ours can be dirty: an fdatasync could only report a failure some earlier
    writer of the file left, and latch IOERR for every later FLUSH (QEMU: OK at once)."""
    dev = make(fds, readonly=True)
    driver, ring = started(dev, F_VERSION_1 | F_FLUSH)
    statuses = [request(ring, FLUSH, 0, []) for _ in range(2)]
    driver.kick()

    assert [status_of(dev, s) for s in statuses] == [OK, OK] and write_back_fails == []


def test_virtio_blk_flush_ok(blk):
    driver, ring = started(blk)
    status = request(ring, FLUSH, 0, [])

    driver.kick()

    assert status_of(blk, status) == OK


def test_virtio_blk_get_id_answers_serial_nul_padded(blk):
    driver, ring = started(blk)
    status = request(ring, GET_ID, 0, [(20, True)])

    driver.kick()

    assert blk.ram.read(status - 32, 20) == b"disk-0001".ljust(20, b"\0")
    assert ring.take_used()[0][1] == 21


def test_virtio_blk_unknown_type_is_unsupp(blk):
    driver, ring = started(blk)
    status = request(ring, 99, 0, [])

    driver.kick()

    assert status_of(blk, status) == UNSUPP


def test_virtio_blk_discard_punches_a_hole_that_reads_zero(blk, disk):
    driver, ring = started(blk)
    status = request(ring, DISCARD, 0, [(struct.pack("<QII", 8, 8, 0), False)])

    driver.kick()

    assert status_of(blk, status) == OK
    assert disk.read_bytes()[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert disk.stat().st_size == SECTORS * 512


def test_virtio_blk_discard_with_unmap_flag_is_unsupp(blk):
    driver, ring = started(blk)
    status = request(ring, DISCARD, 0, [(struct.pack("<QII", 8, 8, 1), False)])

    driver.kick()

    assert status_of(blk, status) == UNSUPP


def no_holes(monkeypatch: pytest.MonkeyPatch, also_zero_range: bool = True) -> None:
    """A file system without PUNCH_HOLE (and, by default, without ZERO_RANGE either)."""
    real = files.fallocate

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & files.FALLOC_FL_PUNCH_HOLE or also_zero_range:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        real(fd, mode, offset, length)

    monkeypatch.setattr(files, "fallocate", fallocate)


@pytest.mark.parametrize("unmap", [0, 1], ids=["keep", "unmap"])
@pytest.mark.parametrize("fs", ["holes", "zero-range-only", "neither"])
def test_virtio_blk_write_zeroes_zeroes_the_range(blk, disk, monkeypatch, fs, unmap):
    """The range MUST read as zeros whatever the file system can do; with the unmap flag the
    device MAY deallocate it (5.2.6.2)."""
    if fs != "holes":
        no_holes(monkeypatch, also_zero_range=fs == "neither")
    driver, ring = started(blk)
    status = request(ring, WRITE_ZEROES, 0, [(struct.pack("<QII", 1, 2, unmap), False)])

    driver.kick()

    image = disk.read_bytes()
    assert status_of(blk, status) == OK
    assert image[512:1536] == bytes(1024) and image[1536:1538] == b"\x00\x01"


def test_virtio_blk_write_zeroes_written_in_short_writes_still_zeroes_the_range(
    blk, disk, monkeypatch
):
    """Written as zeros (no ZERO_RANGE: tmpfs), a short pwrite (a file system filling up)
    left the rest of its chunk as it was, and the request was OK all the same."""
    no_holes(monkeypatch)
    real = os.pwritev
    short = lambda fd, bufs, at: real(fd, [bufs[0][: max(1, len(bufs[0]) // 2)]], at)  # noqa: E731
    monkeypatch.setattr(os, "pwritev", short)
    driver, ring = started(blk)
    status = request(ring, WRITE_ZEROES, 0, [(struct.pack("<QII", 4, 4, 0), False)])

    driver.kick()

    assert (status_of(blk, status), disk.read_bytes()[2048:4096]) == (OK, bytes(2048))


def test_virtio_blk_discard_where_holes_are_unsupported_is_ok_and_keeps_the_data(
    blk, disk, monkeypatch
):
    no_holes(monkeypatch)
    driver, ring = started(blk)
    status = request(ring, DISCARD, 0, [(struct.pack("<QII", 1, 2, 0), False)])

    driver.kick()

    assert status_of(blk, status) == OK and disk.read_bytes()[512:514] == b"\x00\x01"


@pytest.mark.parametrize("kind", [DISCARD, WRITE_ZEROES])
def test_virtio_blk_empty_segment_is_ok(blk, disk, kind):
    driver, ring = started(blk)
    status = request(ring, kind, 0, [(struct.pack("<QII", 8, 0, 0), False)])

    driver.kick()

    assert status_of(blk, status) == OK and disk.read_bytes()[8 * 512 : 8 * 512 + 2] == b"\0\1"


@pytest.mark.parametrize(
    "kind, took", [(DISCARD, F_WRITE_ZEROES), (WRITE_ZEROES, F_DISCARD)], ids=["discard", "zeroes"]
)
def test_virtio_blk_command_whose_feature_the_driver_declined_is_unsupp(blk, disk, kind, took):
    """A driver that did not take VIRTIO_BLK_F_DISCARD (WRITE_ZEROES) turned the command
    down: the device answers it as one that never had it, and the disk keeps its data."""
    driver, ring = started(blk, F_VERSION_1 | took)
    status = request(ring, kind, 0, [(struct.pack("<QII", 8, 8, 0), False)])

    driver.kick()

    assert status_of(blk, status) == UNSUPP and ring.used_idx() == 1
    assert disk.read_bytes()[8 * 512 : 16 * 512] == bytes(range(256)) * 2 * 8


def test_virtio_blk_discard_from_a_driver_whose_features_were_refused_is_not_served(blk, disk):
    """A driver whose feature set FEATURES_OK refused (here: a bit the device never offered)
    and that runs the device anyway has taken no feature, DISCARD's neither: the device needs
    a reset (virtio/pci.py _set_status), serves nothing, and the disk keeps its data."""
    driver, ring = Driver(blk), Ring(blk.ram)
    assert not driver.negotiate(F_VERSION_1 | F_DISCARD | 1 << 50) & FEATURES_OK
    driver.setup_queue(0, ring)
    driver.set_status(ACK | DRIVER | DRIVER_OK)
    request(ring, DISCARD, 0, [(struct.pack("<QII", 8, 8, 0), False)])

    driver.kick()

    assert (driver.status() & NEEDS_RESET, ring.used_idx()) == (NEEDS_RESET, 0)
    assert disk.read_bytes()[8 * 512 : 16 * 512] == bytes(range(256)) * 2 * 8


@pytest.mark.parametrize(
    "kind, segments",
    [
        (WRITE_ZEROES, [(SECTORS, 8, 2)]),  # an unknown flag on a range past the end
        (DISCARD, [(0, 8, 1), (8, 8, 1)]),  # unmap on discard, in more segments than allowed
    ],
    ids=["unknown-flag", "discard-unmap"],
)
def test_virtio_blk_unsupported_flags_are_unsupp_before_other_checks(blk, kind, segments):
    driver, ring = started(blk)
    data = b"".join(struct.pack("<QII", *segment) for segment in segments)
    status = request(ring, kind, 0, [(data, False)])

    driver.kick()

    assert status_of(blk, status) == UNSUPP


def test_virtio_blk_write_zeroes_past_the_end_is_ioerr(blk):
    driver, ring = started(blk)
    status = request(ring, WRITE_ZEROES, 0, [(struct.pack("<QII", SECTORS - 1, 2, 0), False)])

    driver.kick()

    assert status_of(blk, status) == IOERR


def test_virtio_blk_several_chains_in_one_notify_complete_in_order(blk, fds):
    driver, ring = started(blk)
    statuses = [request(ring, IN, s, [(512, True)]) for s in range(4)]

    driver.kick()

    assert [head for head, _ in ring.take_used()] == [0, 3, 6, 9]
    assert [status_of(blk, s) for s in statuses] == [OK] * 4
    assert signalled(fds["intx"]) == 1  # one interrupt for the batch


def test_virtio_blk_status_byte_found_before_empty_writable_descriptors(blk):
    """2.7.4: the device makes no assumption about the arrangement of descriptors."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<IIQ", FLUSH, 0, 0))
    status, spare = ring.buffer(1), ring.buffer(1)
    ring.add([(*header, False), (*status, True), (spare[0], 0, True)])

    driver.kick()

    assert not driver.status() & NEEDS_RESET
    assert status_of(blk, status[0]) == OK and ring.take_used()[0][1] == 1


def test_virtio_blk_chain_with_only_empty_writable_descriptors_needs_reset(blk):
    driver, ring = started(blk)
    header, spare = ring.buffer(struct.pack("<IIQ", IN, 0, 0)), ring.buffer(1)
    ring.add([(*header, False), (spare[0], 0, True)])

    driver.kick()

    assert driver.status() & NEEDS_RESET


def test_virtio_blk_chain_without_status_byte_needs_reset(blk):
    driver, ring = started(blk)
    ring.add([(*ring.buffer(struct.pack("<IIQ", IN, 0, 0)), False)])

    driver.kick()

    assert driver.status() & NEEDS_RESET


def test_virtio_blk_event_idx_interrupts_only_past_used_event(blk, fds):
    driver, ring = started(blk, F_VERSION_1 | F_EVENT_IDX)
    ring.set_used_event(5)
    for s in range(3):
        request(ring, IN, s, [(512, True)])
    driver.kick()
    quiet = signalled(fds["intx"])
    for s in range(3):
        request(ring, IN, s, [(512, True)])
    driver.kick()

    assert (quiet, signalled(fds["intx"])) == (0, 1)


def test_virtio_blk_in_marks_the_written_pages_dirty(blk, fds):
    driver, ring = started(blk)
    request(ring, IN, 0, [(512, True)])

    driver.kick()

    assert os.pread(fds["dirty"], 4096, 0) != bytes(4096)


def test_virtio_blk_harvests_its_dirty_marks_when_asked_and_marks_what_it_writes_after(blk, fds):
    """A live snapshot's pass begins (monitor/coordinator.py _harvest_device_marks): between
    requests the device moves its marks into its dirty log's harvest, the memfd's second
    half, clears its live bitmap and answers; its next write is marked anew."""
    driver, ring = started(blk)
    request(ring, IN, 0, [(512, True)])
    driver.kick()
    half = os.fstat(fds["dirty"]).st_size // 2
    marked = os.pread(fds["dirty"], half, 0)
    sock = FakeSocket()

    _serve_control(blk, sock, control.encode({"op": "harvest_dirty", "seq": 3}), FaultInjector())

    assert control.check_reply(control.decode(sock.sent[0]), "harvest_dirty", 3, "virtio-blk")
    live, harvest = os.pread(fds["dirty"], half, 0), os.pread(fds["dirty"], half, half)
    assert (live, harvest) == (bytes(half), marked) and marked != bytes(half)
    request(ring, IN, 0, [(512, True)])
    driver.kick()
    assert os.pread(fds["dirty"], half, 0) != bytes(half)


# -- io-error faults (`ctl inject-fault NAME io-error`, protocol/faults.py) ---------------------
def arm_io_error(dev: VirtioBlk, **parts: object) -> None:
    """What the runtime does with a `fault` control message of kind io-error."""
    FaultInjector(requests=dev.request_faults).arm(
        faults.decode(faults.make("io-error", **parts), "fault", ConfigError)  # type: ignore[arg-type]
    )


def test_virtio_blk_io_error_fails_the_nth_write_as_a_failing_disk_and_nothing_reaches_it(
    blk, disk
):
    """QEMU's blkdebug inject-error: the guest gets IOERR (its buffers zeroed as for any
    failed request), the disk keeps what it had, reads are not counted, and the fault is
    spent after it."""
    driver, ring = started(blk)
    arm_io_error(blk, after=2, on="write")
    before = disk.read_bytes()
    statuses = [
        request(ring, OUT, 1, [(b"\x11" * 512, False)]),
        request(ring, IN, 1, [(512, True)]),
        request(ring, OUT, 2, [(b"\x22" * 512, False)]),  # the second write: fails
        request(ring, OUT, 3, [(b"\x33" * 512, False)]),
    ]

    driver.kick()

    assert [status_of(blk, s) for s in statuses] == [OK, OK, IOERR, OK]
    image = disk.read_bytes()
    assert image[512:1024] == b"\x11" * 512 and image[1536:2048] == b"\x33" * 512
    assert image[1024:1536] == before[1024:1536]  # the failed write never reached it
    stats = blk.stats()
    assert (stats["injected_errors"], stats["failed_requests"], stats["io_errors"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("on", "kinds", "want"),
    [
        ("read", [OUT, IN, IN], [OK, IOERR, IOERR]),
        ("flush", [IN, FLUSH, FLUSH], [OK, IOERR, IOERR]),
        ("write", [GET_ID, DISCARD, OUT], [OK, IOERR, IOERR]),  # GET_ID touches no disk
        ("write", [FLUSH, WRITE_ZEROES, OUT], [OK, IOERR, IOERR]),
        ("any", [GET_ID, IN, FLUSH, OUT], [OK, IOERR, IOERR, OK]),
    ],
)
def test_virtio_blk_io_error_counts_its_kind_of_request_and_fails_count_of_them(
    blk, on, kinds, want
):
    driver, ring = started(blk)
    arm_io_error(blk, on=on, count=2)
    data = {IN: [(512, True)], OUT: [(b"\x44" * 512, False)], FLUSH: [], GET_ID: [(20, True)],
            DISCARD: [(struct.pack("<QII", 4, 1, 0), False)],
            WRITE_ZEROES: [(struct.pack("<QII", 4, 1, 0), False)]}  # fmt: skip
    statuses = [request(ring, kind, 0, data[kind]) for kind in kinds]

    driver.kick()

    assert [status_of(blk, s) for s in statuses] == want
    assert blk.stats()["injected_errors"] == 2


def test_virtio_blk_io_error_fails_an_aio_request_on_a_direct_image(direct_fds, disk):
    """The fault is asked before the request is started on the disk, whichever way it goes."""
    dev = make(direct_fds)
    driver, ring = started(dev)
    arm_io_error(dev, on="read")
    header = ring.buffer(struct.pack("<IIQ", IN, 0, 8))
    buf, status = aligned(ring, 4096), ring.buffer(b"\xff")
    ring.add([(*header, False), (*buf, True), (*status, True)])

    driver.kick()

    assert ring.take_used()[0][1] == 4097 and status_of(dev, status[0]) == IOERR
    assert dev.counts["aio_requests"] == 0


def test_virtio_blk_io_error_counts_a_write_taken_again_after_a_stall_once(blk, host_full):
    """A write the full host stalls goes back to the ring and is served again at the retry:
    one request, counted once. The fault fails the second write, not the first one twice."""
    driver, ring = started(blk)
    arm_io_error(blk, after=2, on="write")
    first = request(ring, OUT, 1, [(b"\x11" * 512, False)])
    second = request(ring, OUT, 2, [(b"\x22" * 512, False)])
    driver.kick()  # the first write stalls
    host_full[0] = False

    blk.retry()
    serve_ready(blk)

    assert (status_of(blk, first), status_of(blk, second)) == (OK, IOERR)
    assert blk.stats()["injected_errors"] == 1


def test_virtio_blk_io_error_of_a_chain_given_back_by_a_stall_fails_it_when_taken_again(
    direct_fds, monkeypatch
):
    """An AIO write in flight stalls (-ENOSPC) after the read taken behind it was failed by
    the fault: both go back to the ring unused, and the read, taken again at the retry, is
    the request the fault failed: the guest sees its IOERR, once."""
    full = [True]
    real = AioContext.wait

    def wait(
        self: AioContext, least: int = 1, timeout_ns: int | None = None
    ) -> list[tuple[int, int]]:
        return [(t, -errno.ENOSPC if full[0] else r) for t, r in real(self, least, timeout_ns)]

    monkeypatch.setattr(AioContext, "wait", wait)
    dev = make(direct_fds)
    driver, ring = started(dev)
    arm_io_error(dev, on="read")
    write = aligned_request(ring, OUT, 8, b"\x5a" * 4096)
    read = aligned_request(ring, IN, 0, 4096)  # failed while the write is in flight

    driver.kick()
    used_while_full = ring.take_used()
    full[0] = False
    dev.retry()
    serve_ready(dev)

    assert used_while_full == [] and dev.stalled is None
    assert ring.take_used() == [(write[0], 1), (read[0], 4097)]
    assert dev.ram.read(read[1] + 4096, 1) == bytes([IOERR])
    assert dev.stats()["injected_errors"] == 1


@pytest.mark.parametrize(
    ("features", "kind", "flags"),
    [
        (F_VERSION_1, DISCARD, 0),  # the driver turned DISCARD down
        (F_VERSION_1, WRITE_ZEROES, 0),
        (None, DISCARD, 1),  # unmap is for write zeroes only
        (None, WRITE_ZEROES, 2),  # an unknown flag
    ],
    ids=["discard-declined", "zeroes-declined", "discard-unmap", "unknown-flag"],
)
def test_virtio_blk_io_error_leaves_a_command_the_device_refuses_unsupp_and_uncounted(
    blk, features, kind, flags
):
    """5.2.6.2's UNSUPPs come before any other check: a failing disk still knows which
    commands it has (QEMU's blkdebug sits under the device's own checks). Such a request
    never reaches the disk, as GET_ID: the fault neither makes it IOERR nor counts it."""
    driver, ring = started(blk, features)
    arm_io_error(blk, on="write")
    refused = request(ring, kind, 0, [(struct.pack("<QII", 4, 1, flags), False)])
    write = request(ring, OUT, 1, [(b"\x11" * 512, False)])  # the first write: fails

    driver.kick()

    assert (status_of(blk, refused), status_of(blk, write)) == (UNSUPP, IOERR)
    assert blk.stats()["injected_errors"] == 1


def test_virtio_blk_io_error_leaves_a_write_a_readonly_disk_refuses_uncounted(fds):
    """A read-only disk answers a write IOERR of its own: the fault does not count it, and
    is still armed for the request it was meant for."""
    dev = make(fds, readonly=True)
    driver, ring = started(dev)
    arm_io_error(dev, on="write")
    status = request(ring, OUT, 1, [(b"\x11" * 512, False)])

    driver.kick()

    assert status_of(dev, status) == IOERR and dev.stats()["injected_errors"] == 0
    assert dev.request_faults is not None and dev.request_faults.armed


def test_virtio_blk_io_error_armed_again_counts_its_requests_from_then(blk):
    """Arming replaces the fault, and `after` counts from the new one: the write seen under
    the old one is not the new one's first."""
    driver, ring = started(blk)
    arm_io_error(blk, after=2, on="write")
    first = request(ring, OUT, 1, [(b"\x11" * 512, False)])
    driver.kick()
    arm_io_error(blk, after=2, on="write")
    statuses = [request(ring, OUT, n, [(b"\x22" * 512, False)]) for n in (2, 3)]

    driver.kick()

    assert [status_of(blk, s) for s in (first, *statuses)] == [OK, OK, IOERR]


def test_virtio_blk_io_error_spent_fails_nothing_on_the_ring_after_a_reset(blk):
    """A request is known by its ring and place: the ring a reset brings up is new, and its
    first request is not the old ring's first, which the fault failed."""
    driver, ring = started(blk)
    arm_io_error(blk, on="write")
    failed = request(ring, OUT, 1, [(b"\x11" * 512, False)])
    driver.kick()

    driver.set_status(0)  # the driver resets the device, and sets it up on new memory
    ring = Ring(blk.ram, base=0x20000)
    ring.heap = 0x30000
    driver.start(ring, F_VERSION_1)
    again = request(ring, OUT, 1, [(b"\x22" * 512, False)])
    driver.kick()

    assert ring.take_used() == [(0, 1)]
    assert (status_of(blk, failed), status_of(blk, again)) == (IOERR, OK)
    assert blk.stats()["injected_errors"] == 1


def test_virtio_blk_io_error_of_the_config_arms_the_requests_at_start(blk):
    """A config's `fault = "io-error..."` is the fault the process starts with
    (runtime._serve_sandboxed): it fails requests as one armed by ctl does."""
    fault = faults.decode(faults.make("io-error", on="write"), "fault", ConfigError)
    injector = FaultInjector(fault, blk.request_faults)
    driver, ring = started(blk)
    status = request(ring, OUT, 1, [(b"\x11" * 512, False)])

    driver.kick()

    assert status_of(blk, status) == IOERR and injector.fault is None


def test_io_error_fault_armed_over_the_channel_and_refused_where_no_requests(blk):
    from splitvmm.devprocs.serial import Uart8250
    from tests.fakes import FakeIrq

    message = {"op": "fault", "seq": 5, **faults.make("io-error", on="write")}
    sock = FakeSocket()
    _serve_control(blk, sock, control.encode(message), FaultInjector(requests=blk.request_faults))
    assert control.check_reply(control.decode(sock.sent[0]), "fault", 5, "virtio-blk")
    assert blk.request_faults is not None and blk.request_faults.armed

    uart = Uart8250(DeviceContext(irq=FakeIrq()))
    sock = FakeSocket()
    _serve_control(uart, sock, control.encode(message), FaultInjector())
    (refused,) = sock.sent  # one reply: a second would answer the monitor's next request
    with pytest.raises(ProtocolError, match="io-error fault needs a model that serves requests"):
        control.check_reply(control.decode(refused), "fault", 5, "serial")


# -- state ------------------------------------------------------------------------------------
def test_virtio_blk_snapshot_mid_way_restores_and_serves_the_rest(blk, fds):
    driver, ring = started(blk)
    request(ring, IN, 0, [(512, True)])
    driver.kick()
    blk.quiesce()
    status = request(ring, IN, 1, [(512, True)])  # arrives while quiesced
    state = blk.save()

    restored = VirtioBlk.restore(prepared("virtio-blk", fds), state)
    restored.resume()
    serve_ready(restored)  # the event loop's next step

    assert restored.save().queues[0].used_idx == 2 and status_of(restored, status) == OK
    assert [h for h, _ in ring.take_used()] == [0, 3]


def test_virtio_blk_restore_refuses_a_serial_that_is_not_ascii(blk):
    bad = replace(blk.save(), serial="dísk".encode())

    with pytest.raises(StateError, match="not ASCII"):
        VirtioBlk.restore(blk.ctx, bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"serial": "disk-0002"}, "serial is 'disk-0002' in the config, 'disk-0001' in the saved"),
        ({"serial": "disk-0001", "readonly": True}, "readonly is true in the config, false in"),
        ({"serial": "x" * 21}, "serial is 21 bytes, at most 20"),
    ],
    ids=["other-serial", "now-readonly", "bad-serial"],
)
def test_virtio_blk_restored_refuses_config_options_the_guest_would_not_see(blk, options, message):
    """A restore takes the guest-visible values from the state: a config that says other
    (or what a boot refuses) is refused, not left a lie."""
    restored = VirtioBlk.restore(blk.ctx, blk.save())

    with pytest.raises(ConfigError, match=message):
        restored.check_options(options)


def test_virtio_blk_restore_in_a_device_process_checks_the_spec_options(blk, fds):
    """runtime.build_device, as a restored process runs it: the refusal it raises is what
    the process sends the monitor ("options rejected: ...")."""
    doc = codec.state_document("virtio-blk", blk.save())
    spec = DeviceSpec("disk0", "virtio-blk", "ipc://unused", options={"serial": "d2"}, state=doc)

    with pytest.raises(ConfigError, match="serial is 'd2' in the config"):
        build_device(spec, prepared("virtio-blk", fds))


def test_virtio_blk_restored_takes_the_options_it_was_saved_with(blk):
    VirtioBlk.restore(blk.ctx, blk.save()).check_options({"serial": "disk-0001", "path": "x"})


def test_virtio_blk_restore_refuses_an_image_smaller_than_the_saved_device(blk):
    bad = replace(blk.save(), capacity=SECTORS + 1)

    with pytest.raises(StateError, match="fewer than the 65 of the saved device"):
        VirtioBlk.restore(blk.ctx, bad)


def test_virtio_blk_image_grown_under_a_running_vm_restarts_with_the_size_the_guest_knows(
    blk, fds, disk
):
    """An operator grew the image while the VM ran: a crash restart (or a restore) keeps
    the capacity the driver read; the restarted device used to refuse the checkpoint as
    another image, and with every restart failing, the VM stopped."""
    driver, ring = started(blk)
    checkpoint = blk.save()
    os.truncate(disk, (SECTORS + 8) * 512)

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), checkpoint)
    restarted.after_restart()
    past = request(ring, IN, SECTORS, [(512, True)])  # past the end the guest knows
    Driver(restarted).kick()

    assert restarted.capacity == SECTORS and status_of(restarted, past) == IOERR


def test_virtio_blk_image_shrunk_under_a_running_vm_restarts_failing_past_its_end(
    blk, fds, disk, caplog
):
    driver, ring = started(blk)
    checkpoint = blk.save()
    os.truncate(disk, (SECTORS - 8) * 512)

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), checkpoint)
    restarted.after_restart()
    gone = request(ring, IN, SECTORS - 4, [(512, True)])
    kept = request(ring, IN, 0, [(512, True)])
    Driver(restarted).kick()

    assert restarted.capacity == SECTORS
    assert (status_of(restarted, gone), status_of(restarted, kept)) == (IOERR, OK)
    assert "shrunk under the VM" in caplog.text  # the operator is told why


@pytest.fixture
def write_back_fails(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next fdatasync fails with EIO, as after a write-back the disk refused; later ones
    succeed, as Linux's do once the failure was reported on that open file. The fds of every
    fdatasync the device makes from now on."""
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_virtio_blk_failed_write_back_fails_every_later_flush(blk, write_back_fails):
    """The host's page cache no longer matches the disk once a write-back failed, and the
    kernel said so once: every later FLUSH is IOERR (QEMU's page_cache_inconsistent)."""
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    first = request(ring, FLUSH, 0, [])
    driver.kick()
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    second = request(ring, FLUSH, 0, [])
    driver.kick()

    assert (status_of(blk, first), status_of(blk, second)) == (IOERR, IOERR)
    assert len(write_back_fails) == 1  # the second did not ask the kernel, which says 0
    assert blk.save().flush_error == errno.EIO


def test_virtio_blk_failed_write_back_fails_later_stable_writes(blk, write_back_fails):
    """Without FLUSH negotiated each write is synced before it completes (5.2.6.2): once a
    sync failed, no later write can be stable."""
    driver, ring = started(blk)  # VERSION_1 only: write-through
    first = request(ring, OUT, 1, [(b"\xab" * 512, False)])
    second = request(ring, OUT, 2, [(b"\xcd" * 512, False)])
    driver.kick()

    assert (status_of(blk, first), status_of(blk, second)) == (IOERR, IOERR)


def test_virtio_blk_failed_write_back_is_logged_though_a_failed_read_was_just_before(
    blk, monkeypatch, write_back_fails, caplog
):
    """A failing disk fails reads and write-back together. The write-back failure is said
    once (every later FLUSH fails without a word, for the VM's life): a read's failure
    logged within the same second must not silence it."""
    monkeypatch.setattr(RateLimitedLog, "INTERVAL_S", 3600.0)  # both within one interval

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", preadv)
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    read = request(ring, IN, 0, [(512, True)])
    flush = request(ring, FLUSH, 0, [])

    driver.kick()

    assert (status_of(blk, read), status_of(blk, flush)) == (IOERR, IOERR)
    assert "disk I/O failed" in caplog.text
    assert "write-back failed (" in caplog.text and "every later FLUSH fails" in caplog.text


def test_virtio_blk_failed_write_back_fails_flushes_after_a_crash_restart(
    blk, fds, write_back_fails
):
    """The restarted process shares the dead one's open file, whose fdatasync now says 0:
    the failure latched in the progress page before the guest saw IOERR fails its FLUSH."""
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    stale = blk.save()  # the last checkpoint: before the failure
    failed = request(ring, FLUSH, 0, [])
    driver.kick()  # IOERR: then the process dies, its checkpoint not taken since

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), stale)
    restarted.after_restart()
    again = request(ring, FLUSH, 0, [])
    Driver(restarted).kick()

    assert (status_of(blk, failed), status_of(restarted, again)) == (IOERR, IOERR)
    assert len(write_back_fails) == 1


class Killed(BaseException):
    """SIGKILL, delivered to a process as a system call returns: no Python runs after it."""


def next_process(fds: dict[str, int], stale: VirtioBlk.State) -> VirtioBlk:
    """The process a crash restart brings up, from the dead one's last checkpoint."""
    device = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), stale)
    device.after_restart()
    return device


class KilledInAFailedSync(Struct):
    """A device whose process was killed inside a failing fdatasync, on a real failing file
    system (tests/failing_disk.py): the failure taken on the device's open file, nothing
    latched. `fds`, its ring, and the dead process's last checkpoint (before the failure)."""

    fds: dict[str, int]
    ring: Ring
    stale: VirtioBlk.State

    def next_process(self) -> VirtioBlk:
        return next_process(self.fds, self.stale)


@pytest.fixture
def killed_in_a_failed_sync(tmp_path: Path) -> Iterator[KilledInAFailedSync]:
    with failing_fs(tmp_path) as top:
        disk = top / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(TOO_MUCH)
        fds = host_fds("virtio-blk", disk)
        try:
            dead = make(fds)
            _, ring = started(dead, F_VERSION_1 | F_FLUSH)
            stale = dead.save()
            # What the dead process did on its disk: its writes, then its FLUSH's fdatasync,
            # which failed as the process was killed
            os.pwrite(fds["disk"], b"\xab" * TOO_MUCH, 0)
            with pytest.raises(OSError):
                os.fdatasync(fds["disk"])
            yield KilledInAFailedSync(fds, ring, stale)
        finally:
            close_fds(fds)  # before the file system is unmounted


def test_virtio_blk_restart_fails_the_flushes_whose_failure_a_killed_process_took(
    killed_in_a_failed_sync,
):
    """A process killed during a failing fdatasync (SIGKILL waits for the disk, then ends the
    process before it latches anything) took the failure with it: the device's open file
    says nothing more. The next process's first FLUSH learns of it from its disk-errors
    description, latches it, and is IOERR, as is every later one."""
    dead = killed_in_a_failed_sync
    restarted = dead.next_process()
    first, second = request(dead.ring, FLUSH, 0, []), request(dead.ring, FLUSH, 0, [])
    Driver(restarted).kick()

    assert (status_of(restarted, first), status_of(restarted, second)) == (IOERR, IOERR)
    assert Progress(dead.fds["progress"]).latched() in (errno.EIO, errno.ENOSPC)


def test_virtio_blk_restart_after_a_kill_inside_the_disk_errors_question_still_fails(
    killed_in_a_failed_sync, monkeypatch
):
    """The question takes its answer as the call returns, as fdatasync does: a second
    process killed inside it (a failing disk holds its wait as it held the first's fdatasync)
    took the failure with it too. It latched EIO in doubt before it asked: the third
    process's FLUSH is IOERR."""
    dead = killed_in_a_failed_sync
    second = dead.next_process()
    real = files.wait_writeback

    def killed_as_it_returns(fd: int) -> None:
        try:
            real(fd)
        finally:
            raise Killed

    monkeypatch.setattr(files, "wait_writeback", killed_as_it_returns)
    request(dead.ring, FLUSH, 0, [])  # the FLUSH the first never answered, run again
    with pytest.raises(Killed):
        Driver(second).kick()
    monkeypatch.undo()

    third = dead.next_process()
    flush = request(dead.ring, FLUSH, 0, [])
    Driver(third).kick()

    assert status_of(third, flush) == IOERR


@pytest.fixture
def asked(fds: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes, bool]]:
    """Every question to a disk-errors description (files.wait_writeback), which finds no
    failure: (its fd, the host-I/O flag meanwhile, whether a latch in doubt stood)."""
    questions: list[tuple[int, bytes, bool]] = []

    def wait_writeback(fd: int) -> None:
        flag = os.pread(fds["progress"], 1, PROGRESS_HOST_IO_BYTE)
        questions.append((fd, flag, Progress(fds["progress"]).latched_in_doubt()))

    monkeypatch.setattr(files, "wait_writeback", wait_writeback)
    return questions


def test_virtio_blk_restarted_process_asks_its_disk_errors_at_its_first_sync_only(blk, fds, asked):
    """Once, before its first fdatasync, as a host call (a wait on writes under way may be
    long); the first process has nothing to ask: its disk-errors description heard of
    nothing before it."""
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    stale = blk.save()
    before = request(ring, FLUSH, 0, [])
    driver.kick()
    assert (status_of(blk, before), asked) == (OK, [])

    restarted = next_process(fds, stale)
    first, second = request(ring, FLUSH, 0, []), request(ring, FLUSH, 0, [])
    Driver(restarted).kick()

    assert (status_of(restarted, first), status_of(restarted, second)) == (OK, OK)
    assert asked == [(fds["disk-errors"], b"\x01", True)]
    assert Progress(fds["progress"]).latched() == 0  # the answer: nothing failed


def test_virtio_blk_restart_after_a_kill_inside_a_question_that_found_nothing_fails_flushes(
    blk, fds, monkeypatch, caplog
):
    """When in doubt, the guest is told its data may be lost, never that it is safe: the
    answer that died with its process is not known to have been "nothing"."""

    def killed_as_it_returns(fd: int) -> None:
        raise Killed

    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    stale = blk.save()
    second = next_process(fds, stale)
    monkeypatch.setattr(files, "wait_writeback", killed_as_it_returns)
    request(ring, FLUSH, 0, [])
    with pytest.raises(Killed):
        Driver(second).kick()
    monkeypatch.undo()

    third = next_process(fds, stale)
    flush = request(ring, FLUSH, 0, [])
    Driver(third).kick()

    assert status_of(third, flush) == IOERR
    assert "killed while it asked the image for a failed write-back" in caplog.text


def asks_after_restart(fds: dict[str, int], monkeypatch, readonly: bool = False) -> list[int]:
    """The disk-errors questions (their fds) a restarted process asks at its first FLUSH,
    which must be OK."""
    questions: list[int] = []
    monkeypatch.setattr(files, "wait_writeback", questions.append)
    dead = make(fds, readonly=readonly)
    _, ring = started(dead, F_VERSION_1 | F_FLUSH)
    restarted = next_process(fds, dead.save())
    flush = request(ring, FLUSH, 0, [])
    Driver(restarted).kick()
    assert status_of(restarted, flush) == OK
    return questions


def test_virtio_blk_restarted_direct_process_asks_nothing(direct_fds, monkeypatch):
    """O_DIRECT: no page cache to lose; each call says how it failed."""
    assert asks_after_restart(direct_fds, monkeypatch) == []


def test_virtio_blk_restarted_read_only_process_asks_nothing(fds, monkeypatch):
    """Nothing of ours to write back (QEMU: FLUSH is OK at once)."""
    assert asks_after_restart(fds, monkeypatch, readonly=True) == []


def test_virtio_blk_snapshot_keeps_a_failed_write_back(blk, fds, write_back_fails):
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    request(ring, FLUSH, 0, [])
    driver.kick()
    state = blk.save()
    page = os.memfd_create("progress", os.MFD_CLOEXEC)  # a restored VM's: nothing latched
    os.ftruncate(page, 4096)
    try:
        restored = VirtioBlk.restore(prepared("virtio-blk", {**fds, "progress": page}), state)
        status = request(ring, FLUSH, 0, [])
        Driver(restored).kick()

        assert status_of(restored, status) == IOERR
        assert Progress(page).latched() == errno.EIO  # and a restart after it keeps it
    finally:
        os.close(page)


def test_virtio_blk_v1_state_restores_without_a_failed_write_back(blk):
    doc = codec.state_document("virtio-blk", blk.save())
    fields = dict(doc["fields"])  # type: ignore[call-overload]
    del fields["flush_error"]  # what version 1 saved

    v1 = codec.state_from_document(
        "virtio-blk", VirtioBlk.State, {**doc, "version": 1, "fields": fields}
    )

    assert v1 == blk.save()


def host_io_flag_during(
    monkeypatch: pytest.MonkeyPatch, fds: dict[str, int], name: str
) -> list[bytes]:
    """The host-I/O flag, as the monitor reads it (pread), during each os.`name` call."""
    seen: list[bytes] = []
    real = getattr(os, name)

    def call(*args: object) -> object:
        seen.append(os.pread(fds["progress"], 1, PROGRESS_HOST_IO_BYTE))
        return real(*args)

    monkeypatch.setattr(os, name, call)
    return seen


@pytest.mark.parametrize(("kind", "call"), [(IN, "preadv"), (OUT, "pwritev"), (FLUSH, "fdatasync")])
def test_virtio_blk_host_io_flag_is_set_during_each_disk_call_only(
    blk, fds, monkeypatch, kind, call
):
    """The monitor waits past its deadlines for a device whose flag says it is inside a
    disk call (monitor/channel.py): set around each one, clear between them."""
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    during = host_io_flag_during(monkeypatch, fds, call)
    data = [(512, True)] if kind == IN else [(b"\xab" * 512, False)] if kind == OUT else []
    status = request(ring, kind, 1, data)
    driver.kick()

    assert status_of(blk, status) == OK and during == [b"\x01"]
    assert os.pread(fds["progress"], 1, PROGRESS_HOST_IO_BYTE) == b"\x00"


def test_virtio_blk_flag_a_killed_process_left_set_is_cleared_by_the_next(blk, fds):
    """Killed inside a disk call, a process leaves its host-I/O flag set in the page that
    outlives it: the process that serves next clears it, or the monitor would wait for
    every later hang as for a slow disk."""
    checkpoint = blk.save()
    os.pwrite(fds["progress"], b"\x01", PROGRESS_HOST_IO_BYTE)

    VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), checkpoint)

    assert os.pread(fds["progress"], 1, PROGRESS_HOST_IO_BYTE) == b"\x00"


def test_virtio_blk_restart_resumes_from_used_ring_none_twice(blk, fds, disk):
    driver, ring = started(blk)
    stale = blk.save()  # the last checkpoint: nothing used yet
    request(ring, OUT, 0, [(b"\x11" * 512, False)])
    driver.kick()  # completed after the checkpoint
    request(ring, OUT, 0, [(b"\x22" * 512, False)])  # available, never taken: then the crash

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), stale)
    restarted.after_restart()  # no frame to replay: the checkpoint is the last word
    for source in restarted.event_sources():
        if source.fd == fds["notify0"]:
            source.on_readable()  # restore kicked its own queue

    assert [h for h, _ in ring.take_used()] == [0, 3]  # the first once, the second once
    assert disk.read_bytes()[:512] == b"\x22" * 512


def test_virtio_blk_restart_interrupts_once_though_nothing_is_left_to_do(blk, fds):
    """The dead process may have completed chains and died before it interrupted: the new
    one interrupts each live queue once, so a driver waiting for it looks at its used ring."""
    driver, ring = started(blk)
    stale = blk.save()
    request(ring, IN, 0, [(512, True)])
    driver.kick()  # served, interrupted: then the process dies
    signalled(fds["intx"])

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), stale)
    restarted.after_restart()
    restarted.process_all()

    assert (ring.used_idx(), signalled(fds["intx"])) == (1, 1)


def test_virtio_blk_restart_replaying_queue_enable_keeps_the_used_position(blk, fds):
    before_enable = blk.save()  # the checkpoint: the queue not enabled yet
    driver, ring = started(blk)
    request(ring, IN, 0, [(512, True)])
    driver.kick()  # served by the process that then dies
    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), before_enable)
    replayed = Driver(restarted)

    with replaying(restarted):
        replayed.start(ring)  # the frames after the checkpoint, re-applied
    request(ring, IN, 1, [(512, True)])
    replayed.kick()

    assert [h for h, _ in ring.take_used()] == [0, 3]  # the first not re-run


def test_virtio_blk_chains_completed_before_a_bad_one_are_notified(blk, fds):
    """2.7.7.2: a used buffer notification is due for every chain the device completed.
    The chain after them (a header and no status byte) puts the device in NEEDS_RESET; the
    first one's queue interrupt used to go with it, and a driver that does not handle
    NEEDS_RESET (Linux's) waited for that completion forever."""
    driver, ring = started(blk)
    status = request(ring, IN, 0, [(512, True)])
    ring.add([(*ring.buffer(struct.pack("<IIQ", IN, 0, 0)), False)])  # no status byte
    signalled(fds["intx"])

    driver.kick()

    assert ring.take_used()[0][0] == 0 and status_of(blk, status) == OK
    assert driver.status() & NEEDS_RESET
    assert blk.isr & 0x1 and signalled(fds["intx"]) >= 1


# -- a host file system with no room (on_full) ----------------------------------------------
@pytest.fixture
def host_full(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """While its one item is True, every pwritev the device makes fails with ENOSPC (after
    writing nothing), as on a full file system; set it False to make room."""
    full = [True]
    real = os.pwritev

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    return full


def connected(dev: VirtioBlk) -> Channel:
    channel = Channel()
    dev.ctx.events.connect(channel.send)
    return channel


def test_virtio_blk_write_to_a_full_host_stalls_until_told_to_retry_then_is_done(
    blk, disk, host_full
):
    """ENOSPC is the host's to fix, not the guest's: the write and the chains after it go
    back to the ring unused (no IOERR for the guest to see), the device asks the monitor,
    once, to pause the VM, and serves nothing more until resumed; then it does them all."""
    channel = connected(blk)
    driver, ring = started(blk)
    first = request(ring, IN, 0, [(512, True)])
    write = request(ring, OUT, 1, [(b"\xab" * 512, False)])
    after = request(ring, IN, 1, [(512, True)])

    driver.kick()
    used_while_full = ring.take_used()
    driver.kick()  # a kick meanwhile serves nothing
    host_full[0] = False  # the operator makes room
    assert ring.take_used() == [] and blk.stalled is not None

    blk.retry()
    serve_ready(blk)  # the event loop's next step: the notify retry() signalled

    assert used_while_full == [(0, 513)] and status_of(blk, first) == OK
    assert [head for head, _ in ring.take_used()] == [3, 6]
    assert (status_of(blk, write), status_of(blk, after)) == (OK, OK)
    assert blk.ram.read(after - 512, 512) == b"\xab" * 512
    assert disk.read_bytes()[512:1024] == b"\xab" * 512
    stalls = channel.ops("stall")
    assert len(stalls) == 1 and "No space left on device" in str(stalls[0]["message"])
    assert blk.stalled is None


def test_virtio_blk_stalled_stays_so_through_a_snapshot_until_told_to_retry(blk, host_full):
    """A snapshot's quiesce and resume are no retry: only the VM's resume is (the monitor's
    "retry"), so the device and its slot agree on the stall."""
    driver, ring = started(blk)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()
    host_full[0] = False
    blk.quiesce()
    blk.save()
    blk.resume()
    serve_ready(blk)
    held = (ring.take_used(), blk.stalled is not None)

    blk.retry()
    serve_ready(blk)

    assert held == ([], True) and ring.take_used() == [(0, 1)]


def test_virtio_blk_write_still_full_at_its_retry_stalls_again(blk, host_full):
    channel = connected(blk)
    driver, ring = started(blk)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()

    blk.retry()
    serve_ready(blk)

    assert ring.take_used() == [] and blk.stalled is not None
    assert len(channel.ops("stall")) == 2  # one a stall: the monitor pauses the VM again


@pytest.mark.parametrize("kind", [DISCARD, WRITE_ZEROES])
def test_virtio_blk_discard_or_write_zeroes_on_a_full_host_stalls(blk, monkeypatch, kind):
    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "fallocate", fallocate)
    driver, ring = started(blk)
    request(ring, kind, 0, [(struct.pack("<QII", 1, 1, 0), False)])

    driver.kick()

    assert ring.take_used() == [] and blk.stalled is not None


def test_virtio_blk_on_full_error_fails_the_write_instead(fds, host_full):
    dev = make(fds, on_full="error")
    channel = connected(dev)
    driver, ring = started(dev)
    write = request(ring, OUT, 1, [(b"\xab" * 512, False)])

    driver.kick()

    assert status_of(dev, write) == IOERR and ring.take_used() == [(0, 1)]
    assert channel.ops("stall") == [] and dev.stalled is None


def test_virtio_blk_snapshot_while_stalled_restores_the_write_not_taken(blk, fds, disk, host_full):
    """A snapshot of a stalled device has the request available, not taken: a restore
    (with room by then) does it."""
    driver, ring = started(blk)
    write = request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()
    blk.quiesce()
    state = blk.save()
    host_full[0] = False

    restored = VirtioBlk.restore(prepared("virtio-blk", fds), state)
    restored.resume()
    serve_ready(restored)

    assert (state.queues[0].last_avail, state.queues[0].used_idx) == (0, 0)
    assert ring.take_used() == [(0, 1)] and status_of(restored, write) == OK
    assert disk.read_bytes()[512:1024] == b"\xab" * 512


def test_virtio_blk_reset_forgets_a_stall(blk, host_full):
    driver, ring = started(blk)
    request(ring, OUT, 1, [(b"\xab" * 512, False)])
    driver.kick()

    driver.set_status(0)  # the driver resets the device: its requests are gone

    assert blk.stalled is None


def test_virtio_blk_failed_write_back_with_enospc_is_ioerr_not_a_stall(blk, monkeypatch):
    """A FLUSH's ENOSPC on a page-cache image lost writes already: IOERR, latched, as any
    failed write-back (trying it again would find the error latched)."""

    def fdatasync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    driver, ring = started(blk, F_VERSION_1 | F_FLUSH)
    flush = request(ring, FLUSH, 0, [])

    driver.kick()

    assert status_of(blk, flush) == IOERR and blk.stalled is None
    assert blk.save().flush_error == errno.ENOSPC


# -- an image opened with O_DIRECT (the `direct` option) ---------------------------------------


@pytest.fixture
def direct_fds(disk: Path) -> Iterator[dict[str, int]]:
    """The device's fds with the disk opened as the monitor opens a `direct = true` one."""
    fds = host_fds("virtio-blk", disk)
    os.close(fds.pop("disk"))
    try:
        fds["disk"] = os.open(disk, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as e:  # EINVAL: this file system takes no O_DIRECT
        close_fds(fds)
        pytest.skip(f"{disk.parent} is on a file system without direct I/O: {e}")
    yield fds
    close_fds(fds)


@pytest.fixture
def bounces(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    """Every request that went through the bounce buffer: (offset, bytes, write)."""
    seen: list[tuple[int, int, bool]] = []
    real = VirtioBlk._bounced

    def spy(self: VirtioBlk, offset: int, views: list[memoryview], total: int, write: bool) -> None:
        seen.append((offset, total, write))
        real(self, offset, views, total, write)

    monkeypatch.setattr(VirtioBlk, "_bounced", spy)
    return seen


def aligned(ring: Ring, data: bytes | int) -> tuple[int, int]:
    """A buffer at a page-aligned gpa (Ring.buffer aligns to 16 bytes only)."""
    ring.heap = -(-ring.heap // 4096) * 4096
    return ring.buffer(data)


def sector_bytes(n: int) -> bytes:
    return bytes(range(256)) * 2  # what the disk fixture put in every sector


def test_virtio_blk_direct_aligned_request_moves_in_place(direct_fds, disk, bounces):
    """A page-cache driver's request (page-aligned buffers, a block-aligned offset) needs no
    bounce: O_DIRECT moves it between the file and guest RAM as the buffered path does."""
    dev = make(direct_fds)
    assert dev.bounce is not None  # the device saw O_DIRECT on its fd
    driver, ring = started(dev)
    served = []
    for kind, data, writable in [(OUT, b"\x5a" * 4096, False), (IN, 4096, True)]:
        header = ring.buffer(struct.pack("<IIQ", kind, 0, 8))
        buf, status = aligned(ring, data), ring.buffer(b"\xff")
        ring.add([(*header, False), (*buf, writable), (*status, True)])
        driver.kick()  # one request a kick: a slow disk may end a kick's budget after one
        served += [(ring.take_used()[0][1], status_of(dev, status[0]))]

    assert served == [(1, OK), (4097, OK)] and dev.ram.read(buf[0], 4096) == b"\x5a" * 4096
    assert disk.read_bytes()[8 * 512 : 16 * 512] == b"\x5a" * 4096 and bounces == []


def test_virtio_blk_direct_failed_flush_is_not_latched(direct_fds, write_back_fails):
    """O_DIRECT writes bypass the page cache: a failed fdatasync lost no cached write, and
    the next FLUSH asks the disk again (as QEMU's cache=none)."""
    dev = make(direct_fds)
    driver, ring = started(dev, F_VERSION_1 | F_FLUSH)
    first = request(ring, FLUSH, 0, [])
    second = request(ring, FLUSH, 0, [])
    driver.kick()

    assert (status_of(dev, first), status_of(dev, second)) == (IOERR, OK)
    assert len(write_back_fails) == 2 and dev.save().flush_error == 0
    assert failures(dev) == (1, 1, 0)  # counted once, by _io_failed


def test_virtio_blk_direct_unaligned_read_goes_through_the_bounce_buffer(direct_fds, bounces):
    """Sector 1 (not on a 4 KiB block) into buffers at 16-byte-aligned gpas: O_DIRECT takes
    neither in place; the device reads the blocks around it and copies the request's part."""
    dev = make(direct_fds)
    driver, ring = started(dev)
    status = request(ring, IN, 1, [(512, True), (1536, True)])

    driver.kick()

    assert ring.take_used()[0][1] == 2049 and status_of(dev, status) == OK
    assert dev.ram.read(status - 2048, 2048) == sector_bytes(1) * 4
    assert bounces == [(512, 2048, False)]


def test_virtio_blk_direct_unaligned_write_keeps_the_rest_of_its_blocks(direct_fds, disk, bounces):
    """A write of sectors 7..9 covers parts of blocks 0 and 1: each is read, patched and
    written whole, so the sectors around the request keep their data."""
    dev = make(direct_fds)
    driver, ring = started(dev)
    status = request(ring, OUT, 7, [(b"\xab" * 1000, False), (b"\xcd" * 536, False)])

    driver.kick()

    image = disk.read_bytes()
    assert status_of(dev, status) == OK and bounces == [(7 * 512, 1536, True)]
    assert image[7 * 512 : 10 * 512] == b"\xab" * 1000 + b"\xcd" * 536
    assert image[: 7 * 512] == sector_bytes(0) * 7
    assert image[10 * 512 :] == sector_bytes(0) * (SECTORS - 10)


def test_virtio_blk_direct_unaligned_request_larger_than_the_bounce_buffer(
    disk, direct_fds, monkeypatch
):
    """A request longer than the bounce buffer moves one aligned span at a time; buffers of
    odd sizes straddle the spans."""
    monkeypatch.setattr("splitvmm.devprocs.virtio_blk.BOUNCE_BYTES", 8192)
    dev = make(direct_fds)
    assert dev.bounce is not None and len(dev.bounce) == 8192
    driver, ring = started(dev)
    payload = bytes((i * 7) & 0xFF for i in range(20 * 512))
    status = request(ring, OUT, 3, [(payload[:1536], False), (payload[1536:], False)])
    driver.kick()  # one request a kick: a slow disk may end a kick's budget after one
    sizes = [512, 7008, 20 * 512 - 7520]  # multiples of 16: Ring.buffer lays them end to end
    status2 = request(ring, IN, 3, [(n, True) for n in sizes])
    driver.kick()

    image = disk.read_bytes()
    assert [used for _, used in ring.take_used()] == [1, 20 * 512 + 1]
    assert [status_of(dev, status), status_of(dev, status2)] == [OK, OK]
    assert image[3 * 512 : 23 * 512] == payload
    assert image[: 3 * 512] + image[23 * 512 :] == sector_bytes(0) * (SECTORS - 20)
    assert dev.ram.read(status2 - 20 * 512, 20 * 512) == payload


@pytest.mark.parametrize(("sector", "count"), [(1, 2), (8, 8)], ids=["unaligned", "aligned"])
def test_virtio_blk_direct_write_zeroes_written_as_zeros(
    direct_fds, disk, monkeypatch, sector, count
):
    """Without ZERO_RANGE (tmpfs) the zeros are written: through the bounce buffer where the
    range is not whole blocks, from the page-aligned zero page where it is."""
    no_holes(monkeypatch)
    dev = make(direct_fds)
    driver, ring = started(dev)
    status = request(ring, WRITE_ZEROES, 0, [(struct.pack("<QII", sector, count, 0), False)])

    driver.kick()

    image = disk.read_bytes()
    start, end = sector * 512, (sector + count) * 512
    assert status_of(dev, status) == OK and image[start:end] == bytes(end - start)
    assert image[:start] + image[end:] == sector_bytes(0) * (SECTORS - count)


def aligned_request(ring: Ring, kind: int, sector: int, data: bytes | int) -> tuple[int, int]:
    """An IN or OUT of one page-aligned buffer at a block-aligned sector: (its head, the
    buffer's gpa). Its status byte starts at 0xff, so a request left unserved shows."""
    header = ring.buffer(struct.pack("<IIQ", kind, 0, sector))
    buf, status = aligned(ring, data), ring.buffer(b"\xff")
    head = ring.add([(*header, False), (buf[0], buf[1], kind == IN), (*status, True)])
    return head, buf[0]


@pytest.fixture
def in_flight(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many AIO requests were in flight at each submit."""
    seen: list[int] = []
    real = AioContext.submit

    def submit(self: AioContext, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        seen.append(len(self))

    monkeypatch.setattr(AioContext, "submit", submit)
    return seen


def test_virtio_blk_direct_requests_are_in_flight_together_and_used_in_order(
    direct_fds, disk, in_flight
):
    """Five aligned reads in one kick (three descriptors each: the ring has 16) go to the disk
    together (AIO), and reach the used ring in the order the driver made them available,
    each with its own data."""
    disk.write_bytes(b"".join(bytes([n]) * 4096 for n in range(SECTORS // 8)))
    dev = make(direct_fds)
    driver, ring = started(dev)
    requests = [aligned_request(ring, IN, 8 * (7 - n), 4096) for n in range(5)]

    driver.kick()

    assert ring.take_used() == [(head, 4097) for head, _ in requests]
    assert [dev.ram.read(gpa, 4096) for _, gpa in requests] == [
        bytes([7 - n]) * 4096 for n in range(5)
    ]
    assert max(in_flight) > 1 and dev.counts["aio_requests"] == 5 and len(dev.aio) == 0


def test_virtio_blk_direct_flush_waits_for_the_writes_in_flight(direct_fds, monkeypatch):
    """A FLUSH (served in place) covers the writes before it: none is in flight when its
    fdatasync runs."""
    dev = make(direct_fds, serial="d")
    driver, ring = started(dev, F_VERSION_1 | F_FLUSH)
    at_sync: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        at_sync.append(len(dev.aio))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    heads = [aligned_request(ring, OUT, 8 * n, b"\x33" * 4096)[0] for n in range(3)]
    flush = request(ring, FLUSH, 0, [])

    driver.kick()

    assert [head for head, _ in ring.take_used()][:3] == heads
    assert at_sync == [0] and status_of(dev, flush) == OK


def test_virtio_blk_direct_hostile_chain_waits_for_the_requests_in_flight(direct_fds):
    """Reads in flight when a chain names memory outside guest RAM: they finish (they write
    into guest RAM) and are used before the device stops (NEEDS_RESET)."""
    dev = make(direct_fds)
    driver, ring = started(dev)
    heads = [aligned_request(ring, IN, 8 * n, 4096)[0] for n in range(3)]
    header = ring.buffer(struct.pack("<IIQ", IN, 0, 0))
    ring.add([(*header, False), (1 << 40, 4096, True), (*ring.buffer(1), True)])

    driver.kick()

    assert driver.status() & NEEDS_RESET and len(dev.aio) == 0
    assert ring.take_used() == [(head, 4097) for head in heads]


@pytest.mark.parametrize("result", [-errno.EIO, 2048], ids=["failed", "short"])
def test_virtio_blk_direct_failed_or_short_completion(direct_fds, monkeypatch, result):
    """A completion with -errno is IOERR (the buffer zeroed); a short one is finished in
    place, so the guest gets all its data."""
    real = AioContext.wait

    def wait(
        self: AioContext, least: int = 1, timeout_ns: int | None = None
    ) -> list[tuple[int, int]]:
        done = real(self, least, timeout_ns)
        if result > 0:  # what the kernel read past a short result is not the guest's yet
            dev.ram.write(gpa + result, b"\xee" * (4096 - result))
        return [(token, result) for token, _ in done]

    monkeypatch.setattr(AioContext, "wait", wait)
    dev = make(direct_fds)
    driver, ring = started(dev)
    head, gpa = aligned_request(ring, IN, 8, 4096)
    dev.ram.write(gpa, b"\xee" * 4096)

    driver.kick()

    ((used, written),) = ring.take_used()
    status = dev.ram.read(gpa + 4096, 1)[0]
    if result < 0:
        assert (used, written, status) == (head, 4097, IOERR)
        assert dev.ram.read(gpa, 4096) == bytes(4096) and failures(dev) == (1, 1, 0)
    else:
        assert (used, written, status) == (head, 4097, OK)
        assert dev.ram.read(gpa, 4096) == sector_bytes(8) * 8 and failures(dev) == (0, 0, 0)


def test_virtio_blk_direct_completions_out_of_order_are_used_in_order(
    direct_fds, disk, monkeypatch
):
    """The disk may finish requests in any order: they reach the used ring in the order the
    driver made them available, a request served in place (GET_ID) in its turn."""
    disk.write_bytes(b"".join(bytes([n]) * 4096 for n in range(SECTORS // 8)))
    real = AioContext.wait
    monkeypatch.setattr(
        AioContext, "wait", lambda self, least=1, ns=None: list(reversed(real(self, len(self))))
    )
    dev = make(direct_fds, serial="id")
    driver, ring = started(dev)
    first = [aligned_request(ring, IN, 8 * n, 4096) for n in range(2)]
    get_id = request(ring, GET_ID, 0, [(20, True)])
    last = aligned_request(ring, IN, 8 * 5, 4096)

    driver.kick()

    heads = [head for head, _ in ring.take_used()]
    assert heads == [first[0][0], first[1][0], heads[2], last[0]] and len(heads) == 4
    assert [dev.ram.read(gpa, 4096) for _, gpa in [*first, last]] == [
        bytes([n]) * 4096 for n in (0, 1, 5)
    ]
    assert dev.ram.read(get_id - 32, 20) == b"id".ljust(20, b"\0")  # 20 bytes take 32


def test_virtio_blk_direct_without_an_aio_context_serves_in_place(direct_fds, monkeypatch, caplog):
    """io_setup refused (the host's fs.aio-max-nr used up, or no AIO): the device starts all
    the same and serves each request in place, one at a time."""

    def refuse(self: AioContext, depth: int) -> None:
        raise OSError(errno.EAGAIN, "io_setup")

    monkeypatch.setattr(AioContext, "__init__", refuse)
    dev = make(direct_fds)
    driver, ring = started(dev)
    head, gpa = aligned_request(ring, IN, 8, 4096)

    driver.kick()

    assert dev.aio is None and ring.take_used() == [(head, 4097)]
    assert dev.ram.read(gpa, 4096) == sector_bytes(8) * 8 and "no AIO context" in caplog.text


def test_virtio_blk_direct_used_chains_interrupt_before_the_device_waits_for_more(
    direct_fds, monkeypatch
):
    """The ring dry and a request still in flight: the chains already used get their
    interrupt before the device blocks for the rest, not once every one is done."""
    real = AioContext.wait
    interrupts_at_wait: list[int] = []
    held: list[tuple[int, int]] = []  # completions not reported yet

    def one_at_a_time(
        self: AioContext, least: int = 1, timeout_ns: int | None = None
    ) -> list[tuple[int, int]]:
        interrupts_at_wait.append(dev.interrupts)
        held.extend(real(self, len(self)))
        return [held.pop(0)]

    monkeypatch.setattr(AioContext, "wait", one_at_a_time)
    dev = make(direct_fds)
    driver, ring = started(dev)
    for n in range(2):
        aligned_request(ring, IN, 8 * n, 4096)

    driver.kick()

    assert [used for _, used in ring.take_used()] == [4097, 4097]
    assert interrupts_at_wait == [0, 1]  # the first chain's interrupt came before the wait


def test_virtio_blk_direct_error_of_its_own_mid_batch_ends_the_drain(direct_fds, monkeypatch):
    """An unexpected error while finishing a batch of completions (MemoryError under the
    address-space limit, a bug) loses the rest of that batch: the drain ends with the error,
    for the device's on_crash policy, rather than waiting for ever for what was lost."""
    real = AioContext.wait
    monkeypatch.setattr(AioContext, "wait", lambda self, least=1, ns=None: real(self, len(self)))
    calls: list[int] = []
    real_complete = VirtioBlk._complete

    def complete(self: VirtioBlk, *args: object) -> int:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ValueError("boom")
        return real_complete(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(VirtioBlk, "_complete", complete)
    dev = make(direct_fds)
    driver, ring = started(dev)
    for n in range(3):
        aligned_request(ring, IN, 8 * n, 4096)

    with pytest.raises(ValueError, match="boom"):
        driver.kick()
    assert len(dev.aio) == 0
    # None is used: the first's completion was lost with the error, its status byte never
    # written, and the others come after it. All three were used (status 0, or whatever the
    # driver's byte held): a restart, taking the queue up from the used ring, ran none again.
    assert ring.take_used() == []


def test_virtio_blk_zeros_are_a_private_mapping():
    """The zygote maps ZEROS once for every device it forks: a shared mapping would let one
    device (mprotect is allowed) change what every other writes as zeros."""
    address = int(cffi.FFI().cast("uintptr_t", cffi.FFI().from_buffer(virtio_blk.ZEROS)))
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            assert perms == "r--p", line
            return
    pytest.fail("ZEROS is in no mapping")


def test_virtio_blk_direct_chain_made_available_while_others_are_in_flight_is_started(
    direct_fds, monkeypatch, in_flight
):
    """Kicks are off while the device drains, so a driver that refills the ring on seeing a
    chain done does it without a kick: with requests in flight and the ring dry, the device
    waits for them only REFILL_POLL_NS at a time and looks at the ring in between."""
    real = AioContext.wait
    timeouts: list[int | None] = []

    def wait(
        self: AioContext, least: int = 1, timeout_ns: int | None = None
    ) -> list[tuple[int, int]]:
        timeouts.append(timeout_ns)
        if len(timeouts) == 1:
            aligned_request(ring, IN, 16, 4096)  # the driver refills, without a kick
            return []
        return real(self, least, timeout_ns)

    monkeypatch.setattr(AioContext, "wait", wait)
    dev = make(direct_fds)
    monkeypatch.setattr(dev, "BUDGET_NS", 60 * 10**9)  # a preemption must not end the drain
    driver, ring = started(dev)
    aligned_request(ring, IN, 0, 4096)

    driver.kick()

    assert timeouts[0] == dev.REFILL_POLL_NS and in_flight == [1, 2]
    assert [used for _, used in ring.take_used()] == [4097, 4097]


def test_virtio_blk_direct_write_completing_with_enospc_stalls_with_the_chains_after_it(
    direct_fds, disk, monkeypatch
):
    """An AIO write that completes with -ENOSPC: the chains before it are used, it and
    those after it (done meanwhile or not) go back to the ring; resumed with room, all are
    done, in order."""
    full = [True]
    real = AioContext.wait

    def wait(
        self: AioContext, least: int = 1, timeout_ns: int | None = None
    ) -> list[tuple[int, int]]:
        done = real(self, len(self))  # all at once: the stall is found mid-batch
        return [(t, -errno.ENOSPC if full[0] and t == stalling else r) for t, r in done]

    monkeypatch.setattr(AioContext, "wait", wait)
    dev = make(direct_fds)
    driver, ring = started(dev)
    before = aligned_request(ring, IN, 0, 4096)
    write = aligned_request(ring, OUT, 8, b"\x5a" * 4096)
    after = aligned_request(ring, IN, 8, 4096)
    stalling = 2  # AIO token of the second request

    driver.kick()
    used_while_full = ring.take_used()
    full[0] = False
    dev.retry()
    serve_ready(dev)

    assert used_while_full == [(before[0], 4097)] and dev.stalled is None
    assert ring.take_used() == [(write[0], 1), (after[0], 4097)]
    assert dev.ram.read(after[1], 4096) == b"\x5a" * 4096
    assert disk.read_bytes()[8 * 512 : 16 * 512] == b"\x5a" * 4096 and len(dev.aio) == 0


# -- crash restarts anywhere under I/O (hypothesis) ---------------------------------------------
BLK_STEP = st.one_of(
    st.tuples(
        st.just("write"), st.integers(0, SECTORS - 4), st.integers(1, 4), st.integers(0, 255)
    ),
    st.tuples(st.just("read"), st.integers(0, SECTORS - 4), st.integers(1, 4), st.just(0)),
    st.tuples(
        st.sampled_from(["flush", "kick", "checkpoint", "crash"]),
        st.just(0),
        st.just(0),
        st.just(0),
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(BLK_STEP, max_size=40))
def test_virtio_blk_crash_restarts_anywhere_lose_and_repeat_no_request(steps, tmp_path):
    """Requests made available, kicked or not, with the device dying between any two steps
    and its successor taking up from the used ring (from whichever checkpoint the monitor
    last read): every request completes once and OK, each read returns what the writes
    before it left, and the disk ends as the writes in order make it."""
    disk = tmp_path / "disk.img"  # one per test, written afresh for each example
    disk.write_bytes(bytes(range(256)) * 2 * SECTORS)
    model = bytearray(disk.read_bytes())
    fds = host_fds("virtio-blk", disk)
    try:
        dev = make(fds, serial="disk-0001")
        driver, ring = started(dev, F_VERSION_1 | F_FLUSH)
        checkpoint = dev.save()
        requests: list[tuple[int, tuple[int, bytes] | None]] = []  # status gpa, read's data
        in_flight: list[tuple[int, int]] = []  # (head, request), oldest first
        done: list[int] = []

        def completed(used: list[tuple[int, int]]) -> None:
            """Used entries, in order: each the oldest request in flight (heads are reused)."""
            for head, _ in used:
                assert in_flight and in_flight[0][0] == head, f"{head} used out of order"
                done.append(in_flight.pop(0)[1])

        for kind, sector, count, byte in steps:
            if kind in ("write", "read", "flush") and len(in_flight) < ring.size // 3:
                code = {"write": OUT, "read": IN, "flush": FLUSH}[kind]
                status = ring.buffer(1)[0]
                parts = [(*ring.buffer(struct.pack("<IIQ", code, 0, sector)), False)]
                span = slice(sector * 512, (sector + count) * 512)
                read = None
                if kind == "write":
                    data = bytes([byte]) * 512 * count
                    parts.append((*ring.buffer(data), False))
                    model[span] = data
                elif kind == "read":
                    buf = ring.buffer(512 * count)
                    parts.append((*buf, True))
                    read = (buf[0], bytes(model[span]))
                head = ring.add([*parts, (status, 1, True)])
                in_flight.append((head, len(requests)))
                requests.append((status, read))
            elif kind == "kick":
                Driver(dev).kick()
            elif kind == "checkpoint":
                checkpoint = dev.save()
            elif kind == "crash":
                dev = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), checkpoint)
                dev.ctx.waiting = lambda: False
                dev.clock_ns = SteppingClock(step=1_000)  # type: ignore[method-assign]
                dev.after_restart()
                serve_ready(dev)  # the kick after_restart() gave its queue
            completed(ring.take_used())
        Driver(dev).kick()
        completed(ring.take_used())

        assert done == list(range(len(requests))) and not in_flight  # each once, in order
        for i, (status, read) in enumerate(requests):
            assert dev.ram.read(status, 1) == b"\x00", f"request {i} did not complete OK"
            if read is not None:
                gpa, data = read
                assert dev.ram.read(gpa, len(data)) == data, f"request {i} read other data"
        assert disk.read_bytes() == bytes(model)
    finally:
        close_fds(fds)


def test_virtio_blk_segment_over_max_discard_sectors_is_ioerr_inside_the_disk(tmp_path):
    """5.2.6.2: a segment over max_discard_sectors is a driver's MUST NOT; the device refuses
    it even inside the disk (the same check bounds write zeroes, whose fallback writes zeros:
    DISCARD here, so that a regression punches a hole rather than allocate 2 GiB)."""
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate((virtio_blk.MAX_DISCARD_SECTORS + 8) * 512)  # sparse: room for the segment
    fds = host_fds("virtio-blk", big)
    try:
        dev = make(fds)
        driver, ring = started(dev)
        segment = struct.pack("<QII", 0, virtio_blk.MAX_DISCARD_SECTORS + 1, 0)
        status = request(ring, DISCARD, 0, [(segment, False)])

        driver.kick()

        assert status_of(dev, status) == IOERR
    finally:
        close_fds(fds)


@pytest.mark.parametrize("kind", [DISCARD, WRITE_ZEROES])
def test_virtio_blk_more_segments_than_max_discard_seg_is_ioerr(blk, disk, kind):
    """5.2.6.2: max_discard_seg (max_write_zeroes_seg) is 1: a request of two valid segments
    is refused whole, and the disk keeps both ranges."""
    driver, ring = started(blk)
    data = struct.pack("<QII", 0, 1, 0) + struct.pack("<QII", 8, 1, 0)
    status = request(ring, kind, 0, [(data, False)])

    driver.kick()

    assert status_of(blk, status) == IOERR
    assert disk.read_bytes()[8 * 512 : 9 * 512] == sector_bytes(8)


def test_virtio_blk_direct_out_on_readonly_disk_is_ioerr_and_starts_nothing(direct_fds, disk):
    """An aligned write on a direct image would go to the disk through AIO (_start), not
    through _serve: the readonly check must stand on that path too."""
    dev = make(direct_fds, readonly=True)
    driver, ring = started(dev)
    header = ring.buffer(struct.pack("<IIQ", OUT, 0, 8))
    buf, status = aligned(ring, b"\x5a" * 4096), ring.buffer(b"\xff")
    ring.add([(*header, False), (*buf, False), (*status, True)])

    driver.kick()

    assert (status_of(dev, status[0]), dev.counts["aio_requests"]) == (IOERR, 0)
    assert disk.read_bytes()[8 * 512 : 16 * 512] == sector_bytes(8) * 8


# -- mutation audit: guest-facing checks no test caught when broken -------------------------------
def test_virtio_blk_header_cut_short_is_ioerr_and_reads_nothing(blk):
    """5.2.6: the request header is 16 bytes. One cut short (8 bytes: type IN, no sector) is
    the driver's to fix: IOERR, its data buffer zeroed, never a request read as if the rest
    of the header were zeros."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<II", IN, 0))
    data, status = ring.buffer(b"\xee" * 512), ring.buffer(b"\xff")
    ring.add([(*header, False), (data[0], 512, True), (*status, True)])

    driver.kick()

    assert (status_of(blk, status[0]), ring.take_used()[0][1]) == (IOERR, 513)
    assert blk.ram.read(data[0], 512) == bytes(512)
    assert not driver.status() & NEEDS_RESET


@pytest.mark.parametrize("kind", [DISCARD, WRITE_ZEROES])
@pytest.mark.parametrize(
    "segment", [b"", bytes(10), bytes(16 + 8)], ids=["none", "10-bytes", "1.5"]
)
def test_virtio_blk_segments_not_a_whole_number_of_16_bytes_are_ioerr(blk, disk, kind, segment):
    """5.2.6: a DISCARD or WRITE_ZEROES carries whole 16-byte segments, at least one. Any
    other data (none, or a segment cut short) is IOERR, nothing on the disk changes, and the
    device goes on (a cut one once reached struct's unpacking, an error of its own)."""
    driver, ring = started(blk)
    before = disk.read_bytes()
    status = request(ring, kind, 0, [(segment, False)] if segment else [])

    driver.kick()

    assert status_of(blk, status) == IOERR and disk.read_bytes() == before
    assert not driver.status() & NEEDS_RESET


def test_virtio_blk_get_id_into_small_buffers_writes_none_past_them(blk):
    """GET_ID's 20 bytes go into the writable buffers as far as each reaches (2.7.4: any
    split), never a byte past a buffer's end into the guest memory beside it."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<IIQ", GET_ID, 0, 0))
    first, second = ring.buffer(b"\xcc" * 16), ring.buffer(b"\xcc" * 16)
    status = ring.buffer(1)
    ring.add([(*header, False), (first[0], 7, True), (second[0], 13, True), (*status, True)])

    driver.kick()

    assert status_of(blk, status[0]) == OK and ring.take_used()[0][1] == 21
    serial = b"disk-0001".ljust(20, b"\0")
    assert blk.ram.read(first[0], 16) == serial[:7] + b"\xcc" * 9
    assert blk.ram.read(second[0], 16) == serial[7:] + b"\xcc" * 3


def test_virtio_blk_header_split_across_descriptors_is_gathered(blk, disk):
    """2.7.4: the device makes no assumption about how the driver splits the header: its
    type in one descriptor and its sector in another (not next to it in RAM) make the
    same request, not one read from the bytes after the first descriptor."""
    driver, ring = started(blk)
    head_lo = ring.buffer(struct.pack("<II", OUT, 0))  # 8 bytes, then 8 bytes of padding
    head_hi = ring.buffer(struct.pack("<Q", 5))
    data, status = ring.buffer(b"\xab" * 512), ring.buffer(1)
    ring.add([(*head_lo, False), (*head_hi, False), (*data, False), (*status, True)])

    driver.kick()

    assert status_of(blk, status[0]) == OK
    assert disk.read_bytes()[5 * 512 : 6 * 512] == b"\xab" * 512
    assert disk.read_bytes()[:512] == sector_bytes(0)


def test_virtio_blk_status_byte_at_the_end_of_the_data_descriptor(blk):
    """2.7.4: the status byte is the last byte of the writable part, wherever the driver put
    it: data and status in one 513-byte descriptor read one sector into its first 512."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<IIQ", IN, 0, 2))
    both = ring.buffer(b"\xee" * 513)
    ring.add([(*header, False), (*both, True)])

    driver.kick()

    assert (status_of(blk, both[0] + 512), ring.take_used()[0][1]) == (OK, 513)
    assert blk.ram.read(both[0], 512) == sector_bytes(2)


def test_virtio_blk_failed_request_zeroes_overlapping_buffers_whole(blk):
    """A failed request's writable buffers are zeroed whole (used len counts them): one that
    lies inside another (a driver may point descriptors at one buffer) shrinks nothing of
    the outer's range, which keeps no stale byte."""
    driver, ring = started(blk)
    header = ring.buffer(struct.pack("<IIQ", IN, 0, 0))
    outer, status = ring.buffer(b"\xee" * 512), ring.buffer(b"\xff")
    inner = (outer[0] + 16, 16)
    ring.add([(*header, False), (*outer, True), (*inner, True), (*status, True)])

    driver.kick()

    assert status_of(blk, status[0]) == IOERR  # 528 bytes: no whole number of sectors
    assert ring.take_used()[0][1] == 512 + 16 + 1
    assert blk.ram.read(outer[0], 512) == bytes(512)
