"""The device contract: a pure register state machine plus its saved state.

A device model never touches sockets, processes or the channel: the runtime
(runtime.py) feeds it accesses and host input, and it talks back only through
its DeviceContext (an irq trigger, a bounded output buffer).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, Self, TypeVar, runtime_checkable

from splitvmm.devprocs.faults import RequestFaults
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.errors import StateError
from splitvmm.protocol import codec, control, events, schema, wire
from splitvmm.protocol.models import MODELS, module_name
from splitvmm.record import Struct, asdict, field


class Trigger(Protocol):
    def trigger(self) -> None: ...


class NoLine:
    """The `irq` of a model whose transport has no ISA line (a PCI function signals its
    MSI-X and INTx eventfds itself): there is nothing to trigger."""

    def trigger(self) -> None:
        return None  # deliberately empty: no port-window line to pulse


class DeviceState(Struct, frozen=True, kw_only=True):
    """Plain data (ints, bools, bytes, str, tuples, records; protocol/schema.py types, with
    their bounds): untrusted when read back. A field change bumps VERSION and adds the step
    from the old version to UPGRADES (it gets and gives the JSON fields: bytes are base64)."""

    VERSION: ClassVar[int] = 1
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {}

    @classmethod
    def migrate(cls, version: int, fields: dict[str, object]) -> dict[str, object]:
        """Fields of `version` as fields of VERSION: UPGRADES, one step at a time."""
        return schema.upgrade(cls, version, fields, what=cls.__name__, error=StateError)


class Counters(Struct):
    """Guest mistakes we tolerate but count (bad sizes, unknown registers, overruns)."""

    bad_access: int = 0
    rx_overrun: int = 0
    tx_dropped: int = 0  # output written with no room for it (a driver that did not wait)


CheckpointProgress = tuple[int, int]  # (frames applied, output bytes emitted)
T = TypeVar("T")


class DeviceEvents:
    """What a device says to the monitor unasked (protocol/events.py): its state, an error
    for the operator, a request for an interrupt route, its room for host input. Queued
    until the runtime connects it to the channel after READY, then sent as they come, never
    blocking the device: a newer state (or MIRROR, or room) supersedes one the channel could
    not take yet, as a vector's newer route request supersedes its older one, and reports
    past MAX_PENDING are dropped and counted.

    A state the monitor has already (publish_state) goes as a CHECKPOINT frame (wire.py), 24
    bytes instead of a JSON document (~20 us to encode here, ~45 to check in the monitor,
    more on a vCPU's thread): the serial device takes a checkpoint every 32 or 256 frames
    (devprocs/runtime.py), and while a guest writes to a line that keeps up its state is
    the same each time."""

    MAX_PENDING = 16
    # Kinds of frame of which only the newest matters, sent in this order: the published
    # state, the register mirror (runtime.MirrorPublisher), the room for host input
    # (runtime.InputRoomReporter), a stall (never dropped: the VM must pause for it).
    SUPERSEDING = ("state", "mirror", "room", "stall")

    def __init__(self) -> None:
        self._send: Callable[[bytes], bool] | None = None
        # The newest frame of each superseding kind not sent yet (SUPERSEDING: its order)
        self._latest: dict[str, bytes] = {}
        # The state the last state document sent carried (None: none yet), the state the
        # queued one carries, and whether the queued state frame is a document at all.
        self._state_sent: DeviceState | None = None
        self._state_queued: DeviceState | None = None
        self._document_queued = False
        self._pending: list[bytes] = []
        self.dropped = 0
        # vector -> its newest route request not sent yet: the one the model waits for (an
        # older one's answer is no use to it: virtio/msix.py). One per vector, so a guest
        # rewriting an unmasked MSI-X entry in a loop while the channel is full loses no
        # vector its route (a request dropped past MAX_PENDING left it unrouted for good).
        self._routes: dict[int, bytes] = {}
        self._next_route = 0
        # (frames applied, output bytes emitted): set by the runtime, which counts them; each
        # publish then is a checkpoint a restart can start from (protocol/events.py).
        self.progress: Callable[[], CheckpointProgress] | None = None
        # What the model does when a route answer arrives (a PCI function signals the MSI-X
        # vectors that waited for it).
        self.on_route_done: Callable[[int, bool, str], None] | None = None

    def publish_state(self, model: str, state: DeviceState) -> None:
        """Publish a `model` device's `state` (with the runtime's progress, if it counts):
        only the progress if the monitor has it already, that is if the last document sent
        carried it. (A newer document the channel could not take yet is superseded then: the
        monitor's last is that one.)"""
        progress = self.progress() if self.progress is not None else None
        if progress is not None and state == self._state_sent:
            self._document_queued = False
            self._supersede("state", wire.encode_checkpoint(*progress))
            return
        self._state_queued, self._document_queued = state, True
        document = codec.state_document(model, state)
        self._supersede("state", events.encode_publish(document, progress))

    def publish_room(self, frame: bytes) -> None:
        """An input_room frame; a newer one supersedes one not sent: each says all the
        monitor needs."""
        self._supersede("room", frame)

    def publish_mirror(self, frame: bytes) -> None:
        """A MIRROR frame; a newer one supersedes one not sent."""
        self._supersede("mirror", frame)

    @property
    def mirror_pending(self) -> bool:
        """Whether a MIRROR frame waits for the channel to take it."""
        return "mirror" in self._latest

    def _supersede(self, kind: str, frame: bytes) -> None:
        self._latest[kind] = frame
        self.flush()

    def report(self, message: str) -> None:
        self._queue(events.encode_report(message))

    def stall(self, message: str) -> None:
        """Ask the monitor to pause the VM: a request waits for room on the host."""
        self._supersede("stall", events.encode_stall(message))

    def request_msi(self, vector: int, address: int, data: int) -> int:
        """Ask for MSI-X `vector`'s route to (address, data); its answer goes to
        on_route_done. Nothing of it is kept here once sent (a guest rewriting a table entry
        in a loop makes a request and an answer each time), and only the newest of a vector
        until then. Ids wrap within what the monitor takes (control.MAX_ROUTE_ID): past it,
        a guest that had rewritten an entry 2**31 times had the device failed for a frame
        the monitor refuses. A wrapped id meets no older one still asked for (msix.py keeps
        one a vector, and the monitor answers each)."""
        self._next_route = self._next_route % control.MAX_ROUTE_ID + 1
        self._routes[vector] = events.encode_msi(self._next_route, vector, address, data)
        self.flush()
        return self._next_route

    def route_done(self, route_id: int, ok: bool, reason: str) -> None:
        if self.on_route_done is not None:
            self.on_route_done(route_id, ok, reason)

    def connect(self, send: Callable[[bytes], bool]) -> None:
        """`send(frame)` -> False when the channel cannot take it now (it never blocks)."""
        self._send = send
        self.flush()

    def flush(self) -> None:
        if self._send is None:
            return
        for kind in self.SUPERSEDING:
            frame = self._latest.get(kind)
            if frame is not None and self._send(frame):
                del self._latest[kind]
                if kind == "state" and self._document_queued:
                    self._state_sent = self._state_queued
        for vector, frame in list(self._routes.items()):
            if not self._send(frame):
                break
            del self._routes[vector]
        while self._pending and self._send(self._pending[0]):
            self._pending.pop(0)

    def flush_waiting(self, send: Callable[[bytes], None]) -> None:
        """Everything queued, through `send`, which waits for room: what must be with the
        monitor before the frame the caller sends next (a checkpoint before its reply)."""
        if self._send is None:
            return  # not connected yet: nothing has been sent, the order holds as it is

        def sent(frame: bytes) -> bool:
            send(frame)
            return True

        waiting, self._send = self._send, sent
        try:
            self.flush()
        finally:
            self._send = waiting

    def _queue(self, frame: bytes) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(frame)
        self.flush()


def _always_waiting() -> bool:
    """A model driven without an event loop (tests) cannot know: it assumes work waits."""
    return True


class DeviceContext(Struct):
    """Host resources handed to a device; never part of its state."""

    irq: Trigger = field(default_factory=NoLine)  # a port window's ISA line (role "irq")
    out: BoundedOutput = field(default_factory=BoundedOutput)
    counters: Counters = field(default_factory=Counters)
    fds: Mapping[str, int] = field(default_factory=dict)  # role -> fd, as the spec gave them
    prepared: dict[str, object] = field(default_factory=dict)  # what Device.setup() made
    events: DeviceEvents = field(default_factory=DeviceEvents)  # what it says unasked
    # DeviceSpec.transport: where a PCI function sits ({"pci", "intx_gsi", "ram"}); trusted
    transport: Mapping[str, object] = field(default_factory=dict)
    # DeviceSpec.options: the model's config options (config.py checked them); trusted
    options: Mapping[str, object] = field(default_factory=dict)
    # DeviceSpec.resume is set: this process replaces one that crashed (a virtio device
    # then takes its queues up from the used rings in guest memory)
    restarted: bool = False
    # A restart re-applies the dead process's journal (runtime.replay): registers only, no
    # guest queue touched, until the model's after_restart() takes them up
    replaying: bool = False
    # While replaying: the host's wall clock (CLOCK_REALTIME ns) when the monitor sent the
    # frame being re-applied. A model that keeps time reads its clock as of then (rtc.py).
    replay_wall_ns: int | None = None
    # While replaying: the frame is past the last one the monitor knows the dead process
    # applied (a sync or a read it answered, its READY): it may have died before reading it
    # (a virtio queue enable whose zeroing of the used ring was then never done: pci.py
    # after_restart)
    replay_unconfirmed: bool = False
    # While replaying: the monitor sent this frame before it received the checkpoint the
    # restart starts from, so the dead process applied it after saving that checkpoint
    # (slot.py "posted")
    replay_posted: bool = False
    # Whether the event loop has work ready besides what the model is doing (a frame on the
    # channel, another fd of the model's, a deadline passed): a model busy for long asks
    # before it goes on (virtio's BUDGET_NS). The event loop sets it (EventLoop.waiting).
    waiting: Callable[[], bool] = _always_waiting

    def made(self, key: str, kind: type[T], what: str) -> T:
        """What the model's setup() put in `prepared` under `key`, of type `kind`; TypeError
        naming `what` when setup() did not run (or put something else there)."""
        value = self.prepared.get(key)
        if not isinstance(value, kind):
            raise TypeError(f"{what} (setup() did not run)")
        return value


class Device(abc.ABC):
    """What every model is, whatever its transport: a named state machine with a saved state.

    The transport is a second, small interface (RegisterDevice: a flat window of registers,
    a port window's or a PCI function's), and what only some models do is an optional protocol
    the runtime looks for (ConsoleInput, OutputProducer, TimedEvents, EventSources): no
    model fills in methods it has no use for."""

    NAME: ClassVar[str]  # model name: module, policy, config `model` and log name
    State: ClassVar[type[DeviceState]]
    # fd roles whose whole file the model maps (guest RAM, for a virtio device): their sizes
    # add to the address space its process may use (runtime.address_space_limit).
    MAPPED_FDS: ClassVar[tuple[str, ...]] = ()
    # The io-error fault of a model that serves requests (ModelDescriptor.request_faults),
    # which it asks of each request; None: it serves none (devprocs/faults.py)
    request_faults: RequestFaults | None = None

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    @classmethod
    def setup(cls, ctx: DeviceContext) -> None:
        """Runs before the sandbox, once per process: what the model can only do then (map
        guest RAM from ctx.fds) goes into ctx.prepared. It starts no thread: unshare() of the
        sandbox's user namespace fails in a process with two, and the device's filter allows
        none of the calls a thread makes. No guest data is read here: a saved state arrives
        only after the sandbox is up."""
        return None  # deliberately empty: most models need nothing before the sandbox

    @classmethod
    def setup_sandboxed(cls, ctx: DeviceContext) -> None:
        """Runs in the process that serves, once it is inside the sandbox's namespaces and
        Landlock domain, before its rlimits and seccomp filter: what belongs to that address
        space and does not survive the sandbox's fork (an AIO context), made with a call
        that the filter then refuses. Into ctx.prepared, as setup()'s."""
        return None  # deliberately empty: most models make everything in setup()

    @classmethod
    def from_options(cls, ctx: DeviceContext, options: Mapping[str, object]) -> Self:
        """A fresh device with its config options (config.py checked their names and types;
        a model that takes any checks their values and raises ConfigError)."""
        return cls(ctx)

    def check_options(self, options: Mapping[str, object]) -> None:
        """A restored device (a snapshot's, or a crash restart's) against the config options
        it was started with: ConfigError for a value from_options() would refuse, or for a
        guest-visible one its state contradicts (the guest keeps the device it had; a value
        taken silently from the state would leave the operator's config a lie). A model
        whose options the guest never sees has nothing to check."""
        return None  # deliberately empty: most models have no guest-visible option

    def quiesce(self) -> None:
        """Snapshot step 2: stop taking work from guest queues and finish what is in flight,
        or record it in the state so that restore() re-runs it. Until resume(), the device
        still answers register accesses. A register-only device has nothing to do."""
        return None  # deliberately empty: optional for devices without queues

    def resume(self) -> None:
        """After a snapshot: take work from the guest's queues again."""
        return None  # deliberately empty: optional for devices without queues

    def retry(self) -> None:
        """The VM resumes after this device's stall (protocol/events.py): take the request
        that stalled up again."""
        return None  # deliberately empty: only a model that stalls has a request to retry

    def harvest_dirty(self) -> None:
        """A live snapshot's pass begins (monitor/dirtylog.py): move the marks of the dirty
        bitmap of the guest RAM it writes, if it has one, into the bitmap's harvest, and clear
        it. Called between requests, when none is in flight: every write from now on is marked
        anew."""
        return None  # deliberately empty: a model without guest RAM marks nothing

    def link(self, up: bool | None) -> bool | None:
        """`ctl link` (ModelDescriptor.link): take the device's network link up or down (None:
        leave it as it is); whether it is up now. None: the model has no link."""
        return None  # deliberately empty: only a network model has a link

    def after_restart(self) -> None:
        """A crash restart's last step, once the dead process's journal is replayed (which
        reaches the registers only: ctx.replaying): take up the guest's queues from where
        the dead process left them in guest memory."""
        return None  # deliberately empty: optional for devices without queues

    def stats(self) -> dict[str, int]:
        """Counters over this process's life, by name (the control op `stats`, shown by
        `ctl devices --json`): the guest mistakes every model counts; a model adds its own
        (at most control.MAX_COUNTERS names of control.COUNTER_NAME)."""
        return asdict(self.ctx.counters)

    @abc.abstractmethod
    def save(self) -> DeviceState:
        """The device's state; called only between quiesce() and resume()."""

    @classmethod
    @abc.abstractmethod
    def restore(cls, ctx: DeviceContext, state: Any) -> Self: ...


class RegisterDevice(Device):
    """A flat window of registers on the device channel: a port window's x86 ports
    (protocol.models.PortWindow), or a PCI function's configuration space and BARs, one
    after the other (protocol.models.PciFunction.regions())."""

    WINDOW: ClassVar[int]  # bytes of the window the device decodes (its transport's size)

    @abc.abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """len(result) == size; the runtime guarantees offset + size <= WINDOW."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...


# -- what only some models do: the runtime checks for each ----------------------------------------
@runtime_checkable
class ConsoleInput(Protocol):
    def host_input(self, data: bytes) -> None:
        """Bytes from the host side of a console device (keyboard, socket)."""

    def input_buffer(self) -> tuple[int, int] | None:
        """(bytes of host input waiting for the guest, how many the model holds now): the
        runtime tells the monitor the room left (protocol/events.py input_room), and the
        monitor sends no more than that. None: the model's host input does not come
        through the channel (a `unix:` peer's, which the model reads itself)."""


@runtime_checkable
class OutputProducer(Protocol):
    def output_room(self) -> None:
        """The output line took buffered bytes (ctx.out): there is room again."""


@runtime_checkable
class TimedEvents(Protocol):
    def next_deadline(self) -> float | None:
        """When the model next needs tick(), on time.monotonic()'s clock; None: not until
        an access changes that."""

    def tick(self, now: float) -> None:
        """The deadline passed (`now` is time.monotonic()): do what was due."""


@runtime_checkable
class MirroredRegisters(Protocol):
    def quiet_reads(self) -> frozenset[int]:
        """Offsets whose one-byte read, in any state, changes no value mirror() returns, nor
        its credit: the runtime answers such a read without asking mirror() again
        (runtime.MirrorPublisher applied_read). Asked once; the model's promise, which its
        tests check."""

    def mirror(self) -> wire.Mirror:
        """What reads of the registers its descriptor mirrors (ModelDescriptor.mirrored, in
        order) return now, None for one whose read would have a side effect now; and the
        writes that will leave them all as they are (the credit: a promise, which the model
        must keep). The stamp is the runtime's to set (monitor/mirror.py)."""


class Source(Struct, frozen=True):
    """An fd the event loop watches for the model: readable -> on_readable()."""

    fd: int
    on_readable: Callable[[], None]


@runtime_checkable
class EventSources(Protocol):
    def event_sources(self) -> Sequence[Source]:
        """The fds to watch now (an ioeventfd the guest kicks, a backend's fd); asked again
        after every event, so a model may stop watching (back-pressure) and start again."""


REGISTRY: dict[str, type[Device]] = {}
M = TypeVar("M", bound=type[RegisterDevice])


def register(cls: M) -> M:
    """Register a model; it must match its descriptor (protocol/models.py), which is all the
    monitor knows of it: a model and its descriptor that disagree fail at import, in tests
    (what only an instance shows, its request_faults, tests/conformance checks)."""
    descriptor = MODELS.get(cls.NAME)
    if descriptor is None:
        raise TypeError(f"{cls.__name__}: no descriptor {cls.NAME!r} in protocol.models.MODELS")
    if getattr(cls, "WINDOW", None) != descriptor.transport.size:
        raise TypeError(f"{cls.__name__}: WINDOW {cls.WINDOW} != its descriptor's window")
    if cls.State.VERSION != descriptor.state_version:
        raise TypeError(f"{cls.__name__}: State.VERSION != its descriptor's state_version")
    if descriptor.link != (cls.link is not Device.link):  # a `ctl link` the model would fail
        raise TypeError(f"{cls.__name__}: its descriptor's link and its link() disagree")
    if descriptor.mirrored and not issubclass(cls, MirroredRegisters):
        raise TypeError(f"{cls.__name__}: its descriptor mirrors registers; it has no mirror()")
    REGISTRY[cls.NAME] = cls
    return cls


def load_model(name: str) -> type[Device]:
    """The model class for a descriptor name: its module is splitvmm.devprocs.<name>, with
    "_" for "-" (STYLE 6: the name is the key everywhere). Names come from the monitor's spec and
    must be a descriptor's, never anything else."""
    if name not in MODELS:
        raise StateError(f"unknown device model {name!r}")
    if name not in REGISTRY:
        importlib.import_module(f"splitvmm.devprocs.{module_name(name)}")
    return REGISTRY[name]


def load_all_models() -> dict[str, type[Device]]:
    """Every model with a descriptor, each one's module imported (tests: what a zygote holds
    once it has forked a device of every model; it imports none before: sandbox/zygote.py)."""
    return {name: load_model(name) for name in MODELS}
