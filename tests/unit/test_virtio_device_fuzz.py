"""Every virtio model against a hostile driver (hypothesis), through its whole window: the
PCI configuration space, the common, ISR, device and notify regions of BAR 0, the MSI-X table
and PBA; rings it sets up where it likes, chains that point anywhere, guest RAM rewritten
under the device's feet, kicks, frames from the host side, quiesce and resume.

What must hold (issue 9: "a hostile guest puts the device in NEEDS_RESET, never crashes it
or anything else"): no step raises -- an exception out of a window access or a kick ends the
device process, and with it the guest's device, whatever its on_crash says -- and whatever
the driver did, the device still answers, quiesces, saves a state and restores from it.
Crashes come in the middle too (the device's process dies, its successor takes over from
its last checkpoint and the journal of frames since): the successor must show the guest
the registers the dead process did.
test_virtio_queue_fuzz.py fuzzes the ring walker alone; this is the whole device around it.

The suite runs FUZZ's examples per model; a longer campaign sets SPLITVMM_FUZZ_EXAMPLES
(4000 per model pass in ~70 s here). Each virtio-blk example leaves its host-I/O flag page
mapped (progress.py maps it for the device's life): ~2 mappings an example, so past ~30000
examples in one process the host's vm.max_map_count (65530) ends the run with ENOMEM.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitvmm.devprocs.base import load_model
from splitvmm.devprocs.virtio.pci import VirtioPciDevice
from splitvmm.devprocs.virtio.state import VirtioPciState
from splitvmm.protocol.models import MODELS, PciFunction
from splitvmm.record import replace
from tests.virtio.support import (
    BAR0,
    BAR1,
    DEVICE_CFG,
    DRIVER_OK,
    F_EVENT_IDX,
    F_INDIRECT,
    ISR,
    NEEDS_RESET,
    NOTIFY,
    SteppingClock,
    close_fds,
    host_fds,
    iter_caps,
    prepared,
    replaying,
    serve_ready,
)

MODELS_UNDER_TEST = ("virtio-rng", "virtio-blk", "virtio-net", "virtio-console")
RAM = 2 << 20  # the stand-in transport's guest RAM: gpa [0, 2 MiB) (cli/policy.py)
DISK_SECTORS = 64
RING_BASES = (0x1000, 0x8000, 0x20000, RAM - 0x3000, RAM - 0x100)  # the last two run off RAM
HEAP = 0x40000  # buffers and indirect tables from here to the end of RAM
MAX_STEPS = 40


# -- the driver's moves ----------------------------------------------------------------------
def near(values: list[int]) -> st.SearchStrategy[int]:
    """An interesting offset, or one a few bytes either side of it."""
    return st.builds(lambda v, d: max(v + d, 0), st.sampled_from(values), st.integers(-3, 3))


def window_offsets(function: PciFunction) -> st.SearchStrategy[int]:
    """Offsets in the function's window: its registers mostly, anywhere in it sometimes."""
    end = max(region.start + region.size for region in function.regions())
    registers = [
        *range(0, 0x40, 2),  # the configuration header
        *range(0x40, 0x100, 4),  # capabilities
        *(BAR0 + field for field in range(0, 0x3C, 2)),  # common configuration
        ISR,
        *(DEVICE_CFG + at for at in range(0, 0x40, 4)),
        *(NOTIFY + 4 * q for q in range(4)),
        *(BAR1 + at for at in range(0, 0x40, 4)),  # the MSI-X table
        BAR1 + 0x800,  # the PBA
    ]
    return near(registers) | st.integers(0, end - 8)


VALUES = st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1]) | st.integers(
    0, (1 << 64) - 1
)
SIZES = st.sampled_from([1, 2, 4, 8])
GPAS = st.integers(HEAP, RAM - 0x100) | st.sampled_from(
    [0, RAM - 1, RAM, RAM + 0x1000, 1 << 32, (1 << 64) - 16]
)
LENGTHS = st.integers(0, 0x200) | st.sampled_from([0x1000, 0x10_0000, 0xFFFF_FFFF])
PART = st.tuples(GPAS, LENGTHS, st.booleans())
KICK = st.integers(0, 3).map(bool)  # a chain kicked at once, mostly
# MSI-X vectors a driver gives msix_config and its queues: none (INTx), or table entries, or
# NO_VECTOR, or past the table
VECTORS = st.just([]) | st.lists(
    st.sampled_from([0, 1, 2, 0xFFFF]) | st.integers(0, 0xFFFF), min_size=1, max_size=4
)


@dataclass
class Queue:
    """Where the driver put a queue, as far as it knows."""

    size: int
    base: int
    avail_idx: int = 0
    next_desc: int = 0


@dataclass
class Scene:
    """A device under a hostile driver, and the host-side ends of its fds."""

    name: str
    dev: VirtioPciDevice
    fds: dict[str, int]
    peers: dict[str, int]
    queues: dict[int, Queue]
    heap: int = HEAP
    # The device's last checkpoint (a state it published) and the window's frames since:
    # what a crash restart starts from (runtime.run: restore, replay, after_restart).
    checkpoint: Any = None
    journal: list[tuple[int, int | bytes]] = field(default_factory=list)

    def rd(self, offset: int, size: int) -> int:
        self.journal.append((offset, size))
        return int.from_bytes(self.dev.read(offset, size), "little")

    def wr(self, offset: int, value: int, size: int) -> None:
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.journal.append((offset, data))
        self.dev.write(offset, data)

    def common(self, field: int, value: int, size: int) -> None:
        self.wr(BAR0 + field, value, size)

    def capability(self, cap_id: int) -> int | None:
        """Where the capability list has `cap_id`, walked from 0x34 as a driver does."""
        return next((at for at, found in iter_caps(self.rd) if found == cap_id), None)

    def alloc(self, size: int) -> int:
        if self.heap + size > RAM:
            self.heap = HEAP
        at, self.heap = self.heap, self.heap + ((size + 15) & ~15)
        return at


def start(
    scene: Scene,
    mask: int,
    sizes: list[int],
    bases: list[int],
    ok: bool,
    vectors: Sequence[int] = (),
) -> None:
    """A driver's initialisation (3.1.1): the features it read, under `mask` (all of them,
    some, or bits nobody offered), and the rings it chose. With `vectors`, MSI-X first (as
    Linux does): the table's entries programmed and unmasked, the function's MSI-X enabled,
    msix_config and each queue's vector from the list (ones past the table included)."""
    scene.wr(0x04, scene.rd(0x04, 2) | 0x4, 2)  # Bus Master Enable
    if vectors:
        for entry in range(4):
            scene.wr(BAR1 + 16 * entry, 0xFEE0_0000, 4)
            scene.wr(BAR1 + 16 * entry + 8, 0x40 + entry, 4)
            scene.wr(BAR1 + 16 * entry + 12, 0, 4)  # unmasked
        at = scene.capability(0x11)
        if at is not None:
            scene.wr(at + 2, scene.rd(at + 2, 2) | 0x8000, 2)
    scene.common(0x14, 0, 1)  # reset
    for status in (1, 3):
        scene.common(0x14, status, 1)
    offered = 0
    for select in (0, 1):
        scene.common(0x00, select, 4)
        offered |= scene.rd(BAR0 + 0x04, 4) << (32 * select)
    features = offered & mask | mask >> 64  # bits past 64: asked for, offered or not
    for select in (0, 1):
        scene.common(0x08, select, 4)
        scene.common(0x0C, features >> (32 * select), 4)
    scene.common(0x14, 11, 1)  # FEATURES_OK
    if vectors:
        scene.common(0x10, vectors[0], 2)  # msix_config
    scene.queues.clear()
    for q, (size, base) in enumerate(zip(sizes, bases, strict=False)):
        scene.common(0x16, q, 2)
        scene.common(0x18, size, 2)
        if len(vectors) > q + 1:
            scene.common(0x1A, vectors[q + 1], 2)
        for at, gpa in ((0x20, base), (0x28, base + 0x1000), (0x30, base + 0x2000)):
            scene.common(at, gpa, 4)
            scene.common(at + 4, gpa >> 32, 4)
        scene.common(0x1C, 1, 2)
        scene.queues[q] = Queue(size, base)
    if ok:
        scene.common(0x14, 11 | DRIVER_OK, 1)


def add_chain(
    scene: Scene, q: int, parts: list[tuple[int, int, bool]], indirect: bool, head_bytes: bytes
) -> None:
    """Descriptors for `parts` (wherever they point), made available on queue q; the first
    buffer begins with `head_bytes` (a request's header: virtio-blk's, virtio-net's)."""
    queue = scene.queues.get(q)
    if queue is None or not queue.size:
        return
    ram = scene.dev.ram

    def put(gpa: int, data: bytes) -> None:
        if gpa + len(data) <= RAM:  # the driver writes only where RAM is
            ram.write(gpa, data)

    put(parts[0][0], head_bytes[: parts[0][1]])

    def descs(table: int, count: int, first: int) -> None:
        index = first
        for i, (gpa, length, writable) in enumerate(parts):
            last = i == len(parts) - 1
            flags = (2 if writable else 0) | (0 if last else 1)  # WRITE, NEXT
            nxt = (index + 1) % count
            put(table + 16 * index, struct.pack("<QIHH", gpa, length & 0xFFFF_FFFF, flags, nxt))
            index = nxt

    head = queue.next_desc % queue.size
    if indirect:  # one descriptor pointing at a table of them all
        table = scene.alloc(16 * len(parts))
        descs(table, len(parts), 0)
        put(queue.base + 16 * head, struct.pack("<QIHH", table, 16 * len(parts), 4, 0))
        queue.next_desc = head + 1
    else:
        descs(queue.base, queue.size, head)
        queue.next_desc = head + len(parts)
    avail = queue.base + 0x1000
    put(avail + 4 + 2 * (queue.avail_idx % queue.size), struct.pack("<H", head))
    queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
    put(avail + 2, struct.pack("<H", queue.avail_idx))


def kick(scene: Scene, q: int) -> None:
    fd = scene.fds.get(f"notify{q}")
    if fd is None:
        return
    os.eventfd_write(fd, 1)
    serve_ready(scene.dev)


def checkpoint(scene: Scene) -> None:
    """The device publishes its state (checkpoints come every few frames): a restart
    starts from here, and replays what the window saw since."""
    scene.checkpoint, scene.journal = scene.dev.save(), []


def crash(scene: Scene) -> None:
    """The device process dies and its successor takes over: restored from the checkpoint
    (restarted), the journal's frames re-applied to the registers only, then each live
    queue taken up from its used ring in guest RAM (runtime.run)."""
    if scene.checkpoint is None:
        checkpoint(scene)
    before = scene.dev.save()
    model = load_model(scene.name)
    new = model.restore(prepared(scene.name, scene.fds, restarted=True), scene.checkpoint)
    assert isinstance(new, VirtioPciDevice)
    with replaying(new):
        for offset, access in scene.journal:
            if isinstance(access, bytes):
                new.write(offset, access)
            else:
                new.read(offset, access)
    # the guest may read any register next: the successor must show what the dead one did
    assert registers(new.save()) == registers(before)
    scene.dev = configured(new)


def registers(state: VirtioPciState) -> VirtioPciState:
    """The transport's registers as a driver reads them, but for what a restart changes by
    design: the interrupt it raises once (ISR, a pending MSI-X vector), NEEDS_RESET (found
    again as the successor walks the ring that set it) and the queues' positions (taken up
    from the used rings in guest RAM)."""
    queues = tuple(replace(q, last_avail=0, used_idx=0) for q in state.queues)
    transport = {f: getattr(state, f) for f in VirtioPciState.__struct_fields__}
    return VirtioPciState(**{
        **transport, "isr": 0, "msix_pending": 0, "status": state.status & ~NEEDS_RESET,
        "queues": queues,
    })  # fmt: skip


def host_side(scene: Scene, data: bytes) -> None:
    """What the host sends the device: a frame on the TAP (virtio-net), input on the console."""
    for role in ("tap", "input"):
        peer = scene.peers.get(role)
        if peer is not None:
            try:
                os.write(peer, data or b"\0")
            except BlockingIOError:
                pass  # the device has not read what came before: its socket is full
    serve_ready(scene.dev)


def drain_host_side(scene: Scene) -> None:
    """Read what the device sent the host, so that its sends never find a full socket."""
    for peer in scene.peers.values():
        try:
            while os.read(peer, 1 << 16):
                pass
        except (BlockingIOError, OSError):
            pass


Step = Callable[[Scene], None]


def steps(function: PciFunction, num_queues: int) -> st.SearchStrategy[Step]:
    queues = st.integers(0, num_queues)  # one past the last: a queue that does not exist

    def write(offset: int, value: int, size: int) -> Step:
        return lambda s: s.wr(offset, value, size)

    def read(offset: int, size: int) -> Step:
        return lambda s: s.rd(offset, size) and None

    def init(mask: int, sizes: list[int], bases: list[int], ok: bool, vectors: list[int]) -> Step:
        return lambda s: start(s, mask, sizes, bases, ok, vectors)

    def chain(
        q: int, parts: list[tuple[int, int, bool]], indirect: bool, head: bytes, then_kick: bool
    ) -> Step:
        def run(s: Scene) -> None:
            add_chain(s, q, parts, indirect, head)
            if then_kick:
                kick(s, q)

        return run

    def scribble(q: int, offset: int, data: bytes) -> Step:
        def run(s: Scene) -> None:
            queue = s.queues.get(q)
            base = queue.base if queue else RING_BASES[0]
            gpa = base + offset
            if gpa + len(data) <= RAM:
                s.dev.ram.write(gpa, data)

        return run

    def lifecycle(which: str) -> Step:
        return lambda s: getattr(s.dev, which)()

    every = (1 << 64) - 1
    masks = st.sampled_from([every, every & ~F_EVENT_IDX, every & ~F_INDIRECT]) | st.integers(
        0, (1 << 128) - 1
    )
    sane_sizes = st.lists(st.sampled_from([16, 256]), min_size=num_queues, max_size=num_queues)
    sane_bases = st.permutations([0x1000 + 0x4000 * q for q in range(num_queues)])
    # a request's first bytes: a block request header (type, reserved, sector), or anything
    head = st.builds(
        lambda kind, sector: struct.pack("<IIQ", kind, 0, sector),
        st.sampled_from([0, 1, 4, 8, 11, 13]) | st.integers(0, 0xFFFF_FFFF),
        st.integers(0, DISK_SECTORS) | st.integers(0, (1 << 64) - 1),
    ) | st.binary(max_size=24)
    blk_shaped = st.tuples(
        st.tuples(st.integers(HEAP, RAM - 0x100), st.just(16), st.just(False)),
        st.tuples(
            st.integers(HEAP, RAM - 0x2000), st.sampled_from([512, 1024, 4096]), st.booleans()
        ),
        st.tuples(st.integers(HEAP, RAM - 0x100), st.just(1), st.just(True)),
    ).map(list)
    requests = st.one_of(
        st.builds(chain, queues, st.lists(PART, min_size=1, max_size=6), st.booleans(), head, KICK),
        st.builds(chain, queues, blk_shaped, st.booleans(), head, KICK),
        st.builds(chain, st.just(0), blk_shaped, st.just(False), head, st.just(True)),
    )
    hostile = st.one_of(
        st.builds(write, window_offsets(function), VALUES, SIZES),
        st.builds(read, window_offsets(function), SIZES),
        st.builds(init, masks, sane_sizes, sane_bases, st.just(True), VECTORS),
        st.builds(
            init,
            masks,
            st.lists(st.sampled_from([1, 2, 4, 16, 256]) | st.integers(0, 0xFFFF), max_size=4),
            st.lists(st.sampled_from(RING_BASES) | st.integers(0, RAM), max_size=4),
            st.booleans(),
            VECTORS,
        ),
        st.builds(scribble, queues, st.integers(0, 0x2100), st.binary(min_size=1, max_size=16)),
        st.builds(lambda q: lambda s: kick(s, q), queues),
        st.builds(lambda d: lambda s: host_side(s, d), st.binary(max_size=200)),
        st.sampled_from(["quiesce", "resume", "retry"]).map(lifecycle),
        st.sampled_from([checkpoint, crash]),
    )
    # Requests two times in three: a driver's register writes mostly end in a reset, and a
    # request meets the model's own code only on a device still started.
    return st.integers(0, 2).flatmap(lambda k: hostile if k == 0 else requests)


# -- the device under test -------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "disk.img"
        path.write_bytes(bytes(512 * DISK_SECTORS))
        yield path


def options_of(name: str) -> dict[str, Any]:
    return {"virtio-blk": {"serial": "fuzz"}, "virtio-net": {"mac": "52:54:00:12:34:56"}}.get(
        name, {}
    )


def make(name: str, disk: Path) -> Scene:
    peers: dict[str, int] = {}
    fds = host_fds(name, disk if name == "virtio-blk" else None, peers)
    dev = load_model(name).from_options(prepared(name, fds), options_of(name))
    assert isinstance(dev, VirtioPciDevice)
    return Scene(name, configured(dev), fds, peers, {})


def configured(dev: VirtioPciDevice) -> VirtioPciDevice:
    """As the tests' devices are: its process() never waits for the host's clock, and the
    monitor's end of its events takes every one."""
    dev.ctx.waiting = lambda: False
    dev.clock_ns = SteppingClock(step=1_000)  # type: ignore[method-assign]
    dev.ctx.events.connect(lambda frame: True)
    return dev


def num_queues(name: str) -> int:
    function = MODELS[name].transport
    assert isinstance(function, PciFunction) and function.notify is not None
    return function.notify.queues


def fuzz(name: str, disk: Path, started: bool, vectors: list[int], moves: list[Step]) -> None:
    """`moves` on a device reset, or (`started`) after a driver's sane initialisation (with
    MSI-X `vectors`)."""
    scene = make(name, disk)
    try:
        if started:
            queues = num_queues(name)
            start(
                scene,
                (1 << 64) - 1,
                [16] * queues,
                [0x1000 + 0x4000 * q for q in range(queues)],
                ok=True,
                vectors=vectors,
            )
        for move in moves:
            move(scene)
            drain_host_side(scene)
        status = scene.rd(BAR0 + 0x14, 1)  # still answers
        scene.dev.quiesce()
        state = scene.dev.save()
        restored = load_model(name).restore(prepared(name, scene.fds), state)
        restored.resume()
        # the same, but for NEEDS_RESET: a restore finds what the guest wrote in the used
        # rings (two queues on one ring, say) where the running device met it later, or never
        assert restored.read(BAR0 + 0x14, 1)[0] | NEEDS_RESET == status | NEEDS_RESET
    finally:
        close_fds(scene.fds)
        close_fds(scene.peers)


def transport(name: str) -> PciFunction:
    function = MODELS[name].transport
    assert isinstance(function, PciFunction)
    return function


FUZZ = settings(
    max_examples=int(os.environ.get("SPLITVMM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("name", MODELS_UNDER_TEST)
def test_virtio_device_survives_a_hostile_driver(name: str, disk: Path) -> None:
    @FUZZ
    @given(
        started=st.booleans(),
        vectors=VECTORS,
        moves=st.lists(steps(transport(name), num_queues(name)), max_size=MAX_STEPS),
    )
    def run(started: bool, vectors: list[int], moves: list[Step]) -> None:
        fuzz(name, disk, started, vectors, moves)

    run()


def test_virtio_device_fuzz_reaches_served_requests(disk: Path) -> None:
    """The moves above reach the models' request handling, not only the transport's
    refusals: a sane start, one chain and a kick get a used entry from virtio-rng."""
    scene = make("virtio-rng", disk)
    try:
        start(scene, (1 << 64) - 1, [16], [RING_BASES[0]], ok=True)
        add_chain(scene, 0, [(HEAP, 64, True)], indirect=False, head_bytes=b"")
        kick(scene, 0)
        assert scene.dev.ram.u16(RING_BASES[0] + 0x2000 + 2) == 1  # used idx
    finally:
        close_fds(scene.fds)
        close_fds(scene.peers)
