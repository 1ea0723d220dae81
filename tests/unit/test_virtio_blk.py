"""virtio-blk (devprocs/virtio_blk.py) against a disk image in a temporary file, driven
through the PCI transport and a split ring laid out as a driver does (virtio 1.2 5.2)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.devprocs.virtio_blk import VirtioBlk
from splitvmm.errors import ConfigError, StateError
from splitvmm.record import replace
from tests.virtio.support import (
    DEVICE_CFG,
    F_EVENT_IDX,
    F_VERSION_1,
    NEEDS_RESET,
    Driver,
    Ring,
    close_fds,
    host_fds,
    prepared,
    serve_ready,
    signalled,
)

SECTORS = 64
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
OK, IOERR, UNSUPP = 0, 1, 2
F_RO, F_DISCARD, F_WRITE_ZEROES = 1 << 5, 1 << 13, 1 << 14


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
    return VirtioBlk.from_options(prepared("virtio-blk", fds), options)


@pytest.fixture
def blk(fds: dict[str, int]) -> VirtioBlk:
    return make(fds, serial="disk-0001")


def started(dev: VirtioBlk, features: int = F_VERSION_1) -> tuple[Driver, Ring]:
    driver, ring = Driver(dev), Ring(dev.ram)
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


def test_virtio_blk_out_on_readonly_disk_is_ioerr(fds, disk):
    dev = make(fds, readonly=True)
    driver, ring = started(dev)
    status = request(ring, OUT, 0, [(b"\xab" * 512, False)])

    driver.kick()

    assert status_of(dev, status) == IOERR and disk.read_bytes()[:2] == b"\x00\x01"


def test_virtio_blk_in_past_the_end_is_ioerr(blk):
    driver, ring = started(blk)
    status = request(ring, IN, SECTORS - 1, [(1024, True)])

    driver.kick()

    assert status_of(blk, status) == IOERR and ring.take_used()[0][1] == 1


def test_virtio_blk_in_of_partial_sector_is_ioerr(blk):
    driver, ring = started(blk)
    status = request(ring, IN, 0, [(100, True)])

    driver.kick()

    assert status_of(blk, status) == IOERR


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


def test_virtio_blk_write_zeroes_zeroes_the_range(blk, disk):
    driver, ring = started(blk)
    status = request(ring, WRITE_ZEROES, 0, [(struct.pack("<QII", 1, 2, 0), False)])

    driver.kick()

    image = disk.read_bytes()
    assert status_of(blk, status) == OK
    assert image[512:1536] == bytes(1024) and image[1536:1538] == b"\x00\x01"


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


def test_virtio_blk_restore_refuses_another_capacity(blk):
    bad = replace(blk.save(), capacity=SECTORS + 1)

    with pytest.raises(StateError, match="sectors"):
        VirtioBlk.restore(blk.ctx, bad)


def test_virtio_blk_restart_resumes_from_used_ring_none_twice(blk, fds, disk):
    driver, ring = started(blk)
    stale = blk.save()  # the last checkpoint: nothing used yet
    request(ring, OUT, 0, [(b"\x11" * 512, False)])
    driver.kick()  # completed after the checkpoint
    request(ring, OUT, 0, [(b"\x22" * 512, False)])  # available, never taken: then the crash

    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), stale)
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
    restarted.process_all()

    assert (ring.used_idx(), signalled(fds["intx"])) == (1, 1)


def test_virtio_blk_restart_replaying_queue_enable_keeps_the_used_position(blk, fds):
    before_enable = blk.save()  # the checkpoint: the queue not enabled yet
    driver, ring = started(blk)
    request(ring, IN, 0, [(512, True)])
    driver.kick()  # served by the process that then dies
    restarted = VirtioBlk.restore(prepared("virtio-blk", fds, restarted=True), before_enable)
    replayed = Driver(restarted)

    replayed.start(ring)  # the frames after the checkpoint, re-applied
    request(ring, IN, 1, [(512, True)])
    replayed.kick()

    assert [h for h, _ in ring.take_used()] == [0, 3]  # the first not re-run
