"""The virtio PCI transport (devprocs/virtio/pci.py), driven through its window the way a
driver does (virtio 1.2 4.1), with virtio-rng as the model (it has no state of its own)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.devprocs.virtio.msix import NO_VECTOR
from splitvmm.devprocs.virtio.queue import Chain
from splitvmm.devprocs.virtio.state import VirtioPciState
from splitvmm.devprocs.virtio_rng import VirtioRng
from splitvmm.errors import StateError
from splitvmm.protocol.models import PROGRESS_MSIX_ENABLED_BYTE, PROGRESS_VECTORS_AT
from splitvmm.record import replace
from tests.virtio.support import (
    ACK,
    BAR1,
    COMMAND,
    COMMAND_MASTER,
    DRIVER,
    DRIVER_OK,
    F_EVENT_IDX,
    F_INDIRECT,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    NEEDS_RESET,
    NOTIFY,
    Channel,
    Driver,
    Ring,
    SteppingClock,
    close_fds,
    host_fds,
    iter_caps,
    prepared,
    queue_at,
    replaying,
    serve_ready,
    signalled,
)

MSI_ADDRESS = 0xFEE00000


@pytest.fixture
def fds() -> Iterator[dict[str, int]]:
    fds = host_fds("virtio-rng")
    yield fds
    close_fds(fds)


@pytest.fixture
def rng(fds: dict[str, int]) -> VirtioRng:
    return VirtioRng(prepared("virtio-rng", fds))


@pytest.fixture
def driver(rng: VirtioRng) -> Driver:
    return Driver(rng)


@pytest.fixture
def channel(rng: VirtioRng) -> Channel:
    ch = Channel()
    rng.ctx.events.connect(ch.send)
    return ch


def cfg(driver: Driver, offset: int, size: int) -> int:
    return driver.rd(offset, size)


def vndr_caps(driver: Driver) -> dict[int, tuple[int, int, int]]:
    """cfg_type -> (bar, offset, length) of each virtio_pci_cap, found by walking the list."""
    found = {}
    for at, cap_id in iter_caps(lambda o, s: cfg(driver, o, s)):
        if cap_id == 0x09:
            raw = bytes(cfg(driver, at + i, 1) for i in range(16))
            _, _, _, cfg_type, bar, _, offset, length = struct.unpack("<BBBBBBxxII", raw)
            found[cfg_type] = (bar, offset, length)
    return found


def msix_cap(driver: Driver) -> int:
    return next(at for at, cap_id in iter_caps(lambda o, s: cfg(driver, o, s)) if cap_id == 0x11)


# -- configuration space ------------------------------------------------------------------------
def test_virtio_pci_header_identifies_a_modern_virtio_rng(driver):
    assert cfg(driver, 0x00, 2) == 0x1AF4
    assert cfg(driver, 0x02, 2) == 0x1044
    assert cfg(driver, 0x08, 1) == 1  # revision
    assert cfg(driver, 0x08, 4) >> 8 == 0xFF0000  # class code
    assert cfg(driver, 0x2C, 2) == 0x1AF4 and cfg(driver, 0x2E, 2) == 0x44  # 4.1.2.1: >= 0x40
    assert cfg(driver, 0x04, 2) == 0x0002  # memory decode on, as the monitor starts it
    assert cfg(driver, 0x06, 2) & 0x10  # capability list
    assert cfg(driver, 0x0E, 1) == 0  # header type 0
    assert (cfg(driver, 0x3C, 1), cfg(driver, 0x3D, 1)) == (16, 1)  # intx_gsi, INTA#


def test_virtio_pci_capabilities_walked_from_the_pointer_name_every_structure(driver):
    caps = vndr_caps(driver)

    assert caps[1] == (0, 0x0000, 0x3C)  # common
    assert caps[2] == (0, 0x3000, 4)  # notify, one queue
    assert caps[3] == (0, 0x1000, 1)  # ISR
    assert caps[4][:2] == (0, 0x2000)  # device configuration


def test_virtio_pci_notify_cap_has_multiplier_4(driver):
    at = next(a for a, c in iter_caps(lambda o, s: cfg(driver, o, s))
              if c == 9 and cfg(driver, a + 3, 1) == 2)  # fmt: skip
    assert cfg(driver, at + 2, 1) == 20 and cfg(driver, at + 16, 4) == 4


def test_virtio_pci_msix_cap_points_at_bar1(driver):
    at = msix_cap(driver)

    assert cfg(driver, at + 2, 2) & 0x7FF == 1  # table size - 1: two vectors
    assert (cfg(driver, at + 4, 4), cfg(driver, at + 8, 4)) == (1, 0x801)


def pci_cfg_cap(driver: Driver) -> int:
    return next(at for at, c in iter_caps(lambda o, s: cfg(driver, o, s))
                if c == 9 and cfg(driver, at + 3, 1) == 5)  # fmt: skip


def test_virtio_pci_cfg_access_cap_reads_bar0_through_config_space(driver):
    at = pci_cfg_cap(driver)
    driver.wr(at + 4, 0, 1)  # BAR 0
    driver.wr(at + 8, 0x12, 4)  # num_queues
    driver.wr(at + 12, 2, 4)

    assert cfg(driver, at + 16, 4) == 1


def test_virtio_pci_cfg_access_cap_writes_bar0_through_config_space(driver):
    at = pci_cfg_cap(driver)
    driver.wr(at + 8, 0x14, 4)  # device_status
    driver.wr(at + 12, 1, 4)
    driver.wr(at + 16, ACK, 1)

    assert driver.status() == ACK


@pytest.mark.parametrize("width", [1, 2], ids=["four-bytes", "two-halves"])
def test_virtio_pci_cfg_access_cap_writes_a_dword_in_parts(driver, width):
    """pci_cfg_data is read-write (4.1.4.9): a driver that writes a 32-bit register through
    it a part at a time ends with the whole value there, not the last part padded with
    zeros (nor the first part alone)."""
    at = pci_cfg_cap(driver)
    driver.wr(at + 8, 0x20, 4)  # queue_desc, low dword
    driver.wr(at + 12, 4, 4)
    value = 0x1234_5678
    for part in range(0, 4, width):
        driver.wr(at + 16 + part, value >> (8 * part) & ((1 << (8 * width)) - 1), width)
    assert driver.common(0x20, 4) == value


def test_virtio_pci_cfg_access_cap_write_past_its_length_writes_nothing(driver):
    at = pci_cfg_cap(driver)
    driver.wr(at + 8, 0x14, 4)  # device_status, one byte
    driver.wr(at + 12, 1, 4)
    driver.wr(at + 16, ACK, 1)
    driver.wr(at + 18, 0, 1)  # not in the first cap.length bytes: no write of status 0
    assert driver.status() == ACK


def test_virtio_pci_cfg_access_cap_past_the_bar_reads_zero(driver):
    at = pci_cfg_cap(driver)
    driver.wr(at + 4, 3, 1)  # no BAR 3
    driver.wr(at + 12, 4, 4)

    assert cfg(driver, at + 16, 4) == 0


def test_virtio_pci_command_register_keeps_writable_bits_only(driver):
    driver.wr(0x04, 0xFFFF, 2)

    assert cfg(driver, 0x04, 2) == 0x0546


def test_virtio_pci_bar_registers_read_zero_and_ignore_writes(driver):
    driver.wr(0x10, 0xFFFFFFFF, 4)

    assert cfg(driver, 0x10, 4) == 0


def test_virtio_pci_interrupt_line_is_writable(driver):
    driver.wr(0x3C, 5, 1)

    assert cfg(driver, 0x3C, 1) == 5


# -- common configuration ------------------------------------------------------------------------
def test_virtio_pci_device_features_offer_transport_bits(driver):
    assert driver.device_features() == F_VERSION_1 | F_EVENT_IDX | F_INDIRECT


def test_virtio_pci_features_ok_accepted_with_version_1(driver):
    assert driver.negotiate(F_VERSION_1 | F_EVENT_IDX) & FEATURES_OK


def test_virtio_pci_features_ok_refused_without_version_1(driver):
    assert not driver.negotiate(F_EVENT_IDX) & FEATURES_OK


def test_virtio_pci_features_ok_refused_for_unoffered_bit(driver):
    assert not driver.negotiate(F_VERSION_1 | 1 << 5) & FEATURES_OK


def test_virtio_pci_features_ok_cleared_without_a_reset_stays_set(rng, driver):
    """2.1.2: the driver MUST NOT clear a status bit; only a reset (0) does. FEATURES_OK
    cleared would let it write other features under the queues set up with the accepted
    ones (they are read-only from FEATURES_OK on). DRIVER_OK may go: Windows' drivers clear
    it to stop the device before a power-off, and the device then serves no queue."""
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    driver.set_status(ACK | DRIVER)
    driver.set_common(0x08, 0, 4)  # driver_feature_select
    driver.set_common(0x0C, F_EVENT_IDX, 4)  # driver_feature: EVENT_IDX now

    assert driver.status() == ACK | DRIVER | FEATURES_OK
    assert rng.driver_features == F_VERSION_1
    driver.set_status(0)
    assert driver.status() == 0


def test_virtio_pci_driver_ok_cleared_stops_the_queues(rng, driver):
    """virtio-win's power-off clears DRIVER_OK and hands its buffers back to Windows: the
    device must not serve a chain after it (QEMU stops too)."""
    ring = Ring(rng.ram)
    driver.start(ring)
    driver.set_status(ACK | DRIVER | FEATURES_OK)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()

    assert ring.take_used() == [] and driver.status() == ACK | DRIVER | FEATURES_OK


def test_virtio_pci_restore_refuses_accepted_features_the_device_does_not_offer(rng, driver, fds):
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    rng.quiesce()
    state = rng.save()
    hostile = replace(state, driver_features=F_VERSION_1 | 1 << 5)

    with pytest.raises(StateError, match="the driver took features 0x20, which this device"):
        VirtioRng.restore(prepared("virtio-rng", fds), hostile)
    # Features written but never accepted bind nothing: any a driver wrote restore.
    unaccepted = replace(hostile, status=ACK | DRIVER)
    assert VirtioRng.restore(prepared("virtio-rng", fds), unaccepted).driver_features == (
        F_VERSION_1 | 1 << 5
    )


def test_virtio_pci_restore_refuses_accepted_features_without_version_1(rng, driver, fds):
    """virtio 1.2 6.1: a device MAY fail to operate without VERSION_1, and this one refuses
    FEATURES_OK without it (test_virtio_pci_features_ok_refused_without_version_1). A state
    that says such a set was accepted ran its queues on features no driver could negotiate."""
    ring = Ring(rng.ram)
    driver.start(ring)
    rng.quiesce()
    hostile = replace(rng.save(), driver_features=0)

    with pytest.raises(StateError, match="virtio-rng state: .* lack VIRTIO_F_VERSION_1"):
        VirtioRng.restore(prepared("virtio-rng", fds), hostile)


def test_virtio_pci_queue_enabled_before_features_ok_is_ignored(rng, driver, fds):
    """3.1.1: queues are set up after FEATURES_OK. Taken before, the ring was laid out by
    the features written so far (no EVENT_IDX here), and the running device's snapshot
    laid it out by the accepted ones: its used ring no longer fit at the end of RAM, and
    the VM's own snapshot did not restore. Ignored (and counted), the driver that then
    enables it in order gets a ring laid out by what it negotiated."""
    ring = Ring(rng.ram, size=16)
    ram_end = max(r.gpa + r.size for r in rng.ram.ranges)
    ring.used = ram_end - (4 + 8 * 16)  # fits only without EVENT_IDX's avail_event
    driver.enable_bus_master()
    driver.set_status(ACK | DRIVER)
    driver.set_common(0x08, 1, 4)
    driver.set_common(0x0C, F_VERSION_1 >> 32, 4)
    bad = rng.ctx.counters.bad_access
    driver.setup_queue(0, ring)
    early = (driver.common(0x1C, 2), rng.ctx.counters.bad_access - bad)
    driver.set_common(0x08, 0, 4)
    driver.set_common(0x0C, F_EVENT_IDX, 4)
    driver.set_status(ACK | DRIVER | FEATURES_OK)
    driver.set_common(0x1C, 1, 2)  # enabled in order now: EVENT_IDX's ring is past RAM
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert early == (0, 1)
    assert driver.status() & NEEDS_RESET
    rng.quiesce()
    restored = VirtioRng.restore(prepared("virtio-rng", fds), rng.save())
    assert restored.status & NEEDS_RESET and restored.rings == [None]


def test_virtio_pci_state_with_a_queue_enabled_before_features_ok_restores_it_disabled(
    rng, driver, fds
):
    """A state saved by a release that took such an enable: restored live, the driver went
    on to negotiate EVENT_IDX over a ring laid out without it, and the VM's own next
    snapshot did not restore."""
    ring = Ring(rng.ram, size=16)
    ring.used = max(r.gpa + r.size for r in rng.ram.ranges) - (4 + 8 * 16)
    driver.enable_bus_master()
    driver.set_status(ACK | DRIVER)
    driver.setup_queue(0, ring)  # ignored here; the older release took it
    saved = rng.save()
    old = replace(saved, queues=(replace(saved.queues[0], enabled=True), *saved.queues[1:]))
    back = VirtioRng.restore(prepared("virtio-rng", fds), old)
    restored_enable = Driver(back).common(0x1C, 2)
    again = Driver(back)
    assert again.negotiate(F_VERSION_1 | F_EVENT_IDX) & FEATURES_OK
    again.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    back.quiesce()
    VirtioRng.restore(prepared("virtio-rng", fds), back.save())
    assert (restored_enable, back.rings) == (0, [None])


def test_virtio_pci_common_access_of_wrong_width_reads_zero_and_counts(rng, driver):
    value = driver.rd(0x1000 + 0x12, 4)  # num_queues is 16-bit

    assert value == 0 and rng.ctx.counters.bad_access == 1


def test_virtio_pci_num_queues_reads_one(driver):
    assert driver.common(0x12, 2) == 1


def test_virtio_pci_queue_size_writable_down_to_a_power_of_two(driver):
    driver.set_common(0x18, 100, 2)
    assert driver.common(0x18, 2) == 256
    driver.set_common(0x18, 64, 2)
    assert driver.common(0x18, 2) == 64


def test_virtio_pci_queue_select_past_the_queues_reads_size_zero(driver):
    driver.set_common(0x16, 5, 2)

    assert driver.common(0x18, 2) == 0


def test_virtio_pci_queue_select_past_the_queues_maps_no_vector(driver):
    """A queue that does not exist has no vector: 0 would be a mapped one (4.1.5.1.2)."""
    driver.set_common(0x16, 5, 2)
    driver.set_common(0x1A, 0, 2)

    assert driver.common(0x1A, 2) == 0xFFFF
    assert driver.common(0x1C, 2) == 0  # nor is it enabled


def test_virtio_pci_queue_addresses_read_back_64_bit(driver):
    driver.set_common(0x20, 0x1234_5678_9ABC_DEF0, 8)
    driver.set_common(0x28 + 4, 0x1, 4)

    assert driver.common(0x20, 8) == 0x1234_5678_9ABC_DEF0
    assert driver.common(0x28, 8) == 1 << 32


def test_virtio_pci_queue_vector_past_the_table_reads_no_vector(driver):
    driver.set_common(0x1A, 7, 2)

    assert driver.common(0x1A, 2) == 0xFFFF


def test_virtio_pci_reset_reads_back_zero_and_forgets_queues(rng, driver):
    ring = Ring(rng.ram)
    driver.start(ring)
    driver.set_status(0)

    assert driver.status() == 0
    assert driver.common(0x1C, 2) == 0 and driver.common(0x20, 8) == 0
    assert rng.rings == [None]


# -- queues and interrupts -------------------------------------------------------------------------
def test_virtio_pci_notify_fills_buffer_and_asserts_intx(rng, driver, fds):
    ring = Ring(rng.ram)
    driver.start(ring)
    gpa, n = ring.buffer(64)
    head = ring.add([(gpa, n, True)])

    driver.kick()

    assert ring.take_used() == [(head, 64)]
    assert signalled(fds["intx"]) == 1
    assert driver.rd(ISR, 1) == 1 and driver.rd(ISR, 1) == 0  # reading clears it


def test_virtio_pci_drain_asks_for_no_kicks_while_serving_then_clears_it(rng, driver, monkeypatch):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])
    flags_seen = []
    serve = rng.handle

    def handle(q: int, chain: Chain) -> int:
        flags_seen.append(rng.ram.u16(ring.used))  # used flags while the chain is served
        return serve(q, chain)

    monkeypatch.setattr(rng, "handle", handle)

    driver.kick()

    assert flags_seen == [1]  # VIRTQ_USED_F_NO_NOTIFY
    assert rng.ram.u16(ring.used) == 0


def test_virtio_pci_chain_made_available_while_serving_is_taken_in_the_same_drain(
    rng, driver, monkeypatch
):
    ring = Ring(rng.ram)
    driver.start(ring)
    first = ring.add([(*ring.buffer(8), True)])
    later = ring.buffer(8)
    serve = rng.handle

    def handle(q: int, chain: Chain) -> int:
        if chain.head == first:  # the driver adds one without a kick (NO_NOTIFY is set)
            ring.add([(*later, True)])
        return serve(q, chain)

    monkeypatch.setattr(rng, "handle", handle)

    driver.kick()

    assert [head for head, _ in ring.take_used()] == [first, first + 1]


def on_look(rng: VirtioRng, look, watch: int | None = None) -> list[int]:
    """Call look(n) at the device's n-th read of queue 0's avail idx (its polling, then the
    check after it asks for kicks again); the u16 at guest address `watch` (default: the
    used ring's flags) at each look, listed."""
    queue = rng.rings[0]
    assert queue is not None
    seen: list[int] = []
    avail_idx = queue.avail_idx

    def looked() -> int:
        seen.append(rng.ram.u16(queue.used if watch is None else watch))
        look(len(seen))
        return avail_idx()

    queue.avail_idx = looked  # type: ignore[method-assign]
    return seen


def test_virtio_pci_chain_made_available_while_polling_is_served_without_a_kick(
    rng, driver, fds, monkeypatch
):
    """After a drain that served something, the device looks for more for POLL_NS with kicks
    still off; what the driver adds meanwhile is served in the same process() call, after
    the interrupt for what was done before (the poll never holds an interrupt back)."""
    ring = Ring(rng.ram)
    driver.start(ring)
    first = ring.add([(*ring.buffer(8), True)])
    later = ring.buffer(8)
    monkeypatch.setattr(rng, "clock_ns", SteppingClock(step=1_000))
    monkeypatch.setattr(rng, "POLL_NS", 10_000)  # ten looks
    flags = on_look(rng, lambda n: n == 3 and ring.add([(*later, True)]))
    seen = []
    serve = rng.handle

    def handle(q: int, chain: Chain) -> int:
        seen.append((chain.head, signalled(fds["intx"])))
        return serve(q, chain)

    monkeypatch.setattr(rng, "handle", handle)

    driver.kick()

    assert [head for head, _ in ring.take_used()] == [first, first + 1]
    assert seen == [(first, 0), (first + 1, 1)]  # the first chain's interrupt came first
    assert flags[:3] == [1, 1, 1]  # VIRTQ_USED_F_NO_NOTIFY all along the poll
    assert rng.ram.u16(ring.used) == 0  # kicks asked for again at the end
    assert {k: rng.stats()[k] for k in ("polls", "poll_hits")} == {"polls": 2, "poll_hits": 1}


def test_virtio_pci_poll_without_a_chain_runs_out_and_asks_for_kicks(rng, driver, monkeypatch):
    ring = Ring(rng.ram)
    driver.start(ring)
    monkeypatch.setattr(rng, "clock_ns", SteppingClock(step=1_000))
    monkeypatch.setattr(rng, "POLL_NS", 10_000)
    flags = on_look(rng, lambda n: None)
    ring.add([(*ring.buffer(8), True)])

    driver.kick()

    assert len(ring.take_used()) == 1
    # it looked, kicks off, until POLL_NS ran out; the last look is the check after asking
    # for kicks again
    assert len(flags) >= 5 and set(flags[:-1]) == {1} and flags[-1] == 0


def test_virtio_pci_no_poll_after_a_notify_that_found_nothing(rng, driver, monkeypatch):
    ring = Ring(rng.ram)
    driver.start(ring)
    monkeypatch.setattr(rng, "POLL_NS", 60 * 10**9)
    polls = []
    monkeypatch.setattr(rng, "_arrives_within", lambda *args: polls.append(args) or False)

    driver.kick()  # nothing available: an idle device never polls

    assert polls == []
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert len(polls) == 1 and len(ring.take_used()) == 1


def test_virtio_pci_poll_with_event_idx_leaves_avail_event_until_it_ends(rng, driver, monkeypatch):
    """With EVENT_IDX, kicks are off while avail_event stays behind (2.7.10): the poll does
    not move it; asking for kicks again sets it to the next chain."""
    ring = Ring(rng.ram)
    driver.start(ring, features=F_VERSION_1 | F_EVENT_IDX)
    avail_event = ring.used + 4 + 8 * ring.size
    ring.add([(*ring.buffer(8), True)])
    monkeypatch.setattr(rng, "clock_ns", SteppingClock(step=1_000))
    monkeypatch.setattr(rng, "POLL_NS", 10_000)
    seen = on_look(rng, lambda n: None, watch=avail_event)

    driver.kick()

    assert len(ring.take_used()) == 1
    # not moved while it looked; then (the check after it): kick me when chain 1 comes
    assert len(seen) >= 5 and set(seen[:-1]) == {0} and seen[-1] == 1


def test_virtio_pci_hostile_chain_made_available_while_polling_needs_reset(
    rng, driver, monkeypatch
):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])
    monkeypatch.setattr(rng, "clock_ns", SteppingClock(step=1_000))
    monkeypatch.setattr(rng, "POLL_NS", 10_000)
    on_look(rng, lambda n: n == 2 and ring.add([(0xFFFF_FFFF_FFFF_0000, 8, True)]))

    driver.kick()

    assert len(ring.take_used()) == 1
    assert driver.status() & NEEDS_RESET


def bounded_clock() -> Callable[[], int]:
    """A device's clock_ns (SteppingClock) past whose first simulated second a process()
    still running fails the test: a loop ends it rather than hang it."""
    clock = SteppingClock()

    def bounded() -> int:
        if clock.now > 1_000_000_000:
            raise AssertionError("process() never handed the event loop back")
        return clock()

    return bounded


def test_virtio_pci_used_flags_on_avail_idx_needs_reset_not_a_loop(rng, driver, monkeypatch):
    """A used ring at avail + 2 (both aligned as 2.7 asks) puts used flags on avail idx: each
    VIRTQ_USED_F_NO_NOTIFY the device wrote made a chain available, each clear took it back
    (avail idx 0, 65535 entries "ahead"). process() asked for kicks, was told more came,
    found none, and asked again, forever: the device never answered its channel again. An
    avail idx more than the queue's size ahead is an error (2.7): NEEDS_RESET."""
    ring = Ring(rng.ram, size=4)
    ring.avail += 2  # 2-aligned, the least 2.7 asks of it
    ring.used = ring.avail + 2  # 4-aligned: its flags are avail idx
    monkeypatch.setattr(rng, "clock_ns", bounded_clock())
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])

    driver.kick()

    assert driver.status() & NEEDS_RESET


def test_virtio_pci_process_returns_to_the_event_loop_when_its_budget_is_spent(
    rng, driver, fds, monkeypatch
):
    """A driver that never lets the ring run dry still gets its frames served: process()
    stops after BUDGET_NS with kicks still off and its own notify eventfd signalled, and the
    next round takes up where it stopped."""
    ring = Ring(rng.ram)
    driver.start(ring)
    heads = [ring.add([(*ring.buffer(8), True)]) for _ in range(3)]
    monkeypatch.setattr(rng, "BUDGET_NS", 0)  # spent after the first chain
    rng.ctx.waiting = lambda: True  # the channel's frame

    driver.kick()

    assert [head for head, _ in ring.take_used()] == heads[:1]
    assert rng.ram.u16(ring.used) == 1  # VIRTQ_USED_F_NO_NOTIFY: no kick needed
    assert signalled(fds["notify0"]) == 1  # the event loop comes back for the rest
    notify = next(s for s in rng.event_sources() if s.fd == fds["notify0"])
    notify.on_readable()  # what the event loop does next, after the channel's frame
    assert signalled(fds["notify0"]) == 1
    notify.on_readable()
    assert [head for head, _ in ring.take_used()] == heads[1:]
    assert rng.stats()["budget_yields"] == 3
    assert signalled(fds["notify0"]) == 1
    notify.on_readable()  # a call that finds nothing asks for kicks and does not come back
    assert rng.ram.u16(ring.used) == 0 and signalled(fds["notify0"]) == 0
    assert rng.stats()["budget_yields"] == 3


def test_virtio_pci_process_goes_on_past_its_budget_while_nothing_else_waits(
    rng, driver, fds, monkeypatch
):
    """The event loop has nothing else ready (ctx.waiting): a spent budget is renewed, not
    handed back: every chain is served in one call, and the loop is asked once per budget."""
    ring = Ring(rng.ram)
    driver.start(ring)
    heads = [ring.add([(*ring.buffer(8), True)]) for _ in range(3)]
    monkeypatch.setattr(rng, "BUDGET_NS", 0)  # spent after each chain
    asked: list[int] = []  # the used idx each time the device asked

    def nothing_waits() -> bool:
        asked.append(ring.used_idx())
        return False

    rng.ctx.waiting = nothing_waits

    driver.kick()

    assert [head for head, _ in ring.take_used()] == heads
    assert asked == [1, 2, 3]
    assert signalled(fds["notify0"]) == 0  # nothing to come back for
    assert rng.ram.u16(ring.used) == 0  # drained: kicks asked for again
    assert (rng.stats()["budget_renewals"], rng.stats()["budget_yields"]) == (3, 0)


def test_virtio_pci_process_hands_the_loop_back_once_something_waits(rng, driver, fds, monkeypatch):
    """A frame (or any fd) becomes ready in the middle of a long drain: the next spent
    budget hands the event loop back, kicks off and its own notify signalled."""
    ring = Ring(rng.ram)
    driver.start(ring)
    heads = [ring.add([(*ring.buffer(8), True)]) for _ in range(3)]
    monkeypatch.setattr(rng, "BUDGET_NS", 0)
    answers = iter([False, True])
    rng.ctx.waiting = lambda: next(answers)

    driver.kick()

    assert [head for head, _ in ring.take_used()] == heads[:2]
    assert signalled(fds["notify0"]) == 1
    assert rng.ram.u16(ring.used) == 1  # VIRTQ_USED_F_NO_NOTIFY: no kick needed
    assert (rng.stats()["budget_renewals"], rng.stats()["budget_yields"]) == (1, 1)


def test_virtio_pci_process_hands_the_loop_back_from_a_driver_racing_avail_idx(
    rng, driver, fds, monkeypatch
):
    """Another vCPU of the driver moves avail idx one ahead and back again (2.7: it never
    goes back): each time the device asks for kicks it is told more came, and finds none.
    Rounds that serve nothing are held to the budget too: once anything else waits (its
    channel), the event loop gets the device back, kicks off and its own notify signalled.
    They were not: process() asked for kicks again and again, and never returned."""
    ring = Ring(rng.ram)
    driver.start(ring)
    device_ring = rng.rings[0]
    asking = device_ring.enable_notifications

    def racing() -> bool:
        rng.ram.write(ring.avail + 2, struct.pack("<H", ring.avail_idx + 1))
        more = asking()
        rng.ram.write(ring.avail + 2, struct.pack("<H", ring.avail_idx))
        return more

    monkeypatch.setattr(device_ring, "enable_notifications", racing)
    monkeypatch.setattr(rng, "clock_ns", bounded_clock())
    rng.ctx.waiting = lambda: True

    driver.kick()

    assert (signalled(fds["notify0"]), rng.stats()["budget_yields"]) == (1, 1)
    assert not driver.status() & NEEDS_RESET  # racing is no ring error: nothing broke


def test_virtio_pci_no_processing_before_driver_ok(rng, driver):
    ring = Ring(rng.ram)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.setup_queue(0, ring)
    ring.add([(*ring.buffer(8), True)])

    driver.kick()
    assert ring.take_used() == []
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert len(ring.take_used()) == 1


def test_virtio_pci_intx_resample_reasserts_while_isr_set(rng, driver, fds):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    signalled(fds["intx"])

    import os

    os.eventfd_write(fds["intx_resample"], 1)  # EOI with the ISR unread
    next(s for s in rng.event_sources() if s.fd == fds["intx_resample"]).on_readable()
    assert signalled(fds["intx"]) == 1
    driver.rd(ISR, 1)
    os.eventfd_write(fds["intx_resample"], 1)
    next(s for s in rng.event_sources() if s.fd == fds["intx_resample"]).on_readable()
    assert signalled(fds["intx"]) == 0


def test_virtio_pci_intx_disable_bit_keeps_the_line_down_not_the_status_bit(rng, driver, fds):
    """PCI 3.0 6.2.3: Interrupt Disable has no effect on Status bit 3, which virtio 1.2
    4.1.4.5.1 makes the OR of the ISR: a driver that masks INTx can still poll it."""
    ring = Ring(rng.ram)
    driver.start(ring)
    driver.wr(0x04, 0x0406, 2)  # memory, bus master, interrupt disable
    ring.add([(*ring.buffer(8), True)])

    driver.kick()

    assert signalled(fds["intx"]) == 0 and cfg(driver, 0x06, 2) & 0x08
    driver.rd(ISR, 1)
    assert cfg(driver, 0x06, 2) & 0x08 == 0


def test_virtio_pci_notify_through_the_window_processes_the_queue(rng, driver):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])

    driver.wr(NOTIFY, 0, 2)

    assert len(ring.take_used()) == 1


def test_virtio_pci_hostile_ring_sets_needs_reset_and_interrupts(rng, driver, fds, channel):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.publish(200)  # a head past the queue size

    driver.kick()

    assert driver.status() & NEEDS_RESET
    assert driver.rd(ISR, 1) & 2  # configuration change
    assert signalled(fds["intx"]) == 1
    assert "needs a reset" in str(channel.ops("report")[0]["message"])


def test_virtio_pci_needs_reset_stops_processing_until_reset(rng, driver):
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.publish(200)
    driver.kick()
    ring.add([(*ring.buffer(8), True)])

    driver.kick()

    assert ring.take_used() == []


def test_virtio_pci_queue_outside_ram_sets_needs_reset(rng, driver):
    ring = Ring(rng.ram, base=0x1FF000)  # the used ring past the 2 MiB of RAM
    driver.negotiate(F_VERSION_1)
    driver.setup_queue(0, ring)

    assert driver.status() & NEEDS_RESET


def test_virtio_pci_needs_reset_from_set_up_is_told_when_the_driver_starts(rng, driver, fds):
    """A ring refused at queue_enable sets NEEDS_RESET before DRIVER_OK, when 2.1.2 asks for
    no notification; a driver that reads status only when told then ran a dead device, with
    no interrupt ever. The configuration change notification comes with DRIVER_OK."""
    ring = Ring(rng.ram, base=0x1FF000)
    driver.negotiate(F_VERSION_1)
    driver.setup_queue(0, ring)
    assert (signalled(fds["intx"]), driver.status() & NEEDS_RESET) == (0, NEEDS_RESET)

    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)

    assert (signalled(fds["intx"]), driver.rd(ISR, 1)) == (1, 2)


@pytest.mark.parametrize("refused", [False, True])
def test_virtio_pci_driver_ok_without_features_ok_needs_reset(rng, driver, fds, refused):
    """3.1.1: features accepted (FEATURES_OK) before DRIVER_OK. A driver that skips that, or
    runs the device after its set was refused, negotiated nothing, and the models read
    driver_features as they serve: NEEDS_RESET, told at once, and nothing is served."""
    ring = Ring(rng.ram)
    if refused:
        assert not driver.negotiate(F_VERSION_1 | 1 << 50) & FEATURES_OK  # never offered
    else:
        driver.enable_bus_master()
        driver.set_status(ACK | DRIVER)
        driver.set_common(0x08, 0, 4)  # driver_feature_select 0...
        driver.set_common(0x0C, F_EVENT_IDX, 4)  # ...EVENT_IDX, then no FEATURES_OK
    driver.setup_queue(0, ring)
    ring.add([(*ring.buffer(8), True)])

    driver.set_status(ACK | DRIVER | DRIVER_OK)
    driver.kick()

    assert (driver.status() & NEEDS_RESET, ring.take_used()) == (NEEDS_RESET, [])
    assert (signalled(fds["intx"]), driver.rd(ISR, 1)) == (1, 2)


def test_virtio_pci_event_idx_suppresses_interrupt_until_used_event(rng, driver, fds):
    ring = Ring(rng.ram)
    driver.start(ring, features=F_VERSION_1 | F_EVENT_IDX)
    ring.set_used_event(1)  # interrupt when the second entry is used
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    first = signalled(fds["intx"])
    ring.add([(*ring.buffer(8), True)])
    driver.kick()

    assert (first, signalled(fds["intx"])) == (0, 1)


def test_virtio_pci_indirect_chain_served(rng, driver):
    ring = Ring(rng.ram)
    driver.start(ring, features=F_VERSION_1 | F_INDIRECT)
    head = ring.add([(*ring.buffer(8), True), (*ring.buffer(24), True)], indirect=True)

    driver.kick()

    assert ring.take_used() == [(head, 32)]


@settings(max_examples=60, deadline=None)
@given(
    event_idx=st.booleans(),
    batches=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=40),
)
def test_virtio_pci_a_driver_that_kicks_only_when_asked_never_stalls(event_idx, batches):
    """2.7.10: a driver may skip the kick the device's used ring says it does not need
    (VIRTQ_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). Whatever batches it makes
    available, and whenever it takes what was used, every chain gets served: a device that
    let a driver skip a kick it needed would leave chains waiting for ever."""
    fds = host_fds("virtio-rng")
    try:
        dev = VirtioRng(prepared("virtio-rng", fds))
        dev.clock_ns = SteppingClock(step=1_000)  # type: ignore[method-assign]
        driver, ring = Driver(dev), Ring(dev.ram)
        driver.start(ring, F_VERSION_1 | (F_EVENT_IDX if event_idx else 0))
        made = used = 0
        for count, take in batches:
            old = ring.avail_idx
            for _ in range(min(count, ring.size - (made - used))):  # a descriptor each
                ring.add([(*ring.buffer(8), True)])
                made += 1
            driver.kick_if_needed(ring, old, event_idx=event_idx)
            if take:
                used += len(ring.take_used())
        used += len(ring.take_used())

        assert used == made
    finally:
        close_fds(fds)


def near_the_wrap(dev: VirtioRng, ring: Ring, idx: int) -> VirtioRng:
    """`dev`, quiesced, restored from its snapshot as after `idx` chains made available,
    served and seen (mod 2^16), its used ring and the driver's rings saying so: a queue
    near 65536, which no driver gets to in a unit test's time."""
    dev.quiesce()
    ring.skip_to(idx)
    avail_event = ring.used + 4 + 8 * ring.size
    ring.ram.write(avail_event, struct.pack("<H", idx))  # type: ignore[attr-defined]
    restored = VirtioRng.restore(prepared("virtio-rng", dev.ctx.fds), queue_at(dev.save(), 0, idx))
    restored.clock_ns = SteppingClock(step=1_000)  # type: ignore[method-assign]
    return restored


@settings(max_examples=100, deadline=None)
@given(
    event_idx=st.booleans(),
    start=st.integers(0x10000 - 24, 0xFFFF),
    batches=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5)), min_size=1, max_size=12),
)
def test_virtio_pci_a_driver_that_sleeps_until_interrupted_is_woken_across_the_wrap(
    event_idx, start, batches
):
    """2.7.7.2, 2.7.10 modulo 2^16: from just before avail idx and used idx wrap, a driver
    that kicks only when avail_event or VIRTQ_USED_F_NO_NOTIFY asks, and asks for its
    interrupt only once `later` more of its batch are used (used_event ahead of the used
    idx, as Linux's virtqueue_enable_cb_delayed sets it), gets each batch served and is
    interrupted for it. A device that compared the indices as plain ints would skip an
    interrupt whose used_event is past 65535 while the used idx before the batch is not."""
    fds = host_fds("virtio-rng")
    try:
        dev = VirtioRng(prepared("virtio-rng", fds))
        ring = Ring(dev.ram)
        Driver(dev).start(ring, F_VERSION_1 | (F_EVENT_IDX if event_idx else 0))
        driver = Driver(near_the_wrap(dev, ring, start))
        for count, later in batches:
            ring.set_used_event((ring.seen_used + min(later, max(count - 1, 0))) & 0xFFFF)
            old = ring.avail_idx
            heads = [ring.add([(*ring.buffer(8), True)]) for _ in range(count)]
            driver.kick_if_needed(ring, old, event_idx=event_idx)

            assert signalled(fds["intx"]) == (1 if count else 0)
            driver.rd(ISR, 1)  # the line goes down
            assert [head for head, _ in ring.take_used()] == heads
    finally:
        close_fds(fds)


@pytest.mark.parametrize("event_idx", [False, True])
def test_virtio_pci_restart_across_the_wrap_serves_what_the_dead_process_had_not(fds, event_idx):
    """A crash restart takes the queue up at the used ring's idx in guest RAM (after the
    checkpoint, the dead process completed chains up to 0xFFFF), and serves the chains made
    available past it, across the wrap, once each."""
    dev = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(dev.ram)
    Driver(dev).start(ring, F_VERSION_1 | (F_EVENT_IDX if event_idx else 0))
    checkpoint = dev.save()
    dead = near_the_wrap(dev, ring, 0xFFFE)
    first = ring.add([(*ring.buffer(8), True)])
    Driver(dead).kick()  # used idx 0xFFFF
    heads = [ring.add([(*ring.buffer(8), True)]) for _ in range(2)]  # avail idx 1: the crash

    restarted = VirtioRng.restore(prepared("virtio-rng", fds, restarted=True), checkpoint)
    with replaying(restarted):
        pass  # no frame since the checkpoint
    Driver(restarted).kick()  # the notify after_restart() signalled

    assert ring.take_used() == [(first, 8), (heads[0], 8), (heads[1], 8)]
    assert restarted.rings[0] is not None and restarted.rings[0].last_avail == 1


# -- MSI-X ----------------------------------------------------------------------------------------
def msix_on(driver: Driver, vector: int = 0, data: int = 0x41) -> None:
    driver.wr(BAR1 + 16 * vector, MSI_ADDRESS, 4)
    driver.wr(BAR1 + 16 * vector + 4, 0, 4)
    driver.wr(BAR1 + 16 * vector + 8, data, 4)
    driver.wr(BAR1 + 16 * vector + 12, 0, 4)  # unmask
    at = msix_cap(driver)
    driver.wr(at + 2, cfg(driver, at + 2, 2) | 0x8000, 2)


def used_with_msix(rng: VirtioRng, driver: Driver) -> Ring:
    ring = Ring(rng.ram)
    driver.start(ring, vector=1)
    msix_on(driver, vector=1)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    return ring


def test_virtio_pci_msix_table_reads_back_and_vectors_start_masked(driver):
    driver.wr(BAR1 + 16, MSI_ADDRESS | 0x1000, 4)

    assert driver.rd(BAR1 + 16, 4) == MSI_ADDRESS | 0x1000
    assert driver.rd(BAR1 + 12, 4) == 1 and driver.rd(BAR1 + 28, 4) == 1


def may_fire(fds: dict[str, int]) -> list[int]:
    """The progress page's byte per vector: what the monitor signals once it leaves the
    device dead (monitor/devicefds.py raise_interrupts)."""
    return list(os.pread(fds["progress"], 2, PROGRESS_VECTORS_AT))


def test_virtio_pci_msix_progress_page_says_which_vectors_may_fire(rng, driver, fds, channel):
    """PCI 3.0 6.8.2.9: a vector's message may go only with MSI-X enabled, neither the
    function nor the vector masked, and the function a bus master (6.2.2); and the device
    sends it only once the monitor routed that message."""
    assert may_fire(fds) == [0, 0]  # at reset: MSI-X off, every vector masked
    driver.enable_bus_master()
    msix_on(driver, vector=1)
    assert may_fire(fds) == [0, 0]  # its route not confirmed yet
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    assert may_fire(fds) == [0, 1]
    at = msix_cap(driver)
    driver.wr(at + 2, cfg(driver, at + 2, 2) | 0x4000, 2)  # the function masked
    assert may_fire(fds) == [0, 0]
    driver.wr(at + 2, cfg(driver, at + 2, 2) & ~0x4000, 2)
    assert may_fire(fds) == [0, 1]
    driver.wr(BAR1 + 16 + 12, 1, 4)  # vector 1 masked
    assert may_fire(fds) == [0, 0]
    driver.wr(BAR1 + 16 + 12, 0, 4)
    driver.wr(COMMAND, driver.rd(COMMAND, 2) & ~COMMAND_MASTER, 2)
    assert may_fire(fds) == [0, 0]
    driver.enable_bus_master()
    assert os.pread(fds["progress"], 1, PROGRESS_MSIX_ENABLED_BYTE) == b"\x01"
    driver.wr(at + 2, cfg(driver, at + 2, 2) & ~0x8000, 2)  # MSI-X off: INTx
    assert may_fire(fds) == [0, 0]
    assert os.pread(fds["progress"], 1, PROGRESS_MSIX_ENABLED_BYTE) == b"\x00"


def test_virtio_pci_msix_progress_page_is_told_again_by_a_restored_process(rng, driver, fds):
    """The process after a crash starts from the saved table: what it stores holds for the
    guest as it is, not for a reset function."""
    driver.enable_bus_master()
    msix_on(driver, vector=0)
    saved = rng.save()
    os.pwrite(fds["progress"], bytes(2), PROGRESS_VECTORS_AT)  # as if never stored
    restored = VirtioRng.restore(prepared("virtio-rng", fds), saved)
    ch = Channel()
    restored.ctx.events.connect(ch.send)
    assert restored.msix.enabled and may_fire(fds) == [0, 0]  # its route asked for again
    restored.msix.update()
    restored.ctx.events.route_done(int(ch.ops("msi")[0]["id"]), True, "")
    assert may_fire(fds) == [1, 0]


def test_virtio_pci_msix_progress_page_says_0_for_a_refused_message(rng, driver, fds, channel):
    """A vector whose new message the monitor refused is never sent by the device (it stays
    pending), while the monitor's route for it still holds the old message: the page says
    0, or the monitor would send the old message for a device it leaves dead."""
    driver.enable_bus_master()
    msix_on(driver, vector=1)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    assert may_fire(fds) == [0, 1]
    driver.wr(BAR1 + 16 + 12, 1, 4)  # masked, a new message written, unmasked
    driver.wr(BAR1 + 16 + 8, 0x05, 4)  # vector 5: below 16, refused
    driver.wr(BAR1 + 16 + 12, 0, 4)
    rng.ctx.events.route_done(int(channel.ops("msi")[-1]["id"]), False, "vector below 16")
    assert may_fire(fds) == [0, 0]


def test_virtio_pci_msix_byte_access_is_bad(rng, driver):
    driver.wr(BAR1, 1, 1)

    assert rng.ctx.counters.bad_access == 1


def test_virtio_pci_msix_enable_asks_for_route_of_unmasked_vector(driver, channel):
    msix_on(driver, vector=1, data=0x31)

    (msi,) = channel.ops("msi")
    assert (msi["vector"], msi["address"], msi["data"]) == (1, MSI_ADDRESS, 0x31)


def test_virtio_pci_msix_not_signalled_before_route_confirmed(rng, driver, fds, channel):
    used_with_msix(rng, driver)

    assert signalled(fds["msix1"]) == 0
    assert driver.rd(BAR1 + 0x800, 8) == 0b10  # pending
    assert signalled(fds["intx"]) == 0


def test_virtio_pci_msix_route_done_delivers_pending_vector(rng, driver, fds, channel):
    used_with_msix(rng, driver)

    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")

    assert signalled(fds["msix1"]) == 1 and driver.rd(BAR1 + 0x800, 8) == 0


def test_virtio_pci_msix_refused_route_keeps_vector_pending(rng, driver, fds, channel):
    used_with_msix(rng, driver)

    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), False, "bad address")

    assert signalled(fds["msix1"]) == 0 and driver.rd(BAR1 + 0x800, 8) == 0b10


def test_virtio_pci_msix_refused_message_is_not_asked_for_again_until_rewritten(
    rng, driver, fds, channel
):
    """A refused message stays refused: asking again at every interrupt let a guest make
    the monitor answer a request per interrupt. A new message is asked for."""
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), False, "bad address")
    for _ in range(3):
        ring.add([(*ring.buffer(8), True)])
        driver.kick()
    asked = len(channel.ops("msi"))

    driver.wr(BAR1 + 16 + 8, 0x42, 4)  # the guest writes another message: asked for
    rng.ctx.events.route_done(int(channel.ops("msi")[1]["id"]), False, "host refused")
    ring.add([(*ring.buffer(8), True)])
    driver.kick()  # not again
    driver.wr(BAR1 + 16 + 8, 0x42, 4)  # the same message written again: asked for again

    assert (asked, len(channel.ops("msi"))) == (1, 3)


def test_virtio_pci_msix_off_raises_no_intx_for_what_went_as_messages(rng, driver, fds, channel):
    """4.1.4.5.2: the ISR's queue bit is set for INTx only. Set under MSI-X too, it stayed
    set (nothing reads the ISR then, 4.1.5.1), and a driver turning MSI-X off without a reset
    got INTx at once for interrupts its vectors had already delivered."""
    used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    assert signalled(fds["msix1"]) == 1 and signalled(fds["intx"]) == 0

    at = msix_cap(driver)
    driver.wr(at + 2, cfg(driver, at + 2, 2) & ~0x8000, 2)  # MSI-X off: nothing new happened

    assert signalled(fds["intx"]) == 0 and driver.rd(ISR, 1) == 0


def test_virtio_pci_msix_masked_vector_pends_until_unmasked(rng, driver, fds, channel):
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    signalled(fds["msix1"])
    driver.wr(BAR1 + 16 + 12, 1, 4)  # mask vector 1
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    pending = driver.rd(BAR1 + 0x800, 8)

    driver.wr(BAR1 + 16 + 12, 0, 4)

    assert (pending, signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8)) == (0b10, 1, 0)


def test_virtio_pci_bus_master_off_stops_every_dma_until_it_is_on_again(rng, driver, fds):
    """PCI 3.0 6.2.2: with Bus Master Enable clear the function generates no PCI accesses.
    A guest clears it to stop a device it hands over (Linux's pci_device_shutdown, before
    a kexec): the ring is neither read nor written; set again, what waits is served."""
    ring = Ring(rng.ram)
    driver.start(ring)
    driver.wr(0x04, 0x0002, 2)  # memory decode only
    head = ring.add([(*ring.buffer(8), True)])

    driver.kick()
    stopped = (ring.used_idx(), signalled(fds["intx"]))
    driver.wr(0x04, 0x0006, 2)
    serve_ready(rng)  # the event loop's next step: the device kicked its own queue

    assert (stopped, ring.take_used(), signalled(fds["intx"])) == ((0, 0), [(head, 8)], 1)


def test_virtio_pci_bus_master_off_holds_msix_messages_pending(rng, driver, fds, channel):
    """An MSI-X message is a memory write: with Bus Master Enable clear the vector pends (its
    PBA bit), and is sent once the function may master the bus again."""
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    signalled(fds["msix1"])
    ring.add([(*ring.buffer(8), True)])
    driver.kick()  # served, interrupt sent: then bus mastering goes
    signalled(fds["msix1"])
    driver.set_common(0x10, 1, 2)  # msix_config: configuration changes on vector 1 too
    driver.wr(0x04, 0x0002, 2)
    rng.config_changed()  # an interrupt with no DMA before it
    held = (signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8))

    driver.wr(0x04, 0x0006, 2)

    assert (held, signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8)) == ((0, 0b10), 1, 0)


STALE_USED = struct.pack("<HHII", 1, 7, 9, 16)  # flags, idx, an entry: a previous life's


def enabled_before_bus_master(rng: VirtioRng, driver: Driver, features: int = F_VERSION_1) -> Ring:
    """A driver that sets queue 0 up and DRIVER_OK before Bus Master Enable, on a used ring
    it did not zero (with EVENT_IDX's avail_event 9), then makes a chain available."""
    ring = Ring(rng.ram)
    rng.ram.write(ring.used, STALE_USED)
    rng.ram.write(ring.used + 4 + 8 * ring.size, b"\x09\x00")
    assert driver.negotiate(features) & FEATURES_OK
    driver.wr(COMMAND, driver.rd(COMMAND, 2) & ~COMMAND_MASTER, 2)
    driver.setup_queue(0, ring)
    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    return ring


@pytest.mark.parametrize("event_idx", [False, True])
def test_virtio_pci_queue_enabled_without_bus_master_writes_its_used_ring_once_it_is_set(
    rng, driver, event_idx
):
    """Every ring access is a DMA (PCI 3.0 6.2.2): a queue enabled with Bus Master Enable
    clear had its used ring's header (flags, idx, avail_event) written at once all the same.
    It is written when the bit is set, before the chain that waited is served."""
    ring = enabled_before_bus_master(rng, driver, F_VERSION_1 | (F_EVENT_IDX if event_idx else 0))
    untouched = rng.ram.read(ring.used, 12), rng.ram.read(ring.used + 4 + 8 * ring.size, 2)

    driver.enable_bus_master()
    serve_ready(rng)

    assert untouched == (STALE_USED, b"\x09\x00")
    assert ring.take_used() == [(0, 8)]


def test_virtio_pci_snapshot_of_a_queue_enabled_without_bus_master_restores_and_serves(
    rng, driver, fds
):
    """A snapshot while the used ring waits for Bus Master Enable: the stale idx in guest RAM
    is not the device's (which is 0), so the restore does not take it for a driver's write
    (NEEDS_RESET), and the restored device writes the ring and serves once the bit is set."""
    ring = enabled_before_bus_master(rng, driver)
    rng.quiesce()

    restored = VirtioRng.restore(prepared("virtio-rng", fds), rng.save())
    Driver(restored).enable_bus_master()
    serve_ready(restored)

    assert (restored.status & NEEDS_RESET, ring.take_used()) == (0, [(0, 8)])


def pending_behind_mask(rng: VirtioRng, driver: Driver, fds, channel) -> None:
    """Vector 1, queue 0's, confirmed, then masked with a queue interrupt pending on it."""
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    signalled(fds["msix1"])
    driver.wr(BAR1 + 16 + 12, 1, 4)  # mask vector 1 (Linux does before it resets)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert driver.rd(BAR1 + 0x800, 8) == 0b10


def test_virtio_pci_msix_pending_vector_is_dropped_by_a_reset(rng, driver, fds, channel):
    """2.4.1: no notification after a reset until the driver initialises the device again."""
    pending_behind_mask(rng, driver, fds, channel)

    driver.set_status(0)
    driver.wr(BAR1 + 16 + 12, 0, 4)  # unmasked: the old message must not go

    assert (signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8)) == (0, 0)


def test_virtio_pci_msix_pending_vector_no_event_maps_to_is_dropped(rng, driver, fds, channel):
    """4.1.5.2: with queue_msix_vector NO_VECTOR, no interrupt for that queue."""
    pending_behind_mask(rng, driver, fds, channel)

    driver.set_common(0x16, 0, 2)  # queue_select 0
    driver.set_common(0x1A, NO_VECTOR, 2)  # queue_msix_vector
    driver.wr(BAR1 + 16 + 12, 0, 4)

    assert (signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8)) == (0, 0)


def test_virtio_pci_msix_pending_vector_another_event_still_maps_to_is_kept(
    rng, driver, fds, channel
):
    pending_behind_mask(rng, driver, fds, channel)

    driver.set_common(0x10, 1, 2)  # config_msix_vector 1 too
    driver.set_common(0x16, 0, 2)
    driver.set_common(0x1A, NO_VECTOR, 2)
    driver.wr(BAR1 + 16 + 12, 0, 4)

    assert signalled(fds["msix1"]) == 1


def test_virtio_pci_msix_function_mask_holds_every_vector(rng, driver, fds, channel):
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    signalled(fds["msix1"])
    at = msix_cap(driver)
    driver.wr(at + 2, cfg(driver, at + 2, 2) | 0x4000, 2)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    held = signalled(fds["msix1"])

    driver.wr(at + 2, cfg(driver, at + 2, 2) & ~0x4000, 2)

    assert (held, signalled(fds["msix1"])) == (0, 1)


def test_virtio_pci_msix_new_message_needs_a_new_route(rng, driver, fds, channel):
    ring = used_with_msix(rng, driver)
    rng.ctx.events.route_done(int(channel.ops("msi")[0]["id"]), True, "")
    signalled(fds["msix1"])
    driver.wr(BAR1 + 16 + 8, 0x42, 4)  # a new data value
    ring.add([(*ring.buffer(8), True)])
    driver.kick()

    assert signalled(fds["msix1"]) == 0
    assert [m["data"] for m in channel.ops("msi")] == [0x41, 0x42]


def test_virtio_pci_msix_entry_rewritten_while_the_monitor_reads_nothing_still_fires(
    rng, driver, fds, channel
):
    """An unmasked entry rewritten many times while the channel takes nothing: the device's
    newest request, the only one it waits for, reaches the monitor, and its answer lets the
    vector fire (the newest was dropped past the event queue's cap, and the vector pended
    for good)."""
    used_with_msix(rng, driver)  # vector 1 pending, its first route asked for
    rng.ctx.events.connect(lambda frame: False)  # the socket's buffer is full
    for data in range(0x50, 0x80):
        driver.wr(BAR1 + 16 + 8, data, 4)
    reading = type(channel)()
    rng.ctx.events.connect(reading.send)  # the monitor reads again
    (msi,) = reading.ops("msi")
    rng.ctx.events.route_done(int(msi["id"]), True, "")

    assert (msi["data"], signalled(fds["msix1"])) == (0x7F, 1)


# -- state --------------------------------------------------------------------------------------------
def test_virtio_pci_restore_keeps_queue_position_and_msix_table(rng, driver, fds, channel):
    ring = used_with_msix(rng, driver)
    rng.quiesce()
    state = rng.save()

    restored = VirtioRng.restore(prepared("virtio-rng", fds), state)

    assert restored.save() == state
    assert restored.rings[0] is not None and restored.rings[0].used_idx == ring.used_idx()


def test_virtio_pci_restore_refuses_vector_past_table(rng):
    from splitvmm.record import replace

    bad = replace(rng.save(), msix_config=9)

    with pytest.raises(StateError, match="MSI-X vector"):
        VirtioRng.restore(rng.ctx, bad)


def test_virtio_pci_restore_refuses_queue_size_not_offered(rng):
    from splitvmm.record import replace

    state = rng.save()
    bad = replace(state, queues=(replace(state.queues[0], size=3),))

    with pytest.raises(StateError, match="size 3"):
        VirtioRng.restore(rng.ctx, bad)


def test_virtio_pci_restore_keeps_only_the_command_bits_a_driver_can_write(rng, fds):
    """PCI 3.0 6.2.2: reserved and unimplemented command bits read 0, after a restore too."""
    from splitvmm.record import replace

    restored = VirtioRng.restore(prepared("virtio-rng", fds), replace(rng.save(), command=0xFFFF))

    assert cfg(Driver(restored), 0x04, 2) == 0x0546


def test_virtio_pci_restore_drops_a_pending_vector_no_event_maps_to(rng, fds):
    """4.1.5.3, 4.1.5.4: no interrupt for an event mapped to NO_VECTOR. A running device
    drops such a pending bit when the last event maps away from it; a snapshot's, restored,
    must not go out when its vector is unmasked and routed."""
    from splitvmm.devprocs.virtio.state import MsixEntryState
    from splitvmm.record import replace

    masked, unmasked = MsixEntryState(0, 0, True), MsixEntryState(MSI_ADDRESS, 0x41, False)
    state = replace(rng.save(), command=0x0006, msix_enabled=True,
                    msix_table=(masked, unmasked), msix_pending=0b10)  # fmt: skip
    restored = VirtioRng.restore(prepared("virtio-rng", fds), state)
    channel = Channel()
    restored.ctx.events.connect(channel.send)

    (msi,) = channel.ops("msi")
    restored.ctx.events.route_done(int(msi["id"]), True, "")

    assert (signalled(fds["msix1"]), Driver(restored).rd(BAR1 + 0x800, 8)) == (0, 0)


def saved_with_used_chains(rng: VirtioRng, driver: Driver) -> tuple[VirtioPciState, Ring]:
    ring = used_with_msix(rng, driver)
    rng.quiesce()
    return rng.save(), ring


def with_queue(state: VirtioPciState, **change: object) -> VirtioPciState:
    from splitvmm.record import replace

    return replace(state, queues=(replace(state.queues[0], **change),))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a chain taken and never completed: a quiesced snapshot has none
        ({"last_avail": 9, "used_idx": 8}, "last_avail 9 is not used_idx 8, but a snapshot"),
        # rings outside guest RAM, in a queue that runs (no NEEDS_RESET)
        ({"desc": 1 << 50}, "descriptor table 0x4000000000000\\+0x100 is not in RAM"),
    ],
    ids=["in-flight", "desc-outside-ram"],
)
def test_virtio_pci_restore_refuses_a_queue_its_state_or_guest_ram_contradicts(
    rng, driver, fds, change, message
):
    """Before any vCPU runs: such a guest hung at its first kick, or read an I/O error."""
    state, _ = saved_with_used_chains(rng, driver)

    with pytest.raises(StateError, match=f"virtio-rng state: queue 0: .*{message}"):
        VirtioRng.restore(prepared("virtio-rng", fds), with_queue(state, **change))


def test_virtio_pci_restore_of_a_used_ring_the_guest_wrote_needs_a_reset(rng, driver, fds):
    """The used ring is the device's, but it lies in guest RAM: a driver that wrote its index
    before the snapshot makes the device need a reset after the restore (and is told so),
    never a snapshot that cannot be restored."""
    state, ring = saved_with_used_chains(rng, driver)
    rng.ram.write(ring.used + 2, struct.pack("<H", 7))  # the guest's write; the state says 1

    restored = VirtioRng.restore(prepared("virtio-rng", fds), state)

    assert restored.rings[0] is None
    assert not driver.status() & NEEDS_RESET  # the device that was saved never read it
    assert Driver(restored).status() & NEEDS_RESET


def test_virtio_pci_restore_needing_a_reset_opens_no_ring_and_is_taken(rng, driver, fds):
    """A driver may have enabled a queue whose rings are not in RAM: the device needed a
    reset then, and a snapshot of it restores as it was."""
    state, _ = saved_with_used_chains(rng, driver)
    from splitvmm.record import replace

    bad_rings = replace(with_queue(state, desc=1 << 50), status=state.status | NEEDS_RESET)

    restored = VirtioRng.restore(prepared("virtio-rng", fds), bad_rings)
    assert restored.rings[0] is None and restored.save() == bad_rings


def test_virtio_pci_quiesced_device_stops_watching_notify(rng, driver, fds):
    driver.start(Ring(rng.ram))
    rng.quiesce()

    assert [s.fd for s in rng.event_sources()] == [fds["intx_resample"]]


def test_virtio_pci_resume_leaves_what_came_while_quiesced_to_the_event_loop(rng, driver, fds):
    """resume() runs while the monitor waits for its reply (and its vCPUs with it): it only
    signals the queue's notify; the event loop's next step serves the chain."""
    ring = Ring(rng.ram)
    driver.start(ring)
    rng.quiesce()
    ring.add([(*ring.buffer(8), True)])

    rng.resume()

    assert ring.take_used() == []
    assert serve_ready(rng) == 1
    assert len(ring.take_used()) == 1


def test_virtio_pci_batch_publishes_nothing(rng, driver, channel):
    """A restart takes queue positions from the used ring, so a batch costs no state
    document (JSON of the whole device) on the data path."""
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])

    driver.kick()

    assert (ring.used_idx(), channel.ops("publish")) == (1, [])


def test_virtio_pci_restore_of_driver_ok_without_features_ok_needs_reset(rng, driver, fds):
    """A state the last release saved from a driver that skipped FEATURES_OK (its queues
    were served): restored, nothing was served and its status said nothing (DRIVER_OK only),
    where the running device says NEEDS_RESET (_set_status)."""
    from splitvmm.record import replace

    ring = Ring(rng.ram)
    driver.start(ring)
    rng.quiesce()
    old = replace(rng.save(), status=ACK | DRIVER | DRIVER_OK)

    restored = VirtioRng.restore(prepared("virtio-rng", fds), old)

    assert (restored.rings[0], Driver(restored).status() & NEEDS_RESET) == (None, NEEDS_RESET)


@pytest.mark.parametrize(
    ("command", "msix_enabled", "asserted"),
    [(0x0006, False, 1), (0x0406, False, 0), (0x0006, True, 0)],
    ids=["intx", "intx-disabled", "msix-on"],
)
def test_virtio_pci_restore_asserts_intx_while_its_isr_is_set(
    rng, fds, command, msix_enabled, asserted
):
    """INTA# is a level, up while the ISR is set and INTx is not disabled (virtio 1.2
    4.1.4.5.1; PCI 3.0 6.2.3). The saved IOAPIC may lack it: KVM injects the device's last
    irqfd write from a kernel worker, maybe after the coordinator read the irqchip. A level
    that is up already changes nothing; a lost one left the driver waiting for ever."""
    state = replace(rng.save(), command=command, isr=0x1, msix_enabled=msix_enabled)

    restored = VirtioRng.restore(prepared("virtio-rng", fds), state)

    assert signalled(fds["intx"]) == asserted
    assert Driver(restored).rd(ISR, 1) == 0x1  # the ISR itself is kept


def test_virtio_pci_restarted_device_leaves_intx_to_after_restart(rng, fds):
    """A crash restart's journal may hold an ISR read (raised before it, the line would come
    up for an ISR the replay clears): nothing is asserted at the restore."""
    state = replace(rng.save(), command=0x0006, isr=0x1)

    VirtioRng.restore(prepared("virtio-rng", fds, restarted=True), state)

    assert signalled(fds["intx"]) == 0


# -- mutation audit: guest-facing checks no test caught when broken -------------------------------
def served_one(rng: VirtioRng, driver: Driver) -> Ring:
    """Queue 0 running on a ring with one chain served (the ISR's queue bit set, INTx)."""
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert len(ring.take_used()) == 1
    return ring


@pytest.mark.parametrize("size", [2, 4])
def test_virtio_pci_isr_read_wider_than_its_byte_is_bad_and_leaves_it_set(rng, driver, size):
    """4.1.4.5: the ISR status is one byte, read (and cleared) by a byte access. A wider read
    is no read of it: as many zeros as were asked (never a reply of another width), counted,
    and the ISR is still there for the driver's byte read."""
    served_one(rng, driver)
    bad = rng.ctx.counters.bad_access

    raw = rng.read(ISR, size)

    assert (raw, rng.ctx.counters.bad_access - bad) == (bytes(size), 1)
    assert driver.rd(ISR, 1) == 1


def test_virtio_pci_notify_past_the_last_queue_is_a_bad_access_not_a_queue(rng, driver):
    """The notify structure covers num_queues * multiplier bytes (4.1.4.4): a write just past
    it names no queue (a queue index past the device's crashed it), and serves nothing."""
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(8), True)])
    bad = rng.ctx.counters.bad_access

    driver.wr(NOTIFY + 4 * rng.queue_count, 0, 2)

    assert (rng.ctx.counters.bad_access - bad, ring.take_used()) == (1, [])


def test_virtio_pci_driver_feature_select_past_128_bits_takes_nothing(rng, driver):
    """driver_feature_select 4 and on name no feature bits: a write there is ignored (and
    counted), reads 0, and leaves nothing in driver_features that would make the device
    refuse FEATURES_OK (an unbounded select was a shift of the guest's choosing)."""
    driver.set_common(0x08, 4, 4)
    bad = rng.ctx.counters.bad_access

    driver.set_common(0x0C, 0xFFFF_FFFF, 4)

    assert (rng.ctx.counters.bad_access - bad, driver.common(0x0C, 4)) == (1, 0)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK


def test_virtio_pci_queue_address_written_16_bits_at_a_time_is_bad(rng, driver):
    """4.1.3.1: a 64-bit field is accessed as a whole or as two 32-bit halves; a 16-bit
    access is neither: counted, and the field keeps its value."""
    driver.set_common(0x20, 0x1234, 2)

    assert (driver.common(0x20, 8), rng.ctx.counters.bad_access) == (0, 1)


def test_virtio_pci_enabled_queue_keeps_its_size_and_addresses(rng, driver):
    """4.1.4.3.2: the driver sets a queue up before queue_enable and does not change it while
    enabled: such writes are ignored (counted), else the device would save and restore a
    ring other than the one it runs. It goes on serving the ring it was enabled on."""
    ring = Ring(rng.ram)
    driver.start(ring)
    bad = rng.ctx.counters.bad_access

    driver.set_common(0x18, ring.size // 2, 2)
    driver.set_common(0x20, 0x8000, 4)
    driver.set_common(0x30, 0x9000, 4)

    assert (driver.common(0x18, 2), driver.common(0x20, 8), driver.common(0x30, 8)) == (
        ring.size,
        ring.desc,
        ring.used,
    )
    assert rng.ctx.counters.bad_access - bad == 3
    assert rng.save().queues[0].desc == ring.desc
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert len(ring.take_used()) == 1


@pytest.mark.parametrize("size", [0, 512, 1 << 15])
def test_virtio_pci_queue_size_zero_or_past_the_offered_is_refused(rng, driver, size):
    """A driver may make a queue smaller than the device offers (4.1.4.3), a power of 2,
    never 0 (no queue) nor larger than the offered 256."""
    driver.set_common(0x18, size, 2)

    assert (driver.common(0x18, 2), rng.ctx.counters.bad_access) == (256, 1)


@pytest.mark.parametrize("value", [2, 0x8001])
def test_virtio_pci_queue_enable_of_a_value_other_than_1_enables_nothing(rng, driver, value):
    """4.1.4.3: queue_enable 1 enables the queue; another value is no enable."""
    ring = Ring(rng.ram)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.set_common(0x16, 0, 2)
    for off, gpa in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
        driver.set_common(off, gpa, 8)

    driver.set_common(0x1C, value, 2)

    assert (driver.common(0x1C, 2), rng.rings) == (0, [None])


def test_virtio_pci_driver_cannot_set_needs_reset(rng, driver):
    """DEVICE_NEEDS_RESET is the device's (2.1.1): a status write that has it sets nothing
    of it, and the device goes on serving."""
    ring = Ring(rng.ram)
    driver.start(ring)

    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET)

    assert not driver.status() & NEEDS_RESET
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert len(ring.take_used()) == 1


def test_virtio_pci_failed_status_stops_the_queues(rng, driver):
    """2.1.1 FAILED: the driver gave the device up; it serves nothing more (the module
    docstring: only while DRIVER_OK is set and neither NEEDS_RESET nor FAILED)."""
    ring = Ring(rng.ram)
    driver.start(ring)

    driver.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK | 0x80)
    ring.add([(*ring.buffer(8), True)])
    driver.kick()

    assert ring.take_used() == []


def test_virtio_pci_needs_reset_serves_nothing_though_the_driver_mends_the_ring(rng, driver):
    """A hostile ring stops the device until the driver resets it: mending the ring (the bad
    avail entry rewritten to a good chain) and kicking again serves nothing."""
    ring = Ring(rng.ram)
    driver.start(ring)
    ring.publish(200)  # a head past the queue size
    driver.kick()
    assert driver.status() & NEEDS_RESET

    gpa, n = ring.buffer(8)
    ring._descs(ring.desc, [(gpa, n, True)], 0)
    ring._w(ring.avail + 4, struct.pack("<H", 0))  # avail ring[0]: head 0, a good chain
    driver.kick()

    assert ring.take_used() == []


def test_virtio_pci_restore_refuses_a_vector_just_past_the_table(rng):
    bad = replace(rng.save(), msix_config=rng.msix.vectors)

    with pytest.raises(StateError, match="MSI-X vector"):
        VirtioRng.restore(rng.ctx, bad)


def test_virtio_pci_restore_refuses_a_queue_larger_than_offered(rng):
    state = rng.save()
    bad = replace(state, queues=(replace(state.queues[0], size=2 * VirtioRng.QUEUE_SIZE),))

    with pytest.raises(StateError, match="not one offered"):
        VirtioRng.restore(rng.ctx, bad)


def test_virtio_pci_msix_pending_config_vector_mapped_to_no_vector_is_dropped(
    rng, driver, fds, channel
):
    """4.1.5.2: with config_msix_vector NO_VECTOR, the vector pending behind its mask that
    only the configuration event still mapped to is dropped, as for a queue's vector."""
    pending_behind_mask(rng, driver, fds, channel)
    driver.set_common(0x10, 1, 2)  # config_msix_vector 1 too
    driver.set_common(0x16, 0, 2)
    driver.set_common(0x1A, NO_VECTOR, 2)  # the queue maps away: the configuration keeps it

    driver.set_common(0x10, NO_VECTOR, 2)  # ...and now nothing maps to vector 1
    driver.wr(BAR1 + 16 + 12, 0, 4)

    assert (signalled(fds["msix1"]), driver.rd(BAR1 + 0x800, 8)) == (0, 0)


def test_virtio_pci_msix_misaligned_table_write_is_bad_and_unmasks_nothing(rng, driver):
    """PCI 3.0 6.8.2: table accesses are aligned dwords or qwords. A dword write that
    straddles vector 1's data and vector control is refused whole (counted): it must not
    land in the vector control and unmask the vector."""
    driver.wr(BAR1 + 16 + 10, 0, 4)

    assert (rng.ctx.counters.bad_access, driver.rd(BAR1 + 16 + 12, 4)) == (1, 1)


def test_virtio_pci_msix_disabled_sends_no_message_when_a_pending_vector_is_unmasked(
    rng, driver, fds, channel
):
    """PCI 3.0 6.8.2.3: with MSI-X Enable clear the function sends no MSI-X message: a vector
    pending behind its mask and unmasked then neither fires nor asks for a route."""
    pending_behind_mask(rng, driver, fds, channel)
    at = msix_cap(driver)
    driver.wr(at + 2, cfg(driver, at + 2, 2) & ~0x8000, 2)  # MSI-X off
    asked = len(channel.ops("msi"))

    driver.wr(BAR1 + 16 + 12, 0, 4)  # vector 1 unmasked

    assert (signalled(fds["msix1"]), len(channel.ops("msi"))) == (0, asked)


def test_virtio_pci_msix_entry_rewritten_over_and_over_keeps_one_route_request(
    rng, driver, channel
):
    """A guest rewriting an unmasked entry while the monitor answers nothing cannot grow the
    device's outstanding requests: one per vector, the latest message's."""
    driver.enable_bus_master()
    msix_on(driver, vector=1)

    for data in range(64):
        driver.wr(BAR1 + 16 + 8, 0x100 + data, 4)

    assert len(channel.ops("msi")) == 65
    assert list(rng.msix._asked.values()) == [(1, MSI_ADDRESS, 0x100 + 63)]


@pytest.mark.parametrize("length", [0, 3])
def test_virtio_pci_cfg_access_cap_of_a_length_not_1_2_or_4_reaches_nothing(rng, driver, length):
    """4.1.4.9: cap.length is 1, 2 or 4 (a driver's MUST). Any other selects nothing: the
    data reads 0 and a write there changes nothing (length 0 divided by zero)."""
    at = pci_cfg_cap(driver)
    driver.wr(at + 4, 0, 1)
    driver.wr(at + 8, 0x14, 4)  # device_status
    driver.wr(at + 12, length, 4)

    assert cfg(driver, at + 16, 4) == 0
    driver.wr(at + 16, ACK, 4)
    assert driver.status() == 0


def test_virtio_pci_cfg_access_cap_just_past_bar0_does_not_reach_bar1(rng, driver):
    """The window selects cap.length bytes inside the BAR it names (4.1.4.9): offset = BAR
    0's size is past it, not BAR 1's first dword (vector 0's message address)."""
    driver.wr(BAR1, MSI_ADDRESS, 4)
    at = pci_cfg_cap(driver)
    driver.wr(at + 4, 0, 1)
    driver.wr(at + 8, rng.function.region_of_bar(0).size, 4)
    driver.wr(at + 12, 4, 4)

    assert cfg(driver, at + 16, 4) == 0
    driver.wr(at + 16, 0x1234, 4)
    assert driver.rd(BAR1, 4) == MSI_ADDRESS


def test_virtio_pci_cfg_access_cap_bar_byte_is_kept_whole_and_a_bad_one_selects_nothing(
    rng, driver
):
    """cap.bar 0x81 is no BAR (not BAR 1 by its low bits): it reads back as written, the
    data reads 0, and a write of the data, which reaches nothing, is counted."""
    driver.wr(BAR1, MSI_ADDRESS, 4)
    at = pci_cfg_cap(driver)
    driver.wr(at + 4, 0x81, 1)
    driver.wr(at + 8, 0, 4)
    driver.wr(at + 12, 4, 4)
    bad = rng.ctx.counters.bad_access

    assert (cfg(driver, at + 4, 1), cfg(driver, at + 16, 4)) == (0x81, 0)
    driver.wr(at + 16, 0x1234, 4)
    assert (rng.ctx.counters.bad_access - bad, driver.rd(BAR1, 4)) == (1, MSI_ADDRESS)


@pytest.mark.parametrize("offset", [0x100, 0xFFC])
def test_virtio_pci_extended_config_space_reads_as_many_zeros_as_asked(rng, offset):
    """ECAM reaches 4 KiB of configuration space; past the 256 bytes of a conventional
    function every read is zeros of its width (PCIe 7.9.1: no extended capability), never a
    reply of another length."""
    assert rng.read(offset, 4) == bytes(4)


def test_virtio_pci_clearing_interrupt_disable_asserts_a_pending_intx(rng, driver, fds):
    """PCI 3.0 6.2.2 bit 10: Interrupt Disable holds INTA# down; cleared while the ISR is
    set (an interrupt pending, 4.1.4.5.1), the line comes up."""
    ring = Ring(rng.ram)
    driver.start(ring)
    driver.wr(0x04, 0x0406, 2)  # memory, bus master, interrupt disable
    ring.add([(*ring.buffer(8), True)])
    driver.kick()
    assert signalled(fds["intx"]) == 0

    driver.wr(0x04, 0x0006, 2)

    assert signalled(fds["intx"]) == 1


def test_virtio_pci_interrupt_pin_is_read_only(driver):
    """PCI 3.0 6.2.4: Interrupt Pin (0x3D) is read-only; only Interrupt Line is written."""
    driver.wr(0x3C, 5, 1)
    driver.wr(0x3D, 7, 1)

    assert (cfg(driver, 0x3C, 1), cfg(driver, 0x3D, 1)) == (5, 1)


def test_virtio_pci_restored_with_bus_master_off_holds_a_pending_vector(rng, driver, fds):
    """PCI 3.0 6.2.2: a snapshot of a function without Bus Master Enable restores one that
    sends no MSI-X message: its pending vector waits, routed or not, for the bit."""
    used_with_msix(rng, driver)  # vector 1 pending: its route not confirmed yet
    driver.wr(0x04, 0x0002, 2)  # Bus Master Enable off
    saved = rng.save()
    assert saved.msix_pending == 0b10

    restored = VirtioRng.restore(prepared("virtio-rng", fds), saved)
    ch = Channel()
    restored.ctx.events.connect(ch.send)
    restored.msix.update()
    restored.ctx.events.route_done(int(ch.ops("msi")[-1]["id"]), True, "")
    held = signalled(fds["msix1"])
    Driver(restored).wr(0x04, 0x0006, 2)

    assert (held, signalled(fds["msix1"])) == (0, 1)


def test_virtio_pci_msix_answer_to_no_request_of_its_own_routes_nothing(rng, driver, channel):
    """A route answer whose id the device is not waiting for (superseded by a newer request
    of the vector, or never asked) confirms no message: vector 0, unmasked later at its
    reset message, still asks for its route."""
    driver.enable_bus_master()
    msix_on(driver, vector=1)
    rng.ctx.events.route_done(999, True, "")

    driver.wr(BAR1 + 12, 0, 4)  # vector 0 unmasked, its message as at reset: (0, 0)

    asked = [(m["vector"], m["address"], m["data"]) for m in channel.ops("msi")]
    assert asked[-1] == (0, 0, 0)
