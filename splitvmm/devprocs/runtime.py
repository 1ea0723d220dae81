"""A device process: adopt fds, run the model's set-up, enter the sandbox, serve.

In this order: the spec's fds become the device's context; the model's setup() runs
(before the sandbox: it may map guest RAM or open what it needs; it starts no thread: a
device process has one, which the sandbox's namespaces need and its filter keeps);
the sandbox is entered (the model's setup_sandboxed() runs inside it, before seccomp);
only then is any guest data read (a saved state, which the model's restore()
validates); READY; then the event loop (eventloop.py) serves the channel and whatever the
model waits on, one event at a time.

Checkpoints (crash restart, monitor/slot.py): the runtime counts the frames it applies
(reads, writes, host input) and publishes the device's state with that count and its
output's `emitted` count every PUBLISH_EVERY frames (PUBLISH_EVERY_COUNTED where the
monitor counts the output), always after the reply to the last frame it covers. A process
started after a crash gets the last checkpoint the monitor received, the frames after it
(re-applied before READY, read replies thrown away) and how many output bytes the dead
process sent past the checkpoint (dropped unsent).

Register mirror (monitor/mirror.py): a model whose descriptor mirrors registers has its
values published (MirrorPublisher) stamped with the frames applied: before the reply to
every read (or, when the read left the values and credit as last published, in the reply:
RESTAMPED, no MIRROR frame), after a frame or host event that changed them or left the
monitor's copy without credit, and before the reply to a resume (the monitor drops its copy
on quiesce).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable

from splitvmm.devprocs.base import (
    ConsoleInput,
    Device,
    DeviceContext,
    DeviceEvents,
    MirroredRegisters,
    OutputProducer,
    RegisterDevice,
    load_model,
)
from splitvmm.devprocs.channel import Channel, ChannelClosed
from splitvmm.devprocs.eventloop import EventLoop
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.errors import ConfigError, ProtocolError, SplitvmmError, StateError
from splitvmm.fdline import FdLine
from splitvmm.native import confine
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol import codec, control, events, faults, schema, wire
from splitvmm.protocol.models import MODELS, OUTPUT_SHARED, FdKind
from splitvmm.protocol.polling import max_poll_ns
from splitvmm.protocol.spec import DeviceSpec, another_user, spare_path
from splitvmm.record import replace
from splitvmm.sandbox import device as sandbox

log = logging.getLogger("splitvmm.dev")


# The address space (RLIMIT_AS) of a device process beyond what it maps of its fds. The
# serial device measured VmPeak 170 MiB, VmSize 106 MiB and RSS 18 MiB while serving, when
# libzmq's two threads were in it (an 8 MiB stack each and a 64 MiB malloc arena); CPython and
# its modules are ~26 MiB. A device has one thread now: the bound is kept, for a model's
# buffers.
RUNTIME_ADDRESS_SPACE = 256 << 20
MAX_REPLAY = 4096  # the monitor's journal holds no more (monitor/slot.py MAX_JOURNAL)
MAX_WALL_NS = 1 << 63  # a replayed frame's send time: CLOCK_REALTIME ns, as a signed 64-bit


def address_space_limit(spec: DeviceSpec) -> int:
    """RLIMIT_AS for this device: the runtime's own, plus every fd its model maps whole
    (a virtio device maps guest RAM: RAM size + the runtime's share)."""
    model = load_model(spec.model)
    mapped = sum(os.fstat(spec.fds[role]).st_size for role in model.MAPPED_FDS)
    return RUNTIME_ADDRESS_SPACE + mapped


def build_context(spec: DeviceSpec) -> DeviceContext:
    """The device's host resources from its spec: a port window's ISA line (role "irq")
    when it has one, its output, the transport's placement and its other fds by role."""
    ctx = DeviceContext(
        fds=dict(spec.fds),
        transport=dict(spec.transport or {}),
        options=dict(spec.options),
        restarted=spec.resume is not None,
    )
    if "irq" in spec.fds:
        ctx.irq = EventFd(spec.fds["irq"])
    if "out" in spec.fds:
        shared = ctx.transport.get(OUTPUT_SHARED) is True
        ctx.out = BoundedOutput(FdLine(spec.fds["out"], shared=shared))
    return ctx


def prepare_model(name: str) -> type[Device]:
    """Load model `name` in a zygote (sandbox/zygote.py), with what each of its devices
    would otherwise do first that depends on no spec: the decoding plans of a saved state
    (build_device) and the model's seccomp policy, read and parsed (sandbox/device.py). The
    devices it forks inherit them; a device exec'd without a zygote does both itself. About
    1.2 ms of CPU less for each device at start, where a restore's devices start together
    on this host's two busy cores (bench/snapshot.py). The zygote calls it again at each
    fork of the model: what was done is not done again."""
    model = load_model(name)
    schema.prepare(codec.StateDocument, model.State)
    # A policy that cannot be read here is left to each device, which then fails at start
    # with its own words, as one exec'd does: this only saves work, and changes no outcome.
    with contextlib.suppress(SplitvmmError):
        sandbox.preload_policy(name)
    return model


def build_device(spec: DeviceSpec, ctx: DeviceContext) -> Device:
    """The model, fresh or restored from the spec's state. A saved state is untrusted (a
    snapshot file), so this runs inside the sandbox and restore() validates every field."""
    model = load_model(spec.model)
    if spec.state is None:
        return model.from_options(ctx, spec.options)
    device = model.restore(ctx, codec.state_from_document(spec.model, model.State, spec.state))
    device.check_options(spec.options)  # ConfigError: refused, naming the option
    return device


REFUSAL_WAIT_MS = 2000  # at most this long for the monitor to take why we cannot start


def _refuse(sock: Channel, message: str) -> None:
    """Tell the monitor why we cannot start (instead of READY), then exit."""
    with contextlib.suppress(ChannelClosed):  # a monitor that is gone takes no reason
        sock.send(control.encode({"op": "error", "seq": 0, "message": message[:200]}))
        # Then the monitor ends us (it ends a device that failed), having read the reason
        # before it learns of any exit; one that is gone leaves us to exit after
        # REFUSAL_WAIT_MS.
        sock.wait(REFUSAL_WAIT_MS)
    os._exit(2)


def _serve_control(
    device: Device,
    sock: Channel,
    buf: bytes,
    injector: FaultInjector,
    mirrors: MirrorPublisher | None = None,
    checkpoints: Checkpoints | None = None,
) -> None:
    """quiesce / save / resume / retry / ping / stats / harvest_dirty / fault / link, in the
    device's own order. Every access sent before the request was applied already: the
    channel is ordered. While quiesced the output buffer is held: what it holds is part of
    the state a snapshot saves.
    `mirrors`: the model's register mirror, published anew after a resume or a fault armed
    (MirrorPublisher). `checkpoints`: what publishes a link's change before its reply, so
    that a crash restart after the operator was told keeps the link as told."""
    msg = control.decode(buf)
    if msg["op"] == "route_done":  # the monitor's answer to a route request: no reply
        device.ctx.events.route_done(*events.decode_route_done(msg))
        return
    op, seq = msg["op"], msg["seq"]
    if op == "fault":  # crash testing: checked by decode() against its record
        fault = faults.decode(
            {k: msg[k] for k in faults.Fault.__struct_fields__},
            "control fault",
            ProtocolError,
        )
        try:
            injector.arm(fault)
        except ProtocolError as e:  # an io-error for a model without requests
            sock.send(control.encode({"op": "error", "seq": seq, "message": str(e)}))
            return
        if mirrors is not None:
            mirrors.republish()
    elif op == "quiesce":
        device.quiesce()
        device.ctx.out.held = True
    elif op == "resume":
        device.ctx.out.held = False
        device.resume()
        if mirrors is not None:  # before the reply: the monitor dropped its copy on quiesce
            mirrors.republish()
    elif op == "retry":
        device.retry()
    elif op == "harvest_dirty":
        device.harvest_dirty()
    elif op == "link":
        sock.send(control.encode(_link(device, sock, seq, msg["up"], checkpoints)))
        return
    elif op == "ping":  # an event the channel could not take when it came goes now
        device.ctx.events.flush()
    if op == "save":
        reply = {
            "op": "state",
            "seq": seq,
            **codec.state_document(type(device).NAME, device.save()),
        }
    elif op == "stats":  # also while quiesced: counting changes nothing
        window = sock.window  # the channel's, looking for the guest's next access
        channel = {"channel_polls": window.polls, "channel_polls_caught": window.caught}
        reply = {"op": "counters", "seq": seq, "counters": device.stats() | channel}
    elif op in control.REPLY_TO:
        reply = {"op": control.REPLY_TO[op], "seq": seq}
    else:
        reply = {"op": "error", "seq": seq, "message": f"unknown control op {op!r}"}
    sock.send(control.encode(reply))


def _link(
    device: Device, sock: Channel, seq: int, up: bool | None, checkpoints: Checkpoints | None
) -> dict[str, object]:
    """The reply to a `link` request (ModelDescriptor.link). A change is published as a
    checkpoint and sent ahead of the reply, waiting for room if need be (the events' own
    flush gives up on a full channel, and the reply would overtake it): a process that dies
    once the operator has been told its link is down comes back down."""
    before = device.link(None)
    now = device.link(up)
    if before is None or now is None:
        return {"op": "error", "seq": seq, "message": f"model {type(device).NAME} has no link"}
    if now != before and checkpoints is not None:
        checkpoints.publish()
        device.ctx.events.flush_waiting(sock.send)
    return {"op": "link_state", "seq": seq, "up": now, "changed": now != before}


class Checkpoints:
    """Counts the frames the device applied, and publishes a checkpoint every PUBLISH_EVERY
    (PUBLISH_EVERY_COUNTED where the monitor counts what the output line took)."""

    def __init__(self, device: Device, applied: int = 0) -> None:
        self.device = device
        self.applied = applied
        self._published = applied
        counted = device.ctx.out.counted()
        self.every = events.PUBLISH_EVERY_COUNTED if counted else events.PUBLISH_EVERY
        device.ctx.events.progress = lambda: (self.applied, device.ctx.out.taken())

    def applied_one(self) -> None:
        self.applied += 1
        if self.applied - self._published >= self.every:
            self.publish()

    def publish(self) -> None:
        self._published = self.applied
        self.device.ctx.events.publish_state(type(self.device).NAME, self.device.save())


class MirrorPublisher:
    """Publishes a model's register mirror (monitor/mirror.py) as MIRROR frames, only when
    the monitor's copy would no longer answer exactly, or could answer for longer."""

    def __init__(self, device: Device, checkpoints: Checkpoints, injector: FaultInjector) -> None:
        self._registers = MODELS[type(device).NAME].mirrored
        self._injector = injector  # a fault armed for a reply: publish no value
        self._model = device if isinstance(device, MirroredRegisters) else None
        self._quiet = self._model.quiet_reads() if self._model is not None else frozenset()
        self._events: DeviceEvents = device.ctx.events
        self._checkpoints = checkpoints  # its `applied` is the stamp
        self._last: wire.Mirror | None = None  # what the monitor has, once sent
        self._used = 0  # writes its credit covered, applied since

    def applied_read(self, offset: int, size: int) -> int | None:
        """A read of `size` bytes at `offset` was applied, and is about to be counted; its
        reply follows. The stamp the reply carries (wire.RESTAMPED) when the monitor's copy
        holds after the read too: its values, credit offset and credit, and no MIRROR of
        ours waits unsent (the monitor restamps the copy it has: monitor/mirror.py); else
        None, a MIRROR is published.

        A read the model calls quiet (MirroredRegisters.quiet_reads()) changed nothing the copy
        says, so it holds if it held before the read: it did while no write has used the
        credit since it was stamped (each frame and host event keeps it current, or says
        that only the credit moved). Then mirror() is not asked: ~1.4 us of the serial
        model's ~5 a forwarded read (bench/exit_rtt.py)."""
        last, model = self._last, self._model
        if last is not None and model is not None and not self._events.mirror_pending:
            quiet = size == 1 and offset in self._quiet and not self._used
            if quiet and not self._injector.awaits_reply():
                return self._restamp(last)
            now = self._now(model)
            same = now.values == last.values and now.credit_offset == last.credit_offset
            if same and last.credit <= now.credit <= 2 * last.credit:
                return self._restamp(last)
        self.applied(None)
        return None

    def _restamp(self, last: wire.Mirror) -> int:
        """`last` holds after the read being answered: stamped anew, its credit whole again."""
        stamp = self._checkpoints.applied + 1  # a new Mirror: cheaper than replace()
        self._last = wire.Mirror(last.values, last.credit_offset, last.credit, stamp)
        self._used = 0
        return stamp

    def applied(self, write_at: int | None) -> None:
        """A frame was applied (a write at `write_at`, or None: a read or input), and is
        about to be counted; a read's reply follows this."""
        last = self._last
        if last is not None and write_at == last.credit_offset and self._used < last.credit:
            self._used += 1
            if 2 * self._used <= last.credit:
                return  # the model promised these values: no need to look at them again
        else:
            self._last = None  # the monitor's copy is no longer current: a new stamp
        self.changed(1)

    def changed(self, pending: int = 0) -> None:
        """Publish if the values (or the credit's offset) changed, or the credit left runs
        out; `pending`: frames applied and not counted yet."""
        if self._model is None:
            return
        now = self._now(self._model)
        last = self._last
        if last is not None:
            left = last.credit - self._used
            same = now.values == last.values and now.credit_offset == last.credit_offset
            if same and left <= now.credit and 2 * left >= now.credit:
                return
        self._last = replace(now, stamp=self._checkpoints.applied + pending)
        self._used = 0
        self._events.publish_mirror(wire.encode_mirror(self._last, self._registers))

    def republish(self) -> None:
        self._last = None
        self.changed()

    def _now(self, model: MirroredRegisters) -> wire.Mirror:
        """The model's values now; none valid while a fault waits for a reply."""
        if self._injector.awaits_reply():
            return wire.Mirror((None,) * len(self._registers))
        return model.mirror()


class InputRoomReporter:
    """Tells the monitor how much host input a console model has room for (protocol/events.py
    input_room), so that it sends no more: input waits on the host side (its terminal, the
    pipe into `splitvmm up`), and no byte of a paste is dropped here.

    The monitor's idea of the room is the last report's, less what it sent since: `received`
    counts the input bytes this process got. A new report goes when the room is below that
    idea (the monitor would send too much), a quarter of the buffer above it, or when the
    buffer is empty and the room above it: a step of a quarter keeps the reports few while
    the guest reads a byte at a time, and an empty buffer always asks for more."""

    def __init__(self, device: Device) -> None:
        self._model = device if isinstance(device, ConsoleInput) else None
        self._events = device.ctx.events
        self.received = 0  # host input bytes this process got from the monitor
        self._said: events.InputRoom | None = None  # the last report

    def check(self) -> None:
        """After each frame and host event: report the room if the monitor should know."""
        model = self._model
        if model is None:
            return
        buffer = model.input_buffer()
        if buffer is None:
            return
        waiting, holds = buffer
        room = max(0, holds - waiting)
        said = self._said
        if said is not None:
            believed = said.left(self.received)  # what the monitor thinks is left
            if room == believed or (room > believed and room - believed < holds // 4 and waiting):
                return
        self._said = events.InputRoom(self.received, room)
        self._events.publish_room(events.encode_input_room(self.received, room))


def serve(
    device: Device,
    sock: Channel,
    checkpoints: Checkpoints,
    injector: FaultInjector | None = None,
) -> None:
    """Frames from the channel, and whatever else the model waits on (eventloop.py)."""
    inj = injector or FaultInjector()
    mirrors = MirrorPublisher(device, checkpoints, inj)
    mirrors.changed()  # the first, after READY
    inputs = InputRoomReporter(device)
    inputs.check()  # likewise: until it comes, the monitor sends a console no input

    def serve_frame(buf: bytes) -> None:
        _serve_frame(device, sock, buf, checkpoints, inj, mirrors, inputs)
        inputs.check()

    def after_host_event() -> None:
        mirrors.changed()
        inputs.check()

    EventLoop(device, sock, serve_frame, after_host_event=after_host_event).run()


def _serve_frame(
    device: Device,
    sock: Channel,
    buf: bytes,
    checkpoints: Checkpoints,
    injector: FaultInjector,
    mirrors: MirrorPublisher | None = None,
    inputs: InputRoomReporter | None = None,
) -> None:
    """One frame from the monitor; `mirrors`: the model's register mirror, if published;
    `inputs`: what counts the host input it receives, if its room is reported."""
    if mirrors is None:
        mirrors = MirrorPublisher(device, checkpoints, injector)
    if control.is_control(buf):
        _serve_control(device, sock, buf, injector, mirrors, checkpoints)
        return
    if not isinstance(device, RegisterDevice):
        raise ProtocolError(f"{type(device).__name__} takes no port accesses")
    access = wire.decode_access(buf, device.WINDOW)
    if access.op == wire.Op.SYNC:
        # Everything sent before it is applied (after a write the vCPU must see done, and as
        # the monitor's last request before it ends us): give the line what it takes now, and
        # only before our end (DRAIN) wait for a slow one: a stalled line must not hold each
        # synced write's vCPU (and this loop) for FLUSH_TIMEOUT_MS.
        out = device.ctx.out
        if (out.drain() if access.drain else out.flush()) and isinstance(device, OutputProducer):
            device.output_room()
            mirrors.changed()
        sock.send(wire.encode_sync_done(access.seq))
        return
    injector.received()
    if access.op == wire.Op.INPUT and inputs is not None:
        inputs.received += len(access.data)
    reply = _apply(device, access)
    if reply is not None:
        stamp = mirrors.applied_read(access.offset, access.size)
        if not injector.send_reply():
            return  # dropped: no checkpoint covers it, as if this process died before replying
        sock.send(wire.encode_read_done(access.seq, reply, stamp))
    else:
        mirrors.applied(access.offset if access.op == wire.Op.WRITE else None)
    checkpoints.applied_one()  # after the reply: a checkpoint never covers an unanswered read
    injector.answered()


def _apply(device: RegisterDevice, access: wire.Access) -> bytes | None:
    """A read (its reply), a write or host input: what a checkpoint counts."""
    if access.op == wire.Op.READ:
        return device.read(access.offset, access.size)
    if access.op == wire.Op.WRITE:
        device.write(access.offset, access.data)
    elif isinstance(device, ConsoleInput):
        device.host_input(access.data)
    else:  # the monitor sends input to console devices only: count it, as a bad access
        device.ctx.counters.bad_access += 1
    return None


Replay = list[tuple[bytes, int]]  # (frame, host wall-clock ns when the monitor sent it)


def prepare_resume(spec: DeviceSpec, ctx: DeviceContext) -> tuple[int, Replay, int, int]:
    """A restart's (frames applied at its checkpoint, frames to re-apply with when each was
    sent, how many of those first the dead process is known to have applied, how many of
    those first were on their way as it saved the checkpoint: `posted`); the output's
    counters set before the model's restore() puts its buffered bytes back."""
    resume = spec.resume
    if resume is None:
        return 0, [], 0, 0
    counts = [_count(resume, k) for k in ("applied", "emitted", "skip")]
    replay, sent = resume.get("replay"), resume.get("replay_wall_ns")
    if not isinstance(replay, list) or len(replay) > MAX_REPLAY:
        raise StateError(f"resume: replay must be a list of at most {MAX_REPLAY} frames")
    if not isinstance(sent, list) or len(sent) != len(replay):
        raise StateError("resume: replay_wall_ns must give a time for each replayed frame")
    if not all(type(t) is int and 0 <= t <= MAX_WALL_NS for t in sent):
        raise StateError("resume: replay_wall_ns must be wall-clock times in ns")
    try:
        frames = [base64.b64decode(f, validate=True) for f in replay]
    except (TypeError, ValueError):
        raise StateError("resume: a replayed frame is not base64") from None
    confirmed = resume.get("confirmed", len(frames))  # absent: all (a monitor before it)
    if type(confirmed) is not int or not 0 <= confirmed <= len(frames):
        raise StateError("resume: confirmed must count frames of the replay")
    posted = resume.get("posted", 0)  # absent: none known on its way (a monitor before it)
    if type(posted) is not int or not 0 <= posted <= len(frames):
        raise StateError("resume: posted must count frames of the replay")
    applied, ctx.out.emitted, ctx.out.skip = counts
    return applied, list(zip(frames, sent, strict=True)), confirmed, posted


def _count(resume: dict[str, object], key: str) -> int:
    n = resume.get(key)
    if type(n) is not int or not 0 <= n <= wire.MAX_COUNT:
        raise StateError(f"resume: {key} must be a count, got {str(n)[:20]!r}")
    return n


def replay(
    device: Device,
    frames: Replay,
    checkpoints: Checkpoints,
    confirmed: int | None = None,
    posted: int = 0,
) -> None:
    """Re-apply what the dead process got after its checkpoint (read replies go nowhere), to
    its registers only (ctx.replaying): the guest's queues as they were at some frame of the
    journal may be memory the driver has given up since; after_restart() takes up the ones
    the last frame leaves. Each frame as of when it was sent (ctx.replay_wall_ns): a clock
    set an hour before the crash was set then, not at the restart. Past the first
    `confirmed` (None: all), a frame may never have reached the dead process
    (ctx.replay_unconfirmed): what it did to guest RAM applied live may not have been done."""
    if not frames:
        return
    if not isinstance(device, RegisterDevice):
        raise StateError(f"resume: {type(device).__name__} takes no port accesses")
    device.ctx.replaying = True
    try:
        for n, (frame, sent) in enumerate(frames):
            try:
                access = wire.decode_access(frame, device.WINDOW)
            except ProtocolError as e:
                raise StateError(f"resume: {e}") from None
            if access.op == wire.Op.SYNC:
                raise StateError("resume: a SYNC frame is never replayed")
            device.ctx.replay_wall_ns = sent
            device.ctx.replay_unconfirmed = confirmed is not None and n >= confirmed
            device.ctx.replay_posted = n < posted
            _apply(device, access)
            checkpoints.applied += 1
    finally:
        device.ctx.replaying = device.ctx.replay_unconfirmed = device.ctx.replay_posted = False
        device.ctx.replay_wall_ns = None


# -- sandbox (issue 3) ------------------------------------------------------------------------
# Fd kinds whose files a device writes in place and must not grow (sandbox/device.py
# _file_size_limit): its disk image, its progress page
FIXED_SIZE = (FdKind.DISK, FdKind.PROGRESS)
CONNECT_TIMEOUT_MS = 10000  # the monitor binds before it spawns us: this is a stuck monitor


def _connect(endpoint: str) -> Channel:
    """Connect the channel (seccomp forbids connecting afterwards); our greeting goes at once.
    The monitor sends its own when it first reads the channel (monitor/zmtp.py): our first
    send (READY) waits for it, while this process goes on into its sandbox."""
    try:
        return Channel.connect(
            endpoint, control.MAX_CONTROL, CONNECT_TIMEOUT_MS / 1000, poll_ns=max_poll_ns()
        )
    except OSError as e:
        raise sandbox.SandboxError(f"channel not connected: {e}") from None


# -- test hook (issue 3): trusted direction only -------------------------------------------------
Hook = Callable[[dict[str, int]], dict[str, object]]


def _load_hook(spec: DeviceSpec) -> Hook | None:
    """Unpickle the spec's hook before the sandbox: unpickling imports what it references.

    The spec comes from the monitor (trusted). Nothing read from the channel is ever
    unpickled, and the hook's result leaves as JSON, never as a pickle.
    """
    if not spec.hook:
        return None
    import pickle  # only here: a device without a hook never loads pickle

    hook: Hook = pickle.loads(base64.b64decode(spec.hook))  # noqa: S301 (trusted spec, tests only)
    return hook


def _run_hook(hook: Hook, spec: DeviceSpec) -> None:
    try:
        result: dict[str, object] = hook(dict(spec.fds))
    except Exception as e:  # reported to the test, which asserts on it
        result = {"hook_error": repr(e)}
    data = json.dumps(result).encode()
    fd = spec.fds["hook_result"]
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def run(
    spec: DeviceSpec,
    read_rest: Callable[[DeviceSpec], DeviceSpec] | None = None,
    parent: int | None = None,
) -> None:
    """The device process from its spec to its end. `parent`: the pid our parent must have
    (a device forked by the zygote knows its launcher's); None: any but init.

    A warm spare (spec.deferred, monitor/slot.py) runs the same steps in the same order,
    and waits for `read_rest(spec)`, its whole spec (once it takes over a crashed process),
    inside its sandbox: in its namespaces and empty root, privileges dropped, Landlock on,
    just before it connects its channel (the sandbox's `connect` step, below). Its root holds
    its own listening socket, made at protocol/spec.py spare_path() and linked to the
    channel's path when it takes over (it binds the socket in by its first name, however
    soon it is taken). Connecting, rlimits and seccomp come after the wait, as for any
    device: a spare must not connect to a monitor that serves no channel of it. So its
    state, guest data, is read only once it is sandboxed, later than a cold process reads
    its own (pre-sandbox, in its spec).

    Measured for the serial device exec'd (tests, `policy audit`; ~120 ms to READY):
    interpreter start ~23 ms, imports ~85 ms, setup() <1 ms, sandbox and connect ~9 ms,
    restore and READY <1 ms. Forked by the launcher's zygote (sandbox/zygote.py), the first
    two are done before the request (the model's own module at the first request for that
    model, by the zygote): ~20-30 ms from the request to READY (bench/startup.py),
    ~100 ms more where the zygote rested and a new one imports first.
    The spare has done all but connecting, rlimits, seccomp and what follows."""
    # The monitor's death must take us with it (no orphan holding guest RAM).
    confine.set_parent_death_signal(signal.SIGKILL)
    # Our parent died before prctl took effect: we were reparented (to init, or a subreaper).
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(1)
    if not another_user(spec.user):
        # What a root launcher keeps for devices run as another user (sandbox/launcher_start.py)
        # is not this one's to hold while its model sets up, before its sandbox.
        confine.drop_only(confine.FOR_ANOTHER_USER)
    load_model(spec.model)  # imports the model's module: there is no file system once sandboxed
    logging.basicConfig(
        # no name of its own: the launcher's relay prints each line as the device's, named
        # by what it knows (sandbox/relay.py)
        level=logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    ctx = build_context(spec)
    model = load_model(spec.model)
    model.setup(ctx)  # before the sandbox: map, open
    hook = _load_hook(spec)

    def connect(endpoint: str) -> tuple[DeviceSpec, Channel]:
        """Sandboxed but for rlimits and seccomp: a warm spare waits here for its spec."""
        model.setup_sandboxed(ctx)  # in the process that serves: after the sandbox's fork
        if not spec.deferred:
            return spec, _connect(endpoint)
        if read_rest is None:
            raise ValueError(f"device {spec.name}: a deferred spec and no way to read the rest")
        whole = read_rest(spec)
        ctx.restarted = whole.resume is not None
        return whole, _connect(endpoint)

    # -- sandbox (issue 3): after imports and fds, before any guest data --
    try:
        spec, sock = sandbox.enter_sandbox(
            spec.model,
            set(spec.fds.values()),
            spec.seccomp,
            channel=f"ipc://{spare_path(spec.channel)}" if spec.deferred else spec.channel,
            connect=connect,
            address_space=address_space_limit(spec),
            private_memory=RUNTIME_ADDRESS_SPACE,
            fixed_size=frozenset(
                spec.fds[role.name] for role in MODELS[spec.model].fds if role.kind in FIXED_SIZE
            ),
            user=spec.user,
        )
    except SplitvmmError as e:  # a layer the host refuses, a policy that does not load: the
        # operator's to fix, said in one line (the launcher relays it, named), no traceback
        raise SystemExit(f"device {spec.name}: {e}") from None
    try:
        _serve_sandboxed(spec, ctx, sock, hook)
    except ChannelClosed as e:  # the monitor failed us, or is gone: it ends us anyway
        raise SystemExit(f"device {spec.name}: {e}") from None
    finally:  # whatever ends us, not left to the interpreter's exit: an unclosed socket's
        sock.close()  # warning asks the kernel for its addresses, which the filter refuses


def _serve_sandboxed(
    spec: DeviceSpec, ctx: DeviceContext, sock: Channel, hook: Hook | None
) -> None:
    """From the sandbox to the end: the test hook, the saved state (guest data), READY, the
    event loop."""
    if hook is not None:
        _run_hook(hook, spec)
    try:
        fault = None if spec.fault is None else faults.decode(spec.fault, "fault", ConfigError)
        applied, frames, confirmed, posted = prepare_resume(spec, ctx)
        device = build_device(spec, ctx)
        injector = FaultInjector(fault, device.request_faults)
        checkpoints = Checkpoints(device, applied)
        replay(device, frames, checkpoints, confirmed, posted)
        if ctx.restarted:
            device.after_restart()
    except StateError as e:
        _refuse(sock, f"saved state rejected: {e}")
    except ConfigError as e:
        _refuse(sock, f"options rejected: {e}")
    except ProtocolError as e:  # its fault: an io-error for a model that serves no requests
        _refuse(sock, f"fault rejected: {e}")
    # Sent once connected: the monitor's journal empties at once, and the writes it journaled
    # late (sent after READY) count as applied after this checkpoint. A first start's too: a
    # restart before the 32nd frame starts from it, not from the options again (the rtc's
    # base = "localtime" is the host zone's offset then, an hour off across a DST change).
    checkpoints.publish()
    sock.send(wire.encode_ready())
    device.ctx.events.connect(sock.send_now)
    serve(device, sock, checkpoints, injector)
