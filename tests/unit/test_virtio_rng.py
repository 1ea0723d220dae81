"""virtio-rng (devprocs/virtio_rng.py, virtio 1.2 5.4): each writable buffer filled."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from splitvmm.devprocs.virtio_rng import MAX_SLICE, VirtioRng
from tests.virtio.support import (
    DEVICE_CFG,
    F_VERSION_1,
    Driver,
    Ring,
    close_fds,
    host_fds,
    prepared,
)


@pytest.fixture
def rng() -> Iterator[VirtioRng]:
    fds = host_fds("virtio-rng")
    yield VirtioRng(prepared("virtio-rng", fds))
    close_fds(fds)


def test_virtio_rng_fills_every_writable_buffer(rng):
    driver, ring = Driver(rng), Ring(rng.ram)
    driver.start(ring)
    a, b = ring.buffer(4096), ring.buffer(4096)
    head = ring.add([(*a, True), (*b, True)])

    driver.kick()

    assert ring.take_used() == [(head, 8192)]
    assert rng.ram.read(a[0], 4096) != bytes(4096) and rng.ram.read(b[0], 4096) != bytes(4096)


def test_virtio_rng_short_getrandom_reports_only_the_bytes_written(rng, monkeypatch):
    """2.7.8: len counts bytes written; the driver takes len bytes as entropy (5.4.6.1)."""
    monkeypatch.setattr(os, "getrandom", lambda n: b"\x5a" * min(n, 1000))
    driver, ring = Driver(rng), Ring(rng.ram)
    driver.start(ring)
    a, b = ring.buffer(4096), ring.buffer(4096)
    head = ring.add([(*a, True), (*b, True)])

    driver.kick()

    assert ring.take_used() == [(head, 1000)]


def test_virtio_rng_readable_buffer_left_alone(rng):
    driver, ring = Driver(rng), Ring(rng.ram)
    driver.start(ring)
    src = ring.buffer(b"\x5a" * 32)
    head = ring.add([(*src, False), (*ring.buffer(16), True)])

    driver.kick()

    assert ring.take_used() == [(head, 16)] and rng.ram.read(src[0], 32) == b"\x5a" * 32


def test_virtio_rng_offers_no_features_of_its_own(rng):
    assert Driver(rng).device_features() == F_VERSION_1 | 1 << 29 | 1 << 28


def test_virtio_rng_has_no_device_configuration(rng):
    assert Driver(rng).rd(DEVICE_CFG, 4) == 0


def test_virtio_rng_fills_at_most_max_slice_of_a_chain(rng):
    """5.4.6: the device MAY use less than the whole buffer. A chain of 16 descriptors of
    1 MiB each, all over the same megabyte, asked for 16 MiB in one request (255 of 16 MiB
    took a sandboxed device 14 s, its event loop deaf to its heartbeat meanwhile); a request
    gets MAX_SLICE at most, the first bytes of its buffers in order."""
    driver, ring = Driver(rng), Ring(rng.ram)
    driver.start(ring)
    gpa, _ = ring.buffer(1 << 20)
    head = ring.add([(gpa, 1 << 20, True)] * 16)

    driver.kick()

    assert ring.take_used() == [(head, MAX_SLICE)]
    assert rng.ram.read(gpa + MAX_SLICE, 16) == bytes(16)
