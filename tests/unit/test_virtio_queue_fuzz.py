"""SplitQueue against hostile rings (hypothesis): whatever a driver writes in its descriptor
table, indirect tables and avail ring, pop() returns a chain that lies in RAM and is bounded,
or raises QueueError; never another exception, and never more than bounded work."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.devprocs.virtio.guestram import GuestRam
from splitvmm.devprocs.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    QueueError,
    SplitQueue,
)
from tests.virtio_driver import descriptor

# RAM in two ranges around a hole, as around the PCI hole: gpa [0, 32K) and [64K, 96K)
LOW_END, HIGH, HIGH_END = 0x8000, 0x1_0000, 0x1_8000
RANGES = [[0, LOW_END, 0], [HIGH, HIGH_END - HIGH, LOW_END]]
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x400, 0x800  # rings for queues up to 16
TABLE_GPA, TABLE_STRIDE = 0x1000, 0x400  # indirect tables, 1 KiB apart
TABLES = 2
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def mostly(sane: st.SearchStrategy[int], hostile: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Sane values most of the time (hypothesis leans to small draws: k == 9 is rare), so
    that chains get far enough to meet the hostile values."""
    return st.integers(0, 9).flatmap(lambda k: hostile if k == 9 else sane)


# addresses and lengths near every edge: of each range, the hole, 2^32, 2^64
EDGE_ADDRS = st.sampled_from(
    [0, LOW_END - 16, LOW_END - 1, LOW_END, HIGH - 1, HIGH_END - 1, HIGH_END, 1 << 32]
)
ADDRS = mostly(
    st.integers(0, LOW_END - 0x100) | st.integers(HIGH, HIGH_END - 0x100),
    EDGE_ADDRS | st.sampled_from([(1 << 64) - 16, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1),
)
LENS = mostly(
    st.integers(0, 0x100),
    st.sampled_from([LOW_END, HIGH_END, 0xFFFF_FFFF]) | st.integers(0, 0xFFFF_FFFF),
)
FLAGS = mostly(
    st.sampled_from([NEXT, NEXT | WRITE, 0, WRITE]), st.integers(0, 7) | st.integers(0, 0xFFFF)
)
TABLE_ENTRIES = 8
TABLE_GPAS = st.sampled_from([TABLE_GPA + TABLE_STRIDE * i for i in range(TABLES)])
Descriptor = tuple[int, int, int, int]


def buffer(entries: int) -> st.SearchStrategy[Descriptor]:
    """A buffer descriptor in a table of `entries`."""
    return st.tuples(
        ADDRS, LENS, FLAGS, mostly(st.integers(0, entries - 1), st.integers(0, 0xFFFF))
    )


def entry(size: int) -> st.SearchStrategy[Descriptor]:
    """A descriptor in a table of `size`: a buffer, or a pointer to an indirect table."""
    pointer = st.tuples(
        mostly(TABLE_GPAS, ADDRS),
        # tables of up to TABLE_ENTRIES, more than a small queue's size (2.7.5.3 allows it)
        mostly(st.integers(1, TABLE_ENTRIES).map(lambda n: 16 * n), LENS),
        mostly(st.just(INDIRECT), FLAGS | st.just(INDIRECT | NEXT)),
        st.integers(0, 0xFFFF),
    )
    return st.one_of(buffer(size), buffer(size), buffer(size), pointer)


class CountingRam(GuestRam):
    """Counts guest memory accesses: each goes through offset() once."""

    accesses = 0

    def offset(self, gpa: int, size: int) -> int:
        self.accesses += 1
        return super().offset(gpa, size)


@st.composite
def hostile_queues(draw: st.DrawFn) -> tuple[CountingRam, SplitQueue]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    ram = CountingRam.from_buffers(bytearray(HIGH_END - HIGH + LOW_END), bytearray(8), RANGES)
    for i, desc in enumerate(draw(st.lists(entry(size), min_size=size, max_size=size))):
        ram.write(DESC_GPA + 16 * i, descriptor(*desc))
    for t in range(TABLES):
        entries = draw(st.lists(entry(TABLE_ENTRIES), max_size=TABLE_ENTRIES))
        ram.write(TABLE_GPA + TABLE_STRIDE * t, b"".join(descriptor(*d) for d in entries))
    ring = draw(
        st.lists(
            mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size, max_size=size
        )
    )
    for slot, head in enumerate(ring):
        ram.write_u16(AVAIL_GPA + 4 + 2 * slot, head)
    last_avail = draw(st.integers(0, 0xFFFF))
    ahead = draw(mostly(st.integers(1, size), st.integers(0, 0xFFFF)))
    ram.write_u16(AVAIL_GPA + 2, (last_avail + ahead) & 0xFFFF)
    event_idx, indirect = draw(st.booleans()), draw(mostly(st.just(True), st.just(False)))
    queue = SplitQueue(ram, size, DESC_GPA, AVAIL_GPA, USED_GPA, event_idx, indirect)
    queue.last_avail = queue.used_idx = last_avail
    return ram, queue


def popped(ram: CountingRam, queue: SplitQueue) -> Chain | None:
    """One pop(), its work bounded and its chain checked: every buffer in RAM, within the
    bounds; None when the queue had nothing or refused the ring."""
    ram.accesses = 0
    try:
        chain = queue.pop()
    except QueueError:
        chain = None
    # avail idx, head, each descriptor read, each buffer checked, one table, avail_event
    assert ram.accesses <= 2 * queue.size + 4
    if chain is not None:
        buffers = chain.readable + chain.writable
        for gpa, length in buffers:
            ram.check(gpa, length)  # GuestRamError would fail the test
        assert 0 <= chain.head < queue.size
        assert len(buffers) <= queue.size
        assert sum(length for _, length in buffers) <= MAX_CHAIN_BYTES
    return chain


@settings(max_examples=300, deadline=None, database=None)
@given(hostile_queues())
def test_queue_fuzz_pop_returns_bounded_chain_in_ram_or_raises_queueerror(
    built: tuple[CountingRam, SplitQueue],
) -> None:
    ram, queue = built
    for _ in range(queue.size + 1):  # a pop per available entry, and one past them
        chain = popped(ram, queue)
        if chain is None:
            return
        queue.push(chain.head, 0)
