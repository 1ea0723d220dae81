"""SplitQueue (devprocs/virtio/queue.py): the split virtqueue, device side (virtio 1.2 2.7)."""

from __future__ import annotations

import pytest

from splitvmm.devprocs.virtio.guestram import GuestRam
from splitvmm.devprocs.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Chain,
    QueueError,
    SplitQueue,
    vring_need_event,
)
from splitvmm.errors import StateError
from tests.virtio_driver import (
    AVAIL_GPA,
    DATA_GPA,
    DESC_GPA,
    RAM_SIZE,
    USED_GPA,
    DriverQueue,
    chain,
    descriptor,
    fake_ram,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
TABLE_GPA = DATA_GPA + 0x1_0000  # an indirect table, away from the buffers


@pytest.fixture
def driver() -> DriverQueue:
    return DriverQueue(fake_ram(), size=8)


@pytest.fixture
def evdriver() -> DriverQueue:
    return DriverQueue(fake_ram(), size=8, event_idx=True)


# -- taking chains -------------------------------------------------------------------------------
def test_queue_pop_with_nothing_available_returns_none(driver):
    assert driver.device().pop() is None


def test_queue_pop_returns_readable_then_writable_buffers_in_order(driver):
    head = driver.add([(DATA_GPA, 16, False), (DATA_GPA + 16, 32, False), (DATA_GPA + 64, 1, True)])
    driver.publish(head)
    queue = driver.device()

    chain_ = queue.pop()

    assert chain_ == Chain(0, [(DATA_GPA, 16), (DATA_GPA + 16, 32)], [(DATA_GPA + 64, 1)])
    assert queue.last_avail == 1
    assert queue.pop() is None


def test_queue_pop_follows_next_in_any_order(driver):
    driver.set_desc(5, DATA_GPA, 4, NEXT, 2)
    driver.set_desc(2, DATA_GPA + 8, 4, NEXT | WRITE, 7)
    driver.set_desc(7, DATA_GPA + 16, 4, WRITE)
    driver.publish(5)

    chain_ = driver.device().pop()

    assert chain_ == Chain(5, [(DATA_GPA, 4)], [(DATA_GPA + 8, 4), (DATA_GPA + 16, 4)])


def test_queue_pop_takes_chains_in_avail_ring_order(driver):
    first = driver.add([(DATA_GPA, 1, False)])
    second = driver.add([(DATA_GPA + 1, 1, True)])
    driver.publish(second, first)
    queue = driver.device()

    heads = [queue.pop().head, queue.pop().head]

    assert heads == [second, first]


def test_queue_pop_zero_length_buffer_is_kept(driver):
    driver.publish(driver.add([(DATA_GPA, 0, True)]))

    assert driver.device().pop() == Chain(0, [], [(DATA_GPA, 0)])


def test_queue_pop_full_queue_of_available_chains(driver):
    heads = [driver.add([(DATA_GPA + i, 1, True)]) for i in range(8)]
    driver.publish(*heads)
    queue = driver.device()

    chains = [queue.pop() for _ in range(8)]

    assert [c.head for c in chains if c] == heads
    assert queue.pop() is None


def test_queue_pop_chain_of_queue_size_descriptors_is_allowed(driver):
    driver.publish(driver.add([(DATA_GPA + i, 1, False) for i in range(8)]))

    chain_ = driver.device().pop()

    assert chain_ is not None and len(chain_.readable) == 8


def test_queue_pop_indirect_table_after_direct_descriptors(driver):
    driver.ram.write(
        TABLE_GPA, b"".join(chain([(DATA_GPA + 8, 8, False), (DATA_GPA + 16, 2, True)]))
    )
    driver.set_desc(0, DATA_GPA, 8, NEXT, 1)
    driver.set_desc(1, TABLE_GPA, 32, INDIRECT | WRITE)  # WRITE on the pointer is ignored
    driver.publish(0)

    chain_ = driver.device(indirect=True).pop()

    assert chain_ == Chain(0, [(DATA_GPA, 8), (DATA_GPA + 8, 8)], [(DATA_GPA + 16, 2)])


def test_queue_pop_indirect_follows_next_inside_the_table(driver):
    driver.set_desc(3, TABLE_GPA, 48, INDIRECT)
    driver.ram.write(TABLE_GPA, chain([(DATA_GPA, 4, False), (DATA_GPA + 4, 4, True)], 0, 3)[0])
    driver.ram.write(TABLE_GPA + 16, chain([(RAM_SIZE, 4, False)])[0])  # skipped
    driver.ram.write(TABLE_GPA + 32, chain([(DATA_GPA + 4, 4, True)])[0])
    driver.ram.write_u16(TABLE_GPA + 14, 2)  # entry 0's next: entry 2
    driver.publish(3)

    chain_ = driver.device(indirect=True).pop()

    assert chain_ == Chain(3, [(DATA_GPA, 4)], [(DATA_GPA + 4, 4)])


def test_queue_pop_indirect_ends_at_the_first_entry_without_next(driver):
    buffers = [(DATA_GPA, 1, False)]
    driver.ram.write(TABLE_GPA, b"".join(chain(buffers) + chain([(0xFFFF_FFFF_0000, 1, False)])))
    driver.set_desc(0, TABLE_GPA, 32, INDIRECT)
    driver.publish(0)

    assert driver.device(indirect=True).pop() == Chain(0, [(DATA_GPA, 1)], [])


def test_queue_pop_across_avail_idx_wrap(driver):
    queue = driver.device()
    queue.last_avail = queue.used_idx = 0xFFFF
    driver.avail_idx = 0xFFFF
    first = driver.add([(DATA_GPA, 1, False)])
    second = driver.add([(DATA_GPA + 1, 1, False)])
    driver.publish(first, second)  # ring slots 7 and 0, avail idx 0xFFFF -> 1

    heads = [queue.pop().head, queue.pop().head]

    assert heads == [first, second]
    assert queue.last_avail == 1
    assert driver.ram.u16(AVAIL_GPA + 4 + 2 * 7) == first


def near_the_wrap(driver: DriverQueue, idx: int) -> SplitQueue:
    """The device's queue and the driver's rings as after `idx` chains made available,
    taken and returned (mod 2^16): every index starts near 65536, where a device that
    compared them as plain ints misbehaves."""
    queue = driver.device()
    queue.last_avail = queue.used_idx = idx
    driver.avail_idx = idx
    driver.ram.write_u16(AVAIL_GPA + 2, idx)
    driver.ram.write_u16(USED_GPA + 2, idx)
    return queue


def test_queue_unpop_across_avail_idx_wrap_gives_the_chains_back(driver):
    queue = near_the_wrap(driver, 0xFFFF)
    heads = [driver.add([(DATA_GPA + i, 1, True)]) for i in range(2)]
    driver.publish(*heads)  # avail idx 0xFFFF -> 1
    queue.pop(), queue.pop()

    queue.unpop(2)

    assert queue.last_avail == 0xFFFF
    assert [queue.pop().head, queue.pop().head] == heads


def test_queue_more_chains_in_flight_than_the_queue_holds_across_the_wrap_raises(driver):
    """The in-flight count is last_avail - used_idx mod 2^16: compared as plain ints, it
    is negative once last_avail has wrapped and used_idx has not, and a head the device
    still holds would be taken again."""
    queue = near_the_wrap(driver, 0xFFFC)
    heads = [driver.add([(DATA_GPA + i, 1, False)]) for i in range(8)]
    driver.publish(*heads)
    assert all(queue.pop() for _ in range(8))  # last_avail 4, used_idx 0xFFFC
    driver.publish(heads[0])  # again, none of the 8 returned

    with pytest.raises(QueueError, match="8 chains in flight, the queue's size"):
        queue.pop()


def test_queue_of_the_largest_size_takes_a_full_ring_across_the_wrap_then_refuses_more():
    """2.7: 32768, the largest split queue: a ring of it full of chains made available
    across the wrap, then one more, past the descriptors the driver has."""
    ram, size = fake_ram(4 << 20), 32768
    desc, avail, used, data = 0x0, 0x8_0000, 0x10_0000, 0x20_0000  # 512 KiB, 64 KiB, 256 KiB
    ram.write(desc, b"".join(descriptor(data + i, 1, WRITE) for i in range(size)))
    ram.write(avail + 4, b"".join(i.to_bytes(2, "little") for i in range(size)))  # slot i: i
    ram.write_u16(avail + 2, 0x4000)  # from last_avail 0xC000 (slot 16384), 32768 on
    queue = SplitQueue(ram, size, desc, avail, used, True, False)
    queue.last_avail = queue.used_idx = 0xC000

    heads = [queue.pop().head for _ in range(size)]

    assert heads[:2] == [16384, 16385] and heads[-1] == 16383  # ring slot 16384 on, round
    assert (queue.last_avail, queue.pop()) == (0x4000, None)
    ram.write_u16(avail + 2, 0x4001)
    with pytest.raises(QueueError, match="32768 chains in flight"):
        queue.pop()


# -- returning chains ----------------------------------------------------------------------------
def test_queue_push_writes_used_entry_then_used_idx(driver):
    driver.publish(driver.add([(DATA_GPA, 4, True)]))
    queue = driver.device()
    chain_ = queue.pop()

    queue.push(chain_.head, 3)

    assert driver.used_elem(0) == (0, 3)
    assert driver.used_idx() == 1 == queue.used_idx


def test_queue_push_across_used_idx_wrap(driver):
    queue = driver.device()
    queue.last_avail, queue.used_idx = 1, 0xFFFF

    queue.push(6, 0xFFFF_FFFF)

    assert driver.used_elem(7) == (6, 0xFFFF_FFFF)
    assert driver.used_idx() == 0 == queue.used_idx


def test_queue_push_together_across_used_idx_wrap(driver):
    queue = near_the_wrap(driver, 0xFFFF)
    heads = [driver.add([(DATA_GPA + 64 * i, 64, True)]) for i in range(2)]
    driver.publish(*heads)
    queue.pop(), queue.pop()

    queue.push_together([(heads[0], 64), (heads[1], 10)])

    assert [driver.used_elem(7), driver.used_elem(0)] == [(heads[0], 64), (heads[1], 10)]
    assert driver.used_idx() == 1 == queue.used_idx


def test_queue_push_marks_used_ring_dirty():
    dirty = bytearray(4096)
    driver = DriverQueue(GuestRam.from_buffers(bytearray(RAM_SIZE), dirty, [[0, RAM_SIZE, 0]]), 8)
    driver.publish(driver.add([(DATA_GPA, 4, True)]))
    queue = driver.device()
    queue.pop()

    queue.push(0, 4)

    page = USED_GPA // 4096
    assert dirty[page // 8] >> (page % 8) & 1


def test_queue_push_with_nothing_in_flight_raises(driver):
    with pytest.raises(ValueError, match="no chain in flight"):
        driver.device().push(0, 0)


@pytest.mark.parametrize(("head", "written"), [(8, 0), (-1, 0), (0, -1), (0, 1 << 32)])
def test_queue_push_out_of_range_raises(driver, head, written):
    queue = driver.device()
    queue.last_avail = 1

    with pytest.raises(ValueError, match="out of range"):
        queue.push(head, written)


# -- notifications -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # the driver waits for entry 0, pushed now
        (1, 1, 0, False),  # it waits for entry 1, not pushed yet
        (4, 8, 2, True),  # inside [old, new)
        (2, 8, 2, True),  # at old
        (8, 8, 2, False),  # at new: not pushed yet
        (1, 8, 2, False),  # before old: already notified for it
        (0xFFFF, 1, 0xFFFE, True),  # [0xFFFE, 1) wraps and holds 0xFFFF
        (0, 1, 0xFFFE, True),
        (1, 1, 0xFFFE, False),
        (5, 5, 5, False),  # nothing pushed
    ],
)
def test_queue_vring_need_event_window_modulo_2_16(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def serve(driver: DriverQueue, queue: SplitQueue, count: int) -> None:
    """The driver makes `count` one-buffer chains available; the device takes and returns them."""
    for i in range(count):
        driver.publish(driver.add([(DATA_GPA + i, 1, True)]))
        queue.push(queue.pop().head, 1)


def test_queue_needs_notification_first_time_is_true(evdriver):
    queue = evdriver.device()
    evdriver.set_used_event(100)
    serve(evdriver, queue, 1)

    assert queue.needs_notification() is True


@pytest.mark.parametrize(
    ("event_idx", "avail_flags", "used_event", "more", "expected"),
    [
        (True, 0, 2, 2, True),  # used idx 1 -> 3 passes entry 2
        (True, 0, 1, 2, True),  # and entry 1
        (True, 0, 3, 2, False),  # not entry 3
        (True, VIRTQ_AVAIL_F_NO_INTERRUPT, 2, 2, True),  # the flag means nothing then
        (True, 0, 1, 0, False),  # nothing pushed since
        (False, 0, 100, 1, True),  # used_event means nothing without EVENT_IDX
        (False, VIRTQ_AVAIL_F_NO_INTERRUPT, 0, 1, False),
        (False, 0, 0, 0, False),  # nothing pushed since
    ],
)
def test_queue_needs_notification_after_more_pushes(
    event_idx, avail_flags, used_event, more, expected
):
    driver = DriverQueue(fake_ram(), 8, event_idx)
    queue = driver.device()
    serve(driver, queue, 1)
    queue.needs_notification()
    driver.set_avail_flags(avail_flags)
    driver.set_used_event(used_event)

    serve(driver, queue, more)

    assert queue.needs_notification() is expected


@pytest.mark.parametrize(
    ("used_event", "expected"),
    [
        (0xFFFE, True),  # the first pushed of used idx 0xFFFE -> 1
        (0xFFFF, True),
        (0, True),  # past the wrap, old before it
        (1, False),  # not pushed yet
        (0xFFFD, False),  # before old: notified for it already
    ],
)
def test_queue_needs_notification_across_used_idx_wrap(evdriver, used_event, expected):
    """2.7.7.2: used_event is compared with the used idx modulo 2^16 (vring_need_event)."""
    queue = near_the_wrap(evdriver, 0xFFFD)
    serve(evdriver, queue, 1)
    queue.needs_notification()  # the first: told whatever used_event says
    evdriver.set_used_event(used_event)

    serve(evdriver, queue, 3)  # used idx 0xFFFE -> 1

    assert queue.needs_notification() is expected


def test_queue_pop_with_event_idx_sets_avail_event_to_last_avail(evdriver):
    evdriver.publish(evdriver.add([(DATA_GPA, 1, False)]))
    queue = evdriver.device()

    queue.pop()

    assert evdriver.avail_event() == 1


def test_queue_disable_notifications_sets_no_notify_without_event_idx(driver):
    queue = driver.device()

    queue.disable_notifications()

    assert driver.used_flags() == VIRTQ_USED_F_NO_NOTIFY


def test_queue_disabled_notifications_leave_avail_event_alone(evdriver):
    evdriver.publish(evdriver.add([(DATA_GPA, 1, False)]))
    queue = evdriver.device()
    queue.disable_notifications()

    queue.pop()

    assert evdriver.avail_event() == 0


def test_queue_enable_notifications_clears_no_notify_and_reports_nothing_pending(driver):
    queue = driver.device()
    queue.disable_notifications()

    pending = queue.enable_notifications()

    assert (pending, driver.used_flags()) == (False, 0)


def test_queue_enable_notifications_with_event_idx_reports_chains_that_arrived(evdriver):
    queue = evdriver.device()
    queue.disable_notifications()
    evdriver.publish(evdriver.add([(DATA_GPA, 1, False)]))

    pending = queue.enable_notifications()

    assert (pending, evdriver.avail_event()) == (True, 0)


def test_queue_enable_notifications_beyond_chains_left_available_asks_past_them(evdriver):
    """A device that needs more than the chains available (and left them there) asks the
    kick for the next one after them: avail_event at last_avail would let the driver post
    more without one (2.7.10: it kicks when its new idx passes avail_event)."""
    queue = evdriver.device()
    for i in range(2):
        evdriver.publish(evdriver.add([(DATA_GPA + i, 1, True)]))

    assert queue.enable_notifications(beyond=2) is False
    assert evdriver.avail_event() == 2
    evdriver.publish(evdriver.add([(DATA_GPA + 2, 1, True)]))
    assert queue.enable_notifications(beyond=2) is True


def test_queue_avail_event_and_chains_that_arrived_across_avail_idx_wrap(evdriver):
    """2.7.10 modulo 2^16: avail_event past 0xFFFF is 0, and the chains made available
    past last_avail are counted across the wrap (a device told "none came" slept on them)."""
    queue = near_the_wrap(evdriver, 0xFFFE)
    evdriver.publish(*[evdriver.add([(DATA_GPA + i, 1, True)]) for i in range(3)])  # idx 1
    queue.pop()
    at_pop = evdriver.avail_event()

    more = queue.enable_notifications(beyond=1)  # one left there: the kick for the next

    assert (at_pop, more, evdriver.avail_event()) == (0xFFFF, True, 0)


def test_queue_ring_descriptors_counts_a_chain_and_one_for_an_indirect_table(driver):
    driver.set_desc(0, DATA_GPA, 8, NEXT, 5)
    driver.set_desc(5, DATA_GPA + 8, 8, NEXT | WRITE, 2)
    driver.set_desc(2, DATA_GPA + 16, 8, WRITE, 0)
    driver.set_desc(3, DATA_GPA, 8, NEXT, 4)
    driver.set_desc(4, TABLE_GPA, 32, INDIRECT, 0)
    driver.set_desc(6, DATA_GPA, 8, NEXT, 7)
    driver.set_desc(7, DATA_GPA, 8, NEXT, 6)  # a loop: bounded by the queue's size
    queue = driver.device(indirect=True)

    assert [queue.ring_descriptors(h) for h in (0, 3, 6)] == [3, 2, 8]


# -- restarts and snapshots ----------------------------------------------------------------------
def test_queue_resume_from_used_reruns_chains_not_returned(driver):
    heads = [driver.add([(DATA_GPA + i, 1, True)]) for i in range(3)]
    driver.publish(*heads)
    before = driver.device()
    before.pop(), before.pop()
    before.push(heads[0], 1)  # the device returned one chain, then crashed
    after = driver.device()

    after.resume_from_used()

    assert (after.last_avail, after.used_idx) == (1, 1)
    assert after.pop().head == heads[1]


def test_queue_resume_from_used_across_the_wrap_reruns_chains_not_returned(driver):
    before = near_the_wrap(driver, 0xFFFE)
    heads = [driver.add([(DATA_GPA + i, 1, True)]) for i in range(4)]
    driver.publish(*heads)  # avail idx 0xFFFE -> 2
    for _ in range(3):
        before.push(before.pop().head, 1)  # used idx 0xFFFE -> 1, then the crash
    after = driver.device()

    after.resume_from_used()

    assert (after.last_avail, after.used_idx) == (1, 1)
    assert after.pop().head == heads[3]
    assert after.pop() is None


def test_queue_state_round_trips(evdriver):
    queue = evdriver.device()
    serve(evdriver, queue, 3)
    evdriver.publish(evdriver.add([(DATA_GPA, 1, True)]))
    queue.pop()

    restored = SplitQueue.from_state(evdriver.ram, queue.state())

    assert (
        restored.state()
        == queue.state()
        == {
            "size": 8,
            "desc": DESC_GPA,
            "avail": AVAIL_GPA,
            "used": USED_GPA,
            "event_idx": True,
            "indirect": False,
            "last_avail": 4,
            "used_idx": 3,
        }
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "queue state keys"),
        ({"size": True}, "size True is not an int"),
        ({"size": 65536}, "size 65536 is not an int"),
        ({"size": 6}, "queue size 6 is not a power of 2"),
        ({"desc": -16}, "desc -16 is not an int"),
        ({"avail": 1 << 64}, "avail .* is not an int"),
        ({"used": AVAIL_GPA + 2}, "used ring address .* is not 4-byte aligned"),
        ({"desc": RAM_SIZE}, "descriptor table .* is not in RAM"),
        ({"event_idx": 1}, "event_idx 1 is not a bool"),
        ({"indirect": "yes"}, "indirect 'yes' is not a bool"),
        ({"last_avail": 0x10000}, "last_avail 65536 is not an int"),
        ({"used_idx": "0"}, "used_idx '0' is not an int"),
        ({"last_avail": 9}, "last_avail 9 is more than size 8 past used_idx 0"),
        ({"last_avail": 0, "used_idx": 1}, "last_avail 0 is more than size 8 past used_idx 1"),
    ],
)
def test_queue_from_state_bad_field_raises(driver, change, match):
    state: dict[str, object] = {**driver.device().state(), **change}

    with pytest.raises(StateError, match=match):
        SplitQueue.from_state(driver.ram, state)


def test_queue_from_state_missing_key_raises(driver):
    state = driver.device().state()
    del state["used_idx"]

    with pytest.raises(StateError, match="queue state keys"):
        SplitQueue.from_state(driver.ram, state)


# -- a queue the driver set up wrong -------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "desc", "avail", "used", "match"),
    [
        (0, DESC_GPA, AVAIL_GPA, USED_GPA, "queue size 0 is not a power of 2"),
        (12, DESC_GPA, AVAIL_GPA, USED_GPA, "queue size 12 is not a power of 2"),
        (65536, DESC_GPA, AVAIL_GPA, USED_GPA, "queue size 65536 is not a power of 2"),
        (8, DESC_GPA + 8, AVAIL_GPA, USED_GPA, "descriptor table address 0x8 is not 16-byte"),
        (8, DESC_GPA, AVAIL_GPA + 1, USED_GPA, "avail ring address 0x80001 is not 2-byte"),
        (8, DESC_GPA, AVAIL_GPA, USED_GPA + 2, "used ring address 0x90002 is not 4-byte"),
        (8, RAM_SIZE - 64, AVAIL_GPA, USED_GPA, "descriptor table 0xfffc0\\+0x80 is not in RAM"),
        (8, DESC_GPA, RAM_SIZE - 20, USED_GPA, "avail ring 0xfffec\\+0x16 is not in RAM"),
        (8, DESC_GPA, AVAIL_GPA, RAM_SIZE - 68, "used ring 0xfffbc\\+0x46 is not in RAM"),
    ],
)
def test_queue_bad_setup_raises(size, desc, avail, used, match):
    with pytest.raises(QueueError, match=match):
        SplitQueue(fake_ram(), size, desc, avail, used, True, False)


def test_queue_rings_without_event_words_fit_exactly():
    # without EVENT_IDX the avail ring is 4 + 2 * size bytes, the used ring 4 + 8 * size
    queue = SplitQueue(fake_ram(), 8, DESC_GPA, RAM_SIZE - 20, RAM_SIZE - 68 - 20, False, False)

    assert queue.pop() is None


# -- a ring the driver filled wrong --------------------------------------------------------------
def test_queue_avail_idx_more_than_size_ahead_raises(driver):
    driver.ram.write_u16(AVAIL_GPA + 2, 9)

    with pytest.raises(QueueError, match="avail idx 9 is 9 entries past last_avail 0"):
        driver.device().pop()


def test_queue_enable_notifications_with_avail_idx_more_than_size_ahead_raises(driver):
    """2.7: avail idx is never more than a queue size past the chains taken. Answered
    "more came" instead, a device looked again, pop() found none once avail idx read back
    in range, and it asked again: a driver whose avail idx changes between the two reads
    (a used ring whose flags lie on avail idx) kept the device in that loop forever."""
    queue = driver.device()
    driver.ram.write_u16(AVAIL_GPA + 2, 0xFFFF)  # 65535 entries "ahead" of last_avail 0

    with pytest.raises(QueueError, match="avail idx 65535 is 65535 entries past last_avail 0"):
        queue.enable_notifications()


def test_queue_more_chains_in_flight_than_the_queue_holds_raises(driver):
    """2.7: a driver has `size` descriptors, so at most `size` chains are ever in flight.
    One that publishes a head the device still holds made pop() go on for as long as the
    guest kept publishing (a virtio-console transmit loop popped 60000 chains in one call,
    its deque at 27 MB; past 65536 the u16 count wrapped and push() raised ValueError, which
    killed the device rather than set NEEDS_RESET)."""
    heads = [driver.add([(DATA_GPA + i, 1, False)]) for i in range(8)]
    driver.publish(*heads)
    queue = driver.device()
    assert all(queue.pop() for _ in range(8))
    driver.publish(heads[0])  # again, none of the 8 returned

    with pytest.raises(QueueError, match="8 chains in flight, the queue's size"):
        queue.pop()
    queue.push(heads[0], 0)
    driver.publish(heads[0])
    assert queue.pop() is not None  # one returned: one more may come


def test_queue_avail_idx_behind_last_avail_raises(driver):
    queue = driver.device()
    queue.last_avail = queue.used_idx = 5
    driver.ram.write_u16(AVAIL_GPA + 2, 4)  # moved back: 0xFFFF entries "ahead"

    with pytest.raises(QueueError, match="avail idx 4 is 65535 entries past"):
        queue.pop()


def test_queue_head_out_of_range_raises(driver):
    driver.publish(8)

    with pytest.raises(QueueError, match="avail ring\\[0\\] head 8 >= queue size 8"):
        driver.device().pop()


def test_queue_failed_pop_does_not_advance_last_avail(driver):
    driver.publish(8)
    queue = driver.device()

    with pytest.raises(QueueError):
        queue.pop()
    assert queue.last_avail == 0


@pytest.mark.parametrize(
    ("descs", "head", "match"),
    [
        ([(0, 1, NEXT, 8)], 0, "descriptor 0 next 8 >= queue size 8"),
        ([(0, 1, NEXT, 1), (1, 1, NEXT, 0)], 0, "chain of head 0 loops \\(longer than queue"),
        ([(3, 1, NEXT, 3)], 3, "chain of head 3 loops"),
    ],
)
def test_queue_bad_next_raises(driver, descs, head, match):
    for index, length, flags, next_ in descs:
        driver.set_desc(index, DATA_GPA, length, flags, next_)
    driver.publish(head)

    with pytest.raises(QueueError, match=match):
        driver.device().pop()


@pytest.mark.parametrize(
    ("addr", "length"),
    [(RAM_SIZE, 1), (RAM_SIZE - 1, 2), (0xFFFF_FFFF_FFFF_FFFF, 1), (0, 0xFFFF_FFFF)],
)
def test_queue_buffer_outside_ram_raises(driver, addr, length):
    driver.set_desc(0, addr, length)
    driver.publish(0)

    with pytest.raises(QueueError, match=f"descriptor 0 addr {addr:#x} len {length:#x} is not"):
        driver.device().pop()


# RAM in two ranges with a hole between, as around the PCI hole (the rings stay low)
LOW_END, HIGH = 0xA_0000, RAM_SIZE
LOW_DATA = 0x4_0000


def two_range_driver() -> DriverQueue:
    ranges = [[0, LOW_END, 0], [HIGH, RAM_SIZE - LOW_END, LOW_END]]
    return DriverQueue(GuestRam.from_buffers(bytearray(RAM_SIZE), bytearray(4096), ranges), 8)


def test_queue_pop_takes_buffers_from_either_ram_range():
    """pop() compares each buffer with the range the last look-up hit, and looks up the
    others in every range: buffers in turn below and above the hole are all RAM."""
    driver = two_range_driver()
    parts = [(LOW_DATA, 16, False), (HIGH + 0x100, 32, False), (LOW_DATA + 64, 8, False),
             (HIGH + RAM_SIZE - LOW_END - 1, 1, True)]  # fmt: skip
    driver.publish(driver.add(parts))

    chain_ = driver.device().pop()

    assert chain_ == Chain(0, [(gpa, n) for gpa, n, w in parts if not w], [parts[-1][:2]])


@pytest.mark.parametrize(
    ("addr", "length"),
    [(LOW_END - 8, 16), (HIGH - 1, 2), (HIGH + RAM_SIZE - LOW_END - 4, 8), (LOW_END, 1)],
    ids=["low-range-into-hole", "hole-into-high-range", "past-the-high-end", "in-the-hole"],
)
@pytest.mark.parametrize("last", ["low", "high"])
def test_queue_buffer_leaving_its_range_raises_after_one_in_it(addr, length, last):
    """A buffer that starts in (or next to) a RAM range and leaves it is not RAM, whichever
    range the walk compares with first: the one the last look-up hit, here low (the driver's
    writes), or high (as the last buffer of a chain served before would leave it)."""
    driver = two_range_driver()
    queue = driver.device()
    driver.publish(driver.add([(LOW_DATA, 16, False), (HIGH + 0x100, 16, False),
                               (addr, length, True)]))  # fmt: skip
    queue._ram.check(LOW_DATA if last == "low" else HIGH + 0x200, 8)
    expected = (0, LOW_END) if last == "low" else (HIGH, HIGH + RAM_SIZE - LOW_END)
    assert queue._ram.last_range() == expected

    with pytest.raises(QueueError, match=f"addr {addr:#x} len {length:#x} is not in RAM"):
        queue.pop()


@pytest.mark.parametrize(
    ("addr", "length", "ram"),
    [
        ((1 << 64) - 1, 1, False),
        ((1 << 64) - 1, 0, False),
        ((1 << 64) - 16, 0xFFFF_FFFF, False),
        (LOW_END, 0, True),  # zero length at a range's end: nothing past it is touched
        (HIGH + RAM_SIZE - LOW_END, 0, True),
        (HIGH, 0, True),
    ],
)
def test_queue_buffer_at_the_edges_of_two_ranges(addr, length, ram):
    driver = two_range_driver()
    driver.publish(driver.add([(LOW_DATA, 16, False), (addr, length, True)]))
    queue = driver.device()

    if ram:
        assert queue.pop() == Chain(0, [(LOW_DATA, 16)], [(addr, length)])
    else:
        with pytest.raises(QueueError, match="is not in RAM"):
            queue.pop()


def test_queue_readable_after_writable_raises(driver):
    driver.publish(driver.add([(DATA_GPA, 1, True), (DATA_GPA, 1, False)]))

    with pytest.raises(QueueError, match="descriptor 1 is device-readable after a device-writable"):
        driver.device().pop()


def test_queue_chain_over_4gib_raises():
    # 4096 buffers of 1 MiB each (all of RAM, over and over) in a queue of 8192: 2^32 bytes
    driver = DriverQueue(fake_ram(), size=8192)
    driver.publish(driver.add([(0, RAM_SIZE, True)] * 4096))

    with pytest.raises(QueueError, match="chain of head 0 is over 4 GiB at descriptor 4095"):
        driver.device().pop()


def test_queue_indirect_not_negotiated_raises(driver):
    driver.publish(driver.add_indirect(TABLE_GPA, [(DATA_GPA, 1, False)]))

    with pytest.raises(QueueError, match="descriptor 0 is INDIRECT but VIRTIO_F_INDIRECT_DESC"):
        driver.device(indirect=False).pop()


def test_queue_indirect_with_next_raises(driver):
    driver.ram.write(TABLE_GPA, b"".join(chain([(DATA_GPA, 1, False)])))
    driver.set_desc(0, TABLE_GPA, 16, INDIRECT | NEXT, 1)
    driver.publish(0)

    with pytest.raises(QueueError, match="descriptor 0 has both INDIRECT and NEXT"):
        driver.device(indirect=True).pop()


def test_queue_indirect_table_larger_than_the_queue_holds_a_short_chain(driver):
    """2.7.5.3: the table is desc[len/16]; only the chain is bounded by the queue size (a
    driver may keep tables sized for its largest request on a queue it made smaller)."""
    buffers = [(DATA_GPA, 16, False), (DATA_GPA + 16, 512, True), (DATA_GPA + 528, 1, True)]
    driver.ram.write(TABLE_GPA, b"".join(chain(buffers)) + bytes(29 * 16))  # 32 entries
    driver.set_desc(0, TABLE_GPA, 32 * 16, INDIRECT)  # on a queue of 8
    driver.publish(0)

    popped = driver.device(indirect=True).pop()

    assert popped is not None
    assert popped.readable == [(DATA_GPA, 16)]
    assert popped.writable == [(DATA_GPA + 16, 512), (DATA_GPA + 528, 1)]


def test_queue_indirect_chain_longer_than_the_queue_raises(driver):
    driver.ram.write(TABLE_GPA, b"".join(chain([(DATA_GPA, 1, False)] * 9)))  # queue size 8
    driver.set_desc(0, TABLE_GPA, 9 * 16, INDIRECT)
    driver.publish(0)

    with pytest.raises(QueueError, match="more than 8 descriptors"):
        driver.device(indirect=True).pop()


def test_queue_indirect_chain_up_to_the_devices_limit_on_a_queue_made_smaller(driver):
    """4.1.4.3: a driver may make a queue smaller than the device's; through an indirect
    table it still sends the chains the device's limits allow (virtio-blk's seg_max, set by
    the device's own queue size). Bounded by the smaller queue, a 12-descriptor chain on a
    queue of 8 (the device's 16) set NEEDS_RESET, every later request dead."""
    buffers = [(DATA_GPA + i, 1, False) for i in range(12)]
    driver.ram.write(TABLE_GPA, b"".join(chain(buffers)))
    driver.set_desc(0, TABLE_GPA, 12 * 16, INDIRECT)
    driver.ram.write(TABLE_GPA + 0x1000, b"".join(chain([(DATA_GPA, 1, False)] * 17)))
    driver.set_desc(1, TABLE_GPA + 0x1000, 17 * 16, INDIRECT)
    driver.publish(0, 1)
    queue = driver.device(indirect=True, max_chain=16)

    popped = queue.pop()
    assert popped is not None and popped.readable == [(gpa, n) for gpa, n, _ in buffers]
    with pytest.raises(QueueError, match="more than 16 descriptors"):
        queue.pop()


@pytest.mark.parametrize("length", [0, 8, 24])
def test_queue_indirect_table_bad_len_raises(driver, length):
    driver.set_desc(0, TABLE_GPA, length, INDIRECT)
    driver.publish(0)

    with pytest.raises(QueueError, match=f"indirect table len {length:#x} is not a non-zero"):
        driver.device(indirect=True).pop()


def test_queue_indirect_table_outside_ram_raises(driver):
    driver.set_desc(0, RAM_SIZE - 16, 32, INDIRECT)
    driver.publish(0)

    with pytest.raises(QueueError, match="descriptor 0 indirect table 0xffff0\\+0x20 is not in"):
        driver.device(indirect=True).pop()


@pytest.mark.parametrize(
    ("flags", "next_", "table_len", "match"),
    [
        (INDIRECT, 0, 16, "indirect descriptor 0 is INDIRECT inside an indirect table"),
        (NEXT, 2, 32, "indirect descriptor 0 next 2 >= indirect table size 2"),
        (NEXT, 0, 16 * 8, "descriptor 0 indirect chain loops \\(longer than its 8"),
    ],
)
def test_queue_bad_indirect_entry_raises(driver, flags, next_, table_len, match):
    driver.ram.write(TABLE_GPA, descriptor(DATA_GPA, 1, flags, next_))
    driver.set_desc(0, TABLE_GPA, table_len, INDIRECT)
    driver.publish(0)

    with pytest.raises(QueueError, match=match):
        driver.device(indirect=True).pop()


def test_queue_direct_and_indirect_over_queue_size_raises(driver):
    driver.ram.write(TABLE_GPA, b"".join(chain([(DATA_GPA, 1, False)] * 8)))
    driver.set_desc(0, DATA_GPA, 1, NEXT, 1)
    driver.set_desc(1, TABLE_GPA, 16 * 8, INDIRECT)
    driver.publish(0)

    with pytest.raises(QueueError, match="more than 8 descriptors at descriptor 1 ind"):
        driver.device(indirect=True).pop()


def test_queue_indirect_buffer_outside_ram_raises(driver):
    driver.publish(driver.add_indirect(TABLE_GPA, [(DATA_GPA, 1, False), (RAM_SIZE, 1, True)]))

    with pytest.raises(QueueError, match="descriptor 0 indirect descriptor 1 addr 0x100000"):
        driver.device(indirect=True).pop()


def test_queue_push_together_writes_every_entry_then_used_idx_once(driver):
    heads = [driver.add([(DATA_GPA + 64 * i, 64, True)]) for i in range(3)]
    driver.publish(*heads)
    queue = driver.device()
    for _ in heads:
        queue.pop()

    queue.push_together([(heads[0], 64), (heads[1], 10)])

    assert [driver.used_elem(0), driver.used_elem(1)] == [(heads[0], 64), (heads[1], 10)]
    assert driver.used_idx() == 2 == queue.used_idx
    with pytest.raises(ValueError, match="push of 2 chains, more than are in flight"):
        queue.push_together([(heads[2], 1), (heads[2], 1)])


def test_queue_direct_and_indirect_buffers_over_4gib_together_raise():
    # 2048 direct buffers of 1 MiB (2^31 bytes), then an indirect table of 2048 more (2^31):
    # each part alone is under 4 GiB, the chain is 2^32 bytes, more than a used len can say
    driver = DriverQueue(fake_ram(), size=8192)
    head = driver.add([(0, RAM_SIZE, True)] * 2048)
    driver.set_desc(2047, 0, RAM_SIZE, WRITE | NEXT, 2048)
    driver.ram.write(TABLE_GPA, b"".join(chain([(0, RAM_SIZE, True)] * 2048)))
    driver.set_desc(2048, TABLE_GPA, 2048 * 16, INDIRECT)
    driver.publish(head)

    with pytest.raises(QueueError, match="over 4 GiB at descriptor 2048 indirect descriptor 2047"):
        driver.device(indirect=True).pop()
