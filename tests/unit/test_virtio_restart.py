"""A virtio device's crash restart (devprocs/virtio/pci.py, runtime.replay): the journal of
frames after the checkpoint is re-applied to the registers only, then after_restart() takes
each queue the last frame leaves enabled up from its used ring and interrupts once. Each
test is a crash at a moment the dead process could die in, driven in-process with virtio-rng
(the simplest queue) and the restart steps runtime.run takes."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import pytest

from splitvmm.devprocs import runtime
from splitvmm.devprocs.virtio_rng import VirtioRng
from splitvmm.monitor import slot as slot_module
from splitvmm.monitor.channel import ChannelError
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import DeviceSlot, SlotState, Spawn
from splitvmm.protocol import wire
from tests.unit.test_slot import Dead, refuse
from tests.unit.test_virtio_pci import msix_on
from tests.virtio.support import (
    ACK,
    BAR0,
    BAR1,
    COMMAND,
    DRIVER,
    DRIVER_OK,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    Channel,
    Driver,
    Ring,
    host_fds,
    prepared,
    replaying,
    serve_ready,
    signalled,
)

RUNNING = ACK | DRIVER | FEATURES_OK | DRIVER_OK
Frame = Callable[[VirtioRng], object]


def restart(
    fds: dict[str, int], checkpoint: object, journal: list[Frame], confirmed: int | None = None
) -> VirtioRng:
    """runtime.run's steps for a restarted process: restore, replay, after_restart. Past the
    first `confirmed` frames (None: all), the monitor does not know the dead process applied
    them (runtime.replay: ctx.replay_unconfirmed)."""
    new = VirtioRng.restore(prepared("virtio-rng", fds, restarted=True), checkpoint)
    with replaying(new):
        for n, frame in enumerate(journal):
            new.ctx.replay_unconfirmed = confirmed is not None and n >= confirmed
            frame(new)
        new.ctx.replay_unconfirmed = False
    return new


def die_after_push(dev: VirtioRng) -> None:
    """The dead process's last work: a chain completed (used idx moved), no interrupt sent."""
    ring = dev.rings[0]
    assert ring is not None
    chain = ring.pop()
    assert chain is not None
    ring.push(chain.head, dev.handle(0, chain))


def test_restart_interrupts_when_driver_ok_is_in_the_journal_not_the_checkpoint() -> None:
    """The checkpoint predates DRIVER_OK (checkpoints come every few frames): the restart's
    interrupt used to be raised only for a queue ready at the checkpoint, so the driver
    waited forever for the chain the dead process completed."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    driver, ring = Driver(dev), Ring(dev.ram)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.setup_queue(0, ring)
    checkpoint = dev.save()
    journal: list[Frame] = [lambda d: Driver(d).set_status(RUNNING)]
    journal[0](dev)
    ring.add([(*ring.buffer(16), True)])
    die_after_push(dev)
    signalled(fds["intx"])

    new = restart(fds, checkpoint, journal)
    for _ in range(3):
        serve_ready(new)

    assert (ring.used_idx(), signalled(fds["intx"]), new.isr) == (1, 1, 1)


def test_restart_interrupt_is_not_cleared_by_a_replayed_isr_read() -> None:
    """INTx: the guest's handler reads ISR (a journalled read). Raised before the replay,
    the restart's interrupt status was cleared by it: the handler then read ISR 0, took the
    interrupt as not its own and never looked at the ring."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    driver, ring = Driver(dev), Ring(dev.ram)
    driver.start(ring)
    ring.add([(*ring.buffer(16), True)])
    driver.kick()
    checkpoint = dev.save()
    journal: list[Frame] = [lambda d: d.read(ISR, 1)]
    journal[0](dev)
    ring.add([(*ring.buffer(16), True)])
    die_after_push(dev)

    new = restart(fds, checkpoint, journal)

    assert (ring.used_idx(), Driver(new).rd(ISR, 1)) == (2, 1)


def test_replay_never_touches_a_ring_the_driver_has_reset_and_given_up() -> None:
    """Journal: DRIVER_OK on the first rings, a reset, a new set-up elsewhere. Replayed with
    its side effects, the first DRIVER_OK ran the old rings, memory the guest had reused:
    the device wrote its used ring and filled a buffer its stale descriptors named."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    old, new_ring = Ring(dev.ram, base=0x1000), Ring(dev.ram, base=0x20000)
    new_ring.heap = 0x30000
    driver = Driver(dev)
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.setup_queue(0, old)
    checkpoint = dev.save()
    journal: list[Frame] = [
        lambda d: Driver(d).set_status(RUNNING),
        lambda d: Driver(d).set_status(0),
        lambda d: Driver(d).negotiate(F_VERSION_1),
        lambda d: Driver(d).setup_queue(0, new_ring),
        lambda d: Driver(d).set_status(RUNNING),
    ]
    for frame in journal:
        frame(dev)
    # the guest's own data now where the old rings were: one looks like a chain to 0x50000
    dev.ram.write(old.desc, struct.pack("<QIHH", 0x50000, 64, 2, 0))
    dev.ram.write(old.avail, struct.pack("<HHH", 0, 1, 0))
    dev.ram.write(old.used, b"\xaa" * 16)
    dev.ram.write(0x50000, b"\x11" * 64)

    restart(fds, checkpoint, journal)

    assert (dev.ram.read(old.used, 16), dev.ram.read(0x50000, 64)) == (
        b"\xaa" * 16,
        b"\x11" * 64,
    )


def test_restart_interrupt_pends_while_bus_master_is_off_and_comes_when_it_is_set() -> None:
    """The dead process completed a chain and died before its interrupt; the journal ends
    with the guest clearing Bus Master Enable (Linux's shutdown before a kexec, or a driver
    unbinding). The restart's catch-up interrupt was sent only to a function that may master
    the bus, and never later: when the guest set the bit again, nothing told its driver of
    the completed chain. It pends instead (the ISR, and INTx, which is no bus master cycle),
    as any interrupt raised meanwhile would."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    driver, ring = Driver(dev), Ring(dev.ram)
    driver.start(ring)
    checkpoint = dev.save()
    ring.add([(*ring.buffer(16), True)])
    die_after_push(dev)
    signalled(fds["intx"])
    journal: list[Frame] = [lambda d: Driver(d).wr(COMMAND, 0, 2)]
    journal[0](dev)

    new = restart(fds, checkpoint, journal)
    Driver(new).enable_bus_master()

    # INTx is level-triggered: each assertion while the line is up writes its irqfd again
    assert (ring.used_idx(), new.isr, signalled(fds["intx"]) > 0) == (1, 1, True)


def test_restart_msix_catch_up_waits_in_the_pba_for_bus_master_enable() -> None:
    """The MSI-X side of the test above: with Bus Master Enable clear the restart's catch-up
    vector pends (its PBA bit: an MSI-X message is a memory write), and goes out once the
    guest sets the bit again."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    driver, ring = Driver(dev), Ring(dev.ram)
    dev.ctx.events.connect(Channel().send)
    driver.start(ring, vector=1)
    msix_on(driver, vector=1)
    checkpoint = dev.save()
    ring.add([(*ring.buffer(16), True)])
    die_after_push(dev)
    journal: list[Frame] = [lambda d: Driver(d).wr(COMMAND, 0x0002, 2)]  # memory on, master off
    journal[0](dev)

    new = restart(fds, checkpoint, journal)
    channel = Channel()
    new.ctx.events.connect(channel.send)
    for asked in channel.ops("msi"):  # the restored table's routes, asked for again
        new.ctx.events.route_done(int(asked["id"]), True, "")
    held = (signalled(fds["msix1"]), Driver(new).rd(BAR1 + 0x800, 8))
    Driver(new).wr(COMMAND, 0x0006, 2)

    assert (ring.used_idx(), held, signalled(fds["msix1"])) == (1, (0, 0b10), 1)


def test_restart_after_a_queue_enabled_on_a_stale_used_ring_serves_every_request() -> None:
    """A driver may enable a queue on memory it did not zero (a reset and a new set-up on the
    same rings); the device starts at 0, and wrote nothing there until its first push. A
    crash before that: the restart took the stale used idx (1) from guest RAM, skipped the
    first request, and the driver took the old entry in that slot for its completion."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(dev.ram)
    dev.ram.write(ring.used, struct.pack("<HHII", 0, 1, 9, 7))  # a previous life's idx, entry
    checkpoint = dev.save()
    journal: list[Frame] = [lambda d: Driver(d).start(ring)]
    journal[0](dev)
    heads = [ring.add([(*ring.buffer(16), True)]) for _ in range(3)]  # then the crash

    new = restart(fds, checkpoint, journal)
    for _ in range(3):
        serve_ready(new)

    assert ring.take_used() == [(head, 16) for head in heads]


def test_restart_after_an_enable_the_dead_process_never_read_starts_the_queue_at_0() -> None:
    """The driver enabled the queue on a used ring it did not zero, and the process died
    before it read the enable: its sync failed, so the frame is past the last the monitor
    knows was applied. Replayed to the registers only, it zeroed nothing: the restart took
    the stale idx (1) up, skipped the first request, and the driver took the old entry in
    that slot for its completion."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(dev.ram)
    dev.ram.write(ring.used, struct.pack("<HHII", 0, 1, 9, 7))  # a previous life's idx, entry
    assert Driver(dev).negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = dev.save()
    journal: list[Frame] = [lambda d: Driver(d).setup_queue(0, ring)]  # dev never applies it

    new = restart(fds, checkpoint, journal, confirmed=0)
    Driver(new).set_status(RUNNING)  # the driver goes on once the device is back
    heads = [ring.add([(*ring.buffer(16), True)]) for _ in range(3)]
    for _ in range(3):
        serve_ready(new)

    assert ring.take_used() == [(head, 16) for head in heads]


STALE_USED = struct.pack("<HHII", 1, 7, 9, 7)  # flags, idx, an entry: a previous life's
MASTER_OFF, MASTER_ON = 0x0002, 0x0006  # the command register: memory on, bus master off/on


def set_up_before_bus_master(ring: Ring) -> list[Frame]:
    """A driver that enables its queue and DRIVER_OK with Bus Master Enable clear."""
    return [
        lambda d: Driver(d).wr(COMMAND, MASTER_OFF, 2),
        lambda d: Driver(d).setup_queue(0, ring),
        lambda d: Driver(d).set_status(RUNNING),
    ]


def negotiated_on_a_stale_ring() -> tuple[dict[str, int], VirtioRng, Ring]:
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(dev.ram)
    dev.ram.write(ring.used, STALE_USED)
    assert Driver(dev).negotiate(F_VERSION_1) & FEATURES_OK
    return fds, dev, ring


def test_restart_after_an_enable_without_bus_master_starts_the_queue_at_0() -> None:
    """Enabled with Bus Master Enable clear, the used ring is not written (a DMA) until the
    bit is set: a crash before that left the driver's stale idx (7) in guest RAM, which the
    restart must not take the queue up from (requests skipped, old entries taken for
    completions). Set after the restart, the bit writes the ring and the chain is served."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    checkpoint = dev.save()
    journal = set_up_before_bus_master(ring)
    for frame in journal:
        frame(dev)
    head = ring.add([(*ring.buffer(16), True)])

    new = restart(fds, checkpoint, journal)
    serve_ready(new)
    untouched = dev.ram.read(ring.used, 12)
    Driver(new).wr(COMMAND, MASTER_ON, 2)
    serve_ready(new)

    assert (untouched, ring.take_used()) == (STALE_USED, [(head, 16)])


def test_restart_after_an_unconfirmed_enable_without_bus_master_writes_no_used_ring() -> None:
    """An enable past what the monitor knows was applied starts the queue at 0 and writes
    its used ring's header (as a live enable does): with Bus Master Enable clear that write
    is a DMA the function may not make, and waits for the bit, as a live enable's does."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    Driver(dev).wr(COMMAND, MASTER_OFF, 2)
    checkpoint = dev.save()
    journal: list[Frame] = [lambda d: Driver(d).setup_queue(0, ring)]  # dev never applies it

    new = restart(fds, checkpoint, journal, confirmed=0)
    untouched = dev.ram.read(ring.used, 12)
    Driver(new).set_status(RUNNING)
    head = ring.add([(*ring.buffer(16), True)])
    Driver(new).wr(COMMAND, MASTER_ON, 2)
    serve_ready(new)

    assert (untouched, ring.take_used()) == (STALE_USED, [(head, 16)])


def test_restart_from_a_checkpoint_of_a_queue_waiting_for_bus_master_starts_it_at_0() -> None:
    """The checkpoint itself holds the queue enabled without Bus Master Enable (at 0, its
    used ring unwritten): the restart does not take it up from the stale idx either."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    for frame in set_up_before_bus_master(ring):
        frame(dev)
    checkpoint = dev.save()
    head = ring.add([(*ring.buffer(16), True)])

    new = restart(fds, checkpoint, [])
    Driver(new).wr(COMMAND, MASTER_ON, 2)
    serve_ready(new)

    assert ring.take_used() == [(head, 16)]


@pytest.mark.parametrize("confirmed", [None, 0], ids=["confirmed", "unconfirmed"])
def test_restart_after_bus_master_set_keeps_what_the_dead_process_completed(
    confirmed: int | None,
) -> None:
    """The checkpoint holds the queue waiting for Bus Master Enable; the journal sets it, so
    the dead process wrote the used ring then and completed a chain (another vCPU saw it done
    and reused its buffer): the restart takes the queue up from guest RAM (1), not from 0
    (the used idx moved back, the chain served again into the reused buffer). Also where the
    dead process never answered the set's sync: its progress page says it wrote the ring."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    for frame in set_up_before_bus_master(ring):
        frame(dev)
    checkpoint = dev.save()
    gpa, size = ring.buffer(16)
    first = ring.add([(gpa, size, True)])
    journal: list[Frame] = [lambda d: Driver(d).wr(COMMAND, MASTER_ON, 2)]
    journal[0](dev)
    serve_ready(dev)
    done = ring.take_used()
    dev.ram.write(gpa, b"\x5a" * size)  # the guest reuses the buffer
    second = ring.add([(*ring.buffer(16), True)])

    new = restart(fds, checkpoint, journal, confirmed)
    seen = ring.used_idx()  # what another vCPU reads meanwhile
    serve_ready(new)

    assert (done, seen, ring.take_used()) == ([(first, 16)], 1, [(second, 16)])
    assert dev.ram.read(gpa, size) == b"\x5a" * size  # not served again


def wrote_an_older_ring(dev: VirtioRng) -> None:
    """A session before the driver's reset: queue 0 on another ring, with Bus Master Enable,
    so the device wrote that ring's used ring (and said so in its progress page); then the
    reset, and the features again with the bit clear."""
    Driver(dev).setup_queue(0, Ring(dev.ram, base=0x20000))
    Driver(dev).set_status(0)
    assert Driver(dev).negotiate(F_VERSION_1) & FEATURES_OK
    Driver(dev).wr(COMMAND, MASTER_OFF, 2)


@pytest.mark.parametrize("history", [None, wrote_an_older_ring], ids=["new", "older-ring"])
def test_restart_after_an_unconfirmed_bus_master_set_writes_the_used_ring_it_was_to(
    history: Callable[[VirtioRng], None] | None,
) -> None:
    """The Bus Master Enable that was to write the waiting used ring is past what the monitor
    knows was applied: the dead process may never have written it, so the restart does (at
    0, not at the stale idx 7) and serves the chain. Also where the device wrote an older
    ring of queue 0's before the driver's reset: what its progress page said of that ring is
    not this one's."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    if history is not None:
        history(dev)
    for frame in set_up_before_bus_master(ring):
        frame(dev)
    checkpoint = dev.save()
    head = ring.add([(*ring.buffer(16), True)])
    journal: list[Frame] = [lambda d: Driver(d).wr(COMMAND, MASTER_ON, 2)]  # never applied

    new = restart(fds, checkpoint, journal, confirmed=0)
    serve_ready(new)

    assert ring.take_used() == [(head, 16)]


def test_restart_of_a_restart_that_never_set_bus_master_starts_the_queue_at_0() -> None:
    """The enable of the new ring never reached the dead process, so nothing of it said the
    older ring's header was not this one's; its restart took the enable up (without Bus
    Master Enable: nothing written) and died in turn before it applied the set of the bit.
    The next restart starts the queue at 0, not at the stale 7."""
    fds, dev, ring = negotiated_on_a_stale_ring()
    wrote_an_older_ring(dev)
    checkpoint = dev.save()
    journal: list[Frame] = [
        lambda d: Driver(d).setup_queue(0, ring),  # dev never applies it
        lambda d: Driver(d).set_status(RUNNING),
        lambda d: Driver(d).wr(COMMAND, MASTER_ON, 2),
    ]
    first = restart(fds, checkpoint, journal[:1], confirmed=0)
    journal[1](first)  # its sync answered; the next frame's is not, and first dies
    head = ring.add([(*ring.buffer(16), True)])

    second = restart(fds, checkpoint, journal, confirmed=2)
    serve_ready(second)

    assert ring.take_used() == [(head, 16)]


def test_restart_after_a_confirmed_enable_keeps_what_the_dead_process_completed() -> None:
    """The other side: an enable whose sync was answered was applied (its zeroing done), and
    the chains completed since are in the used ring: started at 0 again, the restart would do
    them twice and move the driver's used idx back."""
    fds = host_fds("virtio-rng")
    dev = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(dev.ram)
    assert Driver(dev).negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = dev.save()
    journal: list[Frame] = [
        lambda d: Driver(d).setup_queue(0, ring),
        lambda d: Driver(d).set_status(RUNNING),
    ]
    for frame in journal:
        frame(dev)
    heads = [ring.add([(*ring.buffer(16), True)]) for _ in range(2)]
    die_after_push(dev)

    new = restart(fds, checkpoint, journal, confirmed=2)
    serve_ready(new)

    assert (ring.take_used(), ring.used_idx()) == ([(head, 16) for head in heads], 2)


# -- the monitor's side of it: which replayed frames the dead process applied ----------------
class Gone(Dead):
    def kill(self) -> None:
        pass


class AppliedChannel:
    """A device process's channel: each posted frame applied to a real VirtioRng at once."""

    connection_ended = False

    def __init__(self, dev: VirtioRng) -> None:
        self.dev, self.mirror = dev, RegisterMirror(())

    def post_many(self, frames: list[bytes]) -> None:
        for frame in frames:
            runtime._apply(self.dev, wire.decode_access(frame, VirtioRng.WINDOW))

    def sync(self, drain: bool = False) -> None:
        pass

    def drain_events(self, limited: bool = True) -> None:
        pass

    def ping(self, timeout_ms: int) -> bool:
        return True

    def close(self) -> None:
        pass


class SlotBus:
    """What the Bus does with a driver's writes: posted, common configuration synced
    (monitor/pci/function.py)."""

    def __init__(self, slot: DeviceSlot, dev: VirtioRng) -> None:
        self.slot, self.ctx, self.syncs = slot, dev.ctx, list[bool]()

    def write(self, offset: int, data: bytes) -> None:
        self.slot.write(offset, data)
        if BAR0 <= offset < BAR0 + 0x40:
            self.syncs.append(self.slot.sync())


def restarted_from(fds: dict[str, int], checkpoint: object, resume: dict) -> VirtioRng:
    """runtime.run's steps, from a resume the slot made: restore, replay, after_restart."""
    dev = VirtioRng.restore(prepared("virtio-rng", fds, restarted=True), checkpoint)
    sent = zip(resume["replay"], resume["replay_wall_ns"], strict=True)
    frames = [(base64.b64decode(frame), wall_ns) for frame, wall_ns in sent]
    runtime.replay(dev, frames, runtime.Checkpoints(dev, resume["applied"]), resume["confirmed"])
    dev.after_restart()
    return dev


def test_a_restart_after_late_set_up_writes_keeps_what_their_process_completed(
    tmp_path, monkeypatch
) -> None:
    """A restart outlasts RESTART_WAIT_MS while the driver sets the queue up: each write is
    kept and goes to the new process right after its READY; each sync said False, and the
    driver went on (DRIVER_OK). The new process serves the queue from the ioeventfd alone, so
    no sync confirms the late enable. At its crash the next restart took that enable for one
    the dead process may never have applied, zeroed the used ring under the driver, and did
    the completed chains again, into buffers the guest had reused."""
    monkeypatch.setattr(slot_module, "RESTART_WAIT_MS", 1)
    fds = host_fds("virtio-rng")
    first = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(first.ram)
    assert Driver(first).negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = first.save()  # the journal is empty from here
    slot = DeviceSlot(
        Spawn("rng0", "virtio-rng", VirtioRng.WINDOW), tmp_path, refuse, lambda s, why: True
    )
    slot.channel, slot.state = AppliedChannel(first), SlotState.LIVE  # type: ignore[assignment]
    slot.fail("crashed")  # restarting
    started: list[VirtioRng] = []
    bus = SlotBus(slot, first)

    def slow_start(resume: dict[str, object]) -> None:
        Driver(bus).setup_queue(0, ring)  # each write journaled late
        Driver(bus).set_status(RUNNING)
        started.append(restarted_from(fds, checkpoint, resume))
        slot.process, slot.channel = Gone(), AppliedChannel(started[0])  # type: ignore[assignment]

    monkeypatch.setattr(slot, "start", slow_start)
    monkeypatch.setattr(slot, "_wait_restarted", lambda: slot._now_live(slot.process))
    slot.restart()
    (second,) = started
    heads = [ring.add([(*ring.buffer(16), True)]) for _ in range(2)]
    Driver(second).kick()
    serve_ready(second)
    assert (not any(bus.syncs), ring.take_used()) == (True, [(h, 16) for h in heads])
    first.ram.write(ring.heap - 32, b"\x5a" * 32)  # the guest reuses those buffers

    slot.fail("crashed again")  # before any checkpoint or sync
    with slot._lock:
        third = restarted_from(fds, checkpoint, slot._resume_locked())
    idx = ring.used_idx()
    for _ in range(3):
        serve_ready(third)

    assert (idx, first.ram.read(ring.heap - 32, 32)) == (2, b"\x5a" * 32)


class DiesBeforeItsSync(AppliedChannel):
    """The restarted process: it applies the late frames it is posted (its DRIVER_OK runs
    the queue at once), then dies before it answers the sync after them."""

    def sync(self, drain: bool = False) -> None:
        ring = self.dev.rings[0]
        if ring is not None and ring.used_idx:  # it served requests, then died
            raise ChannelError("closed its end of the channel")


class ServesThenDiesBeforeItsSync(AppliedChannel):
    """A device process that applies what it is posted, serves what those frames kicked (its
    event loop runs the notify fds before the sync frame behind them), and dies before it
    answers the sync."""

    def sync(self, drain: bool = False) -> None:
        serve_ready(self.dev)
        raise ChannelError("closed its end of the channel")


def test_a_bus_master_set_whose_sync_dies_keeps_what_its_process_completed(tmp_path) -> None:
    """A driver that enables its queue and DRIVER_OK before Bus Master Enable, then sets
    it (a config space write: synced). The process writes the used ring, serves the chain
    the set kicked, and dies before it answers the sync; another vCPU saw the chain done
    and reused its buffer. The restart took the set for one the dead process may never
    have applied, zeroed the used ring under the driver and served the chain again."""
    fds, first, ring = negotiated_on_a_stale_ring()
    for frame in set_up_before_bus_master(ring):
        frame(first)
    checkpoint = first.save()  # the journal is empty from here
    slot = DeviceSlot(
        Spawn("rng0", "virtio-rng", VirtioRng.WINDOW), tmp_path, refuse, lambda s, why: True
    )
    channel = ServesThenDiesBeforeItsSync(first)
    slot.channel, slot.state = channel, SlotState.LIVE  # type: ignore[assignment]
    gpa, size = ring.buffer(16)
    ring.add([(gpa, size, True)])
    slot.write(COMMAND, MASTER_ON.to_bytes(2, "little"))
    assert (slot.sync(), len(ring.take_used())) == (False, 1)
    first.ram.write(gpa, b"\x5a" * size)  # the guest reuses the buffer

    with slot._lock:
        second = restarted_from(fds, checkpoint, slot._resume_locked())
    for _ in range(3):
        serve_ready(second)

    assert (ring.used_idx(), first.ram.read(gpa, size)) == (1, b"\x5a" * size)


def test_a_late_set_up_whose_sync_dies_keeps_what_its_process_completed(
    tmp_path, monkeypatch
) -> None:
    """A restart outlasts RESTART_WAIT_MS while the driver sets the queue up and makes two
    requests available: its enable and DRIVER_OK go to the new process after its READY, in
    one post, and one sync. The process applies them, serves the two requests on DRIVER_OK
    (the driver sees them done and reuses their buffers), and dies before it answers the
    sync. The next restart took the enable for one the dead process may never have applied,
    zeroed the used ring under the driver, and served the two requests again, into buffers
    the guest had reused."""
    monkeypatch.setattr(slot_module, "RESTART_WAIT_MS", 1)
    fds = host_fds("virtio-rng")
    first = VirtioRng(prepared("virtio-rng", fds))
    ring = Ring(first.ram)
    assert Driver(first).negotiate(F_VERSION_1) & FEATURES_OK
    checkpoint = first.save()
    slot = DeviceSlot(
        Spawn("rng0", "virtio-rng", VirtioRng.WINDOW), tmp_path, refuse, lambda s, why: True
    )
    slot.channel, slot.state = AppliedChannel(first), SlotState.LIVE  # type: ignore[assignment]
    slot.fail("crashed")  # restarting
    bus = SlotBus(slot, first)
    started: list[VirtioRng] = []

    def slow_start(resume: dict[str, object]) -> None:
        Driver(bus).setup_queue(0, ring)  # each write journaled late
        Driver(bus).set_status(RUNNING)
        for _ in range(2):  # the driver goes on: two requests (their kicks wait in notify0)
            ring.add([(*ring.buffer(16), True)])
        started.append(restarted_from(fds, checkpoint, resume))
        slot.process, slot.channel = Gone(), DiesBeforeItsSync(started[0])  # type: ignore[assignment]

    monkeypatch.setattr(slot, "start", slow_start)
    monkeypatch.setattr(slot, "_wait_restarted", lambda: slot._now_live(slot.process))
    slot.restart()  # READY; the late frames posted, applied, served; the sync dies
    done = ring.take_used()
    assert (len(done), slot.restarting) == (2, True)
    first.ram.write(ring.heap - 32, b"\x5a" * 32)  # the guest reuses those buffers

    with slot._lock:
        third = restarted_from(fds, checkpoint, slot._resume_locked())
    for _ in range(3):
        serve_ready(third)

    assert (ring.used_idx(), first.ram.read(ring.heap - 32, 32)) == (2, b"\x5a" * 32)
