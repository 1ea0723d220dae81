"""`splitvmm policy check|audit MODEL`: validate the seccomp policies, or trace what a device uses.

`audit` spawns a device process the way the monitor does (its own ipc://
channel in a private directory, an eventfd as its irq, a pipe as its output),
but with seccomp in "trace" mode: the filter sends every system call to a
user-notification listener. The listener fd lives in the device; we take a
copy with pidfd_getfd(2) (found by its /proc/PID/fd link,
"anon_inode:seccomp notify"), record each call and let it run (or fail it with
the errno the policy's `return` rule gives). Then we drive the device through
a few hundred accesses over its channel (reads and writes all over the model's
window, host input, syncs, the snapshot's control requests), then what only that
model does, from its descriptor's recipes (protocol/models.py): a stalled output (a pipe
nobody reads, so that it buffers, polls its output fd and flushes when that is writable;
the serial), timed interrupts (so that it waits for its deadlines and signals its irq;
the rtc),
end with a malformed frame (so the error exit path is traced too) and print the
sorted set of syscalls.

Why not SECCOMP_RET_LOG and the kernel log: here the audit records reach
/dev/kmsg through printk's rate limit (10 lines per 5 s), so a full run loses
most of them. Why not strace: ptrace sees the start-up too and needs the
tracer attached before the filter loads; the listener sees exactly the calls
the filter judges, from every thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

from splitvmm.errors import escaped
from splitvmm.record import Struct, field

if TYPE_CHECKING:  # imported lazily: `splitvmm --help` loads no cffi module
    from splitvmm.native.seccomp_notify import SeccompListener
    from splitvmm.protocol.models import FdKind, ModelDescriptor
    from splitvmm.sandbox.policy import Policy, Rule

SPAWN_TIMEOUT_S = 15.0
PIPE_SIZE = 4096  # the device's output pipe: one page, the least Linux gives
OUTPUT_OVERRUN = 16 << 10  # more than any device buffers: the rest is dropped (and logged)
EXPECTED_EXIT = 1  # the workload ends with a malformed frame: ProtocolError, exit status 1
NOTIFY_LINK = "anon_inode:seccomp notify"
# --accesses: the workload's mixed part cycles through a read, a write, host input and a sync
# (_mixed), so fewer than 4 leave a kind untraced. Half of them take a sequence number, a u32
# on the wire (wire.FRAME): up to 2**32 - 1 leave the rest of the workload room for its own.
MIN_ACCESSES, MAX_ACCESSES = 4, 0xFFFF_FFFF


@click.group("policy")
def command() -> None:
    """Validate the devices' seccomp policies, or trace the syscalls a device makes."""


@command.command("check")
@click.option(
    "--dir",
    "policy_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Policy directory (default: policies/<arch>/ of this checkout).",
)
def check(policy_dir: Path | None) -> None:
    """Parse every policy file and compile each one a process loads: <model>_device.policy,
    warden.policy, and the monitor's own monitor.policy and vcpu.policy."""
    from splitvmm.sandbox import policy

    errors, compiled = check_policies(policy_dir or Path(policy.default_policy_dir()))
    for error in errors:  # a path in it is data: a file name may hold any character
        click.echo(f"splitvmm: policy error: {escaped(error)}", err=True)
    if errors:
        sys.exit(1)
    for name, count in compiled:
        click.echo(f"{name}: {count} rules, compiled")


def check_policies(policy_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(errors as "file:line: message", [(file name, rule count)] of the compiled ones)."""
    from splitvmm.monitor.confinement import MONITOR_POLICY, VCPU_POLICY, policy_constants
    from splitvmm.protocol.models import MODELS
    from splitvmm.sandbox import policy

    errors: list[str] = []
    compiled: list[tuple[str, int]] = []
    loadable = {policy.device_policy_name(m) for m in MODELS} | {
        "warden.policy",
        MONITOR_POLICY,
        VCPU_POLICY,
    }
    for name in sorted(loadable - {p.name for p in policy_dir.glob("*.policy")}):
        errors.append(f"{policy_dir / name}: missing (a model, the warden or the monitor needs it)")
    # SELF_PID: the warden's and the monitor's run-time constant. Only the monitor's own
    # policies may name KVM ioctls (a device holds no KVM fd) and the launcher's socket (any
    # fd number will do here: the rules compare with it).
    # A device's policy gets neither: it is parsed with policy.CONSTANTS alone
    # (policy.load_model_policy), as is every file a device policy may include.
    warden_constants = {**policy.CONSTANTS, "SELF_PID": os.getpid()}
    monitor_constants = policy_constants(launcher_fd=3)
    for path in sorted(policy_dir.glob("*.policy")):
        own = policy.CONSTANTS
        if path.name in (MONITOR_POLICY, VCPU_POLICY):
            own = monitor_constants
        elif path.name == "warden.policy":
            own = warden_constants
        elif path.name not in loadable:
            # A file only included: what names it may use depends on who includes it, and
            # each loadable file above is parsed, with what it includes, with its own.
            own = {**warden_constants, **monitor_constants}
        try:
            parsed = policy.parse_file(path, own)
            if path.name in loadable:
                policy.compile_filter(parsed)
                compiled.append((path.name, len(parsed.rules)))
        except policy.PolicyError as e:
            if str(e) not in errors:  # a fault in a file that several include: said once
                errors.append(str(e))
    return errors, compiled


@command.command("audit")
@click.argument("model")
@click.option(
    "--accesses",
    type=click.IntRange(MIN_ACCESSES, MAX_ACCESSES),
    default=400,
    show_default=True,
    help="Accesses in the workload.",
)
def audit(model: str, accesses: int) -> None:
    """Run a MODEL device under a tracing filter through a workload; print its syscalls."""
    from splitvmm.protocol.models import MODELS
    from splitvmm.sandbox import policy

    if model not in MODELS:
        raise click.BadParameter(f"unknown model {model!r}", param_hint="MODEL")
    try:
        current = policy.load_model_policy(model)
    except policy.PolicyError as e:  # the policy audited against: told as `check` tells it
        click.echo(f"splitvmm: policy error: {escaped(str(e))}", err=True)
        sys.exit(1)
    trace = trace_device(model, accesses, current)
    for line in format_trace(trace, current):
        click.echo(line)
    click.echo(f"{model}: {len(trace.calls)} distinct syscalls ({sum(trace.calls.values())} calls)")
    if trace.device_status != EXPECTED_EXIT:
        click.echo(f"splitvmm: the device ended with status {trace.device_status}", err=True)
        sys.exit(1)
    missing = sorted(set(trace.calls) - set(current.rules))
    if missing:
        where = policy.device_policy_name(model)
        click.echo(f"splitvmm: missing from {where}: {' '.join(missing)}", err=True)
        sys.exit(1)
    if trace.refused:  # named by the policy, but with arguments its rule kills for
        for name in sorted(trace.refused):
            rule = current.rules[name]
            click.echo(f"splitvmm: {name} refused by its rule at {rule.where}", err=True)
        sys.exit(1)


# -- tracing ------------------------------------------------------------------------------------
class Trace(Struct):
    calls: Counter[str] = field(default_factory=Counter)
    args: dict[str, set[int]] = field(default_factory=dict)  # the argument a rule would check
    # calls whose arguments the policy's rule for them does not allow: the filter kills there
    refused: Counter[str] = field(default_factory=Counter)
    device_status: int | None = None


# For these, the argument a policy rule conditions on (ioctl request, fcntl command...).
ARG_OF_INTEREST = {"ioctl": 1, "fcntl": 1, "mmap": 2, "mprotect": 2, "madvise": 2, "futex": 1}


def trace_device(model: str, accesses: int, current: Policy) -> Trace:
    trace = Trace()
    errnos = {name: rule.errno for name, rule in current.rules.items() if rule.errno}
    with _spawned(model) as dev, traced(dev.proc.pid, trace, errnos, current.rules):
        try:
            dev.wait_ready()
            dev.run_workload(accesses)
        finally:
            trace.device_status = dev.finish()
    return trace


@contextlib.contextmanager
def traced(
    warden_pid: int, trace: Trace, errnos: dict[str, int], rules: Mapping[str, Rule] | None = None
) -> Iterator[None]:
    """Record (into `trace`) and let run every syscall of a device spawned in "trace" mode.

    A syscall named in `errnos` fails with that errno instead, as the policy's
    `return` rule would make it. One whose arguments its rule in `rules` does not allow is
    counted in trace.refused (and runs: the audit goes on).
    """
    listener = take_listener(warden_pid)
    stop = threading.Event()
    args = (listener, trace, errnos, stop, rules or {})
    thread = threading.Thread(target=_serve, args=args, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


def _serve(
    listener: SeccompListener,
    trace: Trace,
    errnos: dict[str, int],
    stop: threading.Event,
    rules: Mapping[str, Rule],
) -> None:
    from splitvmm.native.seccomp import pyseccomp as seccomp

    poller = select.poll()
    poller.register(listener.fd, select.POLLIN)
    while not stop.is_set():
        if not poller.poll(100):
            continue
        try:
            event = listener.receive()
        except OSError:  # ENOENT: the process is gone
            return
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, event.nr).decode()
        trace.calls[name] += 1
        if name in ARG_OF_INTEREST:
            trace.args.setdefault(name, set()).add(event.args[ARG_OF_INTEREST[name]])
        rule = rules.get(name)
        if rule is not None and not rule.allows(event.args):
            trace.refused[name] += 1
        with contextlib.suppress(OSError):  # the caller may have been killed meanwhile
            if name in errnos:
                listener.fail(event, errnos[name])
            else:
                listener.allow(event)


def format_trace(trace: Trace, current: Policy) -> Iterator[str]:
    for name in sorted(trace.calls):
        rule = current.rules.get(name)
        verdict = "MISSING from the policy" if rule is None else Path(rule.where).name
        if name in trace.refused:
            verdict += f" (refused {trace.refused[name]} times: arguments)"
        extra = ""
        if name in trace.args:
            values = ",".join(hex(a) for a in sorted(trace.args[name]))
            extra = f"  arg{ARG_OF_INTEREST[name]}={values}"
        yield f"{name:<20} {trace.calls[name]:>7}  {verdict}{extra}"


def take_listener(warden_pid: int) -> SeccompListener:
    """A copy of the device's seccomp listener fd (the device is the warden's only child)."""
    from splitvmm.native.confine import pidfd_getfd
    from splitvmm.native.seccomp_notify import SeccompListener

    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _find_listener(warden_pid)
        if found is not None:
            pid, fd = found
            pidfd = os.pidfd_open(pid)
            try:
                return SeccompListener(pidfd_getfd(pidfd, fd))
            finally:
                os.close(pidfd)
        time.sleep(0.01)
    raise click.ClickException(f"no seccomp listener in the device within {SPAWN_TIMEOUT_S} s")


def _find_listener(warden_pid: int) -> tuple[int, int] | None:
    try:
        children = Path(f"/proc/{warden_pid}/task/{warden_pid}/children").read_text().split()
    except OSError:
        return None
    for child in map(int, children):
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{child}/fd"):
                if os.readlink(entry.path) == NOTIFY_LINK:
                    return child, int(entry.name)
    return None


# -- the device, spawned as the monitor spawns it -------------------------------------------------
class SpawnedDevice:
    def __init__(self, model: str, rundir: Path) -> None:
        import zmq

        from splitvmm.protocol.models import MODELS, FdKind
        from splitvmm.protocol.spec import DEVICE_COMMAND, DeviceSpec
        from splitvmm.sandbox.spawn import start_device

        self.model = MODELS[model]
        self.window = self.model.transport.size
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{rundir}/{model}0.sock"
        self.sock.bind(endpoint)
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.out_r, self.out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fcntl.fcntl(self.out_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # so that the stall comes soon
        self.peers: dict[str, int] = {}  # the far end of each backend stand-in (a TAP's)
        given = {FdKind.IRQ: self.irq, FdKind.OUTPUT: self.out_w}
        made = stand_in_fds(self.model, rundir, given, self.peers)
        self.fds = made
        spec = DeviceSpec(
            f"{model}0", model, endpoint, made, seccomp="trace", transport=stand_in_transport()
        )
        # Its stderr (the traceback the malformed frame causes) stays out of our output.
        with open(rundir / "device.stderr", "wb") as stderr:
            self.proc = start_device(DEVICE_COMMAND, spec, stderr=stderr.fileno())
        self._seq = 0

    def wait_ready(self) -> None:
        from splitvmm.protocol import wire

        if not self.sock.poll(int(SPAWN_TIMEOUT_S * 1000)):
            raise click.ClickException("the device did not become ready")
        wire.decode_ready(self.sock.recv())

    def run_workload(self, accesses: int) -> None:
        """Accesses to every register, host input and SYNCs one at a time, the control
        requests, then a burst of posted writes (the device's queue fills while it
        works), the model's own workload; last, a malformed frame, so that its error exit
        is traced too."""
        from splitvmm.protocol import wire

        self._mixed(accesses)
        self._control_round_trips()
        for i in range(accesses):
            self.sock.send(wire.encode_write(i % self.window, bytes([0x41 + i % 26])))
        self._request(wire.encode_sync(self._next()))
        self._drain()
        self._stalled_output()
        self._timed_interrupts()
        self._virtio_requests()
        self.sock.send(b"\xff" * 3)

    def _stalled_output(self) -> None:
        """More output than the pipe and the device's buffer hold, unread: the device
        buffers it, drops (and logs) the excess, and answers reads meanwhile; then we read,
        and it flushes when the pipe is writable again."""
        from splitvmm.protocol import wire

        recipe = self.model.output_recipe
        if recipe is None:  # a model without output
            return
        self._post_writes(recipe.setup)
        for i in range(PIPE_SIZE + OUTPUT_OVERRUN):  # past the pipe and the device's buffer
            self.sock.send(wire.encode_write(recipe.emit_offset, bytes([0x61 + i % 26])))
        self._request(wire.encode_read(self._next(), 0, 1))
        kept = 0
        while kept < PIPE_SIZE and select.select([self.out_r], [], [], 2.0)[0]:
            kept += len(os.read(self.out_r, 65536))
            self._request(wire.encode_read(self._next(), 0, 1))  # it flushes meanwhile

    def _timed_interrupts(self, count: int = 20) -> None:
        """A model's timed interrupt (the rtc's periodic one at 8192 Hz), acknowledged
        `count` times: the device polls with its deadline as the timeout, ticks and signals
        its irq eventfd."""
        from splitvmm.protocol import wire

        recipe = self.model.interrupt_recipe
        if recipe is None:  # a model without timed events
            return
        self._post_writes(recipe.start)
        for _ in range(count):
            self._post_writes(recipe.ack)
            self._request(wire.encode_read(self._next(), recipe.ack_read, 1))
            if not select.select([self.irq], [], [], 2.0)[0]:
                raise click.ClickException(f"{self.model.name} raised no interrupt within 2 s")
            os.eventfd_read(self.irq)
        self._post_writes(recipe.stop)

    def _virtio_requests(self) -> None:
        """A virtio model's own I/O (its descriptor's queue recipes): the driver's set-up
        through the channel (INTx: no MSI-X route to ask for), then each chain made
        available in guest RAM (and its backend input sent), notified through the
        ioeventfd and waited for; what the device sends its backend is read."""
        recipes = self.model.queue_recipes
        if not recipes:  # not a virtio model
            return
        from splitvmm.protocol import wire

        ram = GuestRing(self.fds["ram"])
        features = 0  # what each queue's chains need the driver to have taken
        for recipe in recipes:
            features |= recipe.features
        for offset, value, size in ram.driver_setup(sorted({r.queue for r in recipes}), features):
            self._request_write(offset, value, size)
        for recipe in recipes:
            for readable, writable in recipe.chains:
                ram.add(recipe.queue, readable, writable)
                for peer in self.peers.values() if recipe.backend_input else ():
                    os.write(peer, recipe.backend_input)
                if recipe.host_input:  # a console's receive queue fills from host input
                    self.sock.send(wire.encode_input(recipe.host_input))
                os.eventfd_write(self.fds[f"notify{recipe.queue}"], 1)
                self._completed()
        ram.close()

    def _completed(self) -> None:
        """Wait for the device's interrupt, reading what it sends its output line or its
        backend meanwhile (a transmit queue whose output stalls completes only once the
        line took its bytes)."""
        drains = [self.out_r, *self.peers.values()]
        while True:
            ready = select.select([self.fds["intx"], *drains], [], [], 2.0)[0]
            if not ready:
                raise click.ClickException(f"{self.model.name} completed no request within 2 s")
            for fd in drains:
                if fd in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 1 << 16)
            if self.fds["intx"] in ready:
                break
        os.eventfd_read(self.fds["intx"])
        self._request_read(VIRTIO_ISR, 1)  # reading the ISR acknowledges the interrupt

    def _request_write(self, offset: int, value: int, size: int) -> None:
        from splitvmm.protocol import wire

        self.sock.send(wire.encode_write(offset, value.to_bytes(size, "little")))

    def _request_read(self, offset: int, size: int) -> None:
        from splitvmm.protocol import wire

        self._request(wire.encode_read(self._next(), offset, size))

    def _post_writes(self, writes: tuple[tuple[int, int], ...]) -> None:
        from splitvmm.protocol import wire

        for offset, value in writes:
            self.sock.send(wire.encode_write(offset, bytes([value])))

    def _mixed(self, accesses: int) -> None:
        from splitvmm.protocol import wire

        for i in range(accesses):
            offset = i % self.window
            if i % 4 == 0:
                self._request(wire.encode_read(self._next(), offset, 1))
            elif i % 4 == 1:
                self.sock.send(wire.encode_write(offset, bytes([i & 0xFF])))
            elif i % 4 == 2:
                self.sock.send(wire.encode_input(b"x" * (1 + i % wire.MAX_INPUT_CHUNK)))
            else:
                self._request(wire.encode_sync(self._next()))
            self._drain()

    def _control_round_trips(self) -> None:
        """quiesce, save, resume: the snapshot path (JSON control frames)."""
        from splitvmm.protocol import control

        for op in ("quiesce", "save", "resume"):
            self.sock.send(control.encode({"op": op, "seq": self._next()}))
            control.decode(self._reply(f"the device did not answer {op}"))

    def _reply(self, silence: str) -> bytes:
        """The next frame that is not an event, a CHECKPOINT nor a MIRROR (a device publishes
        its state and its register mirror unasked). A CHECKPOINT taken for the reply put every
        later request one reply behind, unseen while the device's libzmq queued whatever we
        left unread; the device's own end queues nothing, and waited on us for good."""
        from splitvmm.protocol import events, wire

        while True:
            if not self.sock.poll(2000):
                raise click.ClickException(silence)
            buf: bytes = self.sock.recv()
            if not (events.is_event(buf) or wire.is_checkpoint(buf) or wire.is_mirror(buf)):
                return buf

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _request(self, frame: bytes) -> None:
        self.sock.send(frame)
        self._reply("the device stopped answering")

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.out_r, 65536)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.irq)

    def finish(self) -> int:
        """Wait for the device to exit (killing it after a while); its status."""
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.zctx.term()
        for fd in {*self.fds.values(), *self.peers.values(), self.irq, self.out_w, self.out_r}:
            os.close(fd)


# -- stand-ins for what the monitor hands a device ---------------------------------------------
STAND_IN_RAM = 2 << 20  # guest RAM of the audited (or escape-tested) device
STAND_IN_DISK = 1 << 20  # its disk image


def stand_in_fds(
    model: ModelDescriptor,
    rundir: Path,
    given: dict[FdKind, int],
    peers: dict[str, int] | None = None,
) -> dict[str, int]:
    """An fd for each of the model's roles, as the monitor would make it: `given` for the
    kinds the caller makes itself (IRQ, OUTPUT), else a memfd for guest RAM, its dirty log
    and a progress page, an eventfd for a notify, MSI-X or INTx role, a file in `rundir`
    for a disk (and that disk's file opened again read-only for its errors), and for a TAP
    one end of a non-blocking SOCK_SEQPACKET socketpair (one frame per message, as a TAP
    reads and writes them; no TAP or CAP_NET_ADMIN needed), whose other end goes into
    `peers` by role (closed when the caller wants none)."""
    from splitvmm.protocol.models import FdKind

    fds: dict[str, int] = {}
    for role in model.fds:
        if role.kind in given:
            fds[role.name] = given[role.kind]
        elif role.kind is FdKind.TAP:
            fds[role.name], peer = _frame_pair()
            if peers is None:
                os.close(peer)
            else:
                peers[role.name] = peer
        elif role.kind is FdKind.GUEST_RAM:
            fds[role.name] = _memfd("ram", STAND_IN_RAM)
        elif role.kind in (FdKind.DIRTY_LOG, FdKind.PROGRESS):
            fds[role.name] = _memfd(role.name, 4096)
        elif role.kind is FdKind.DISK:
            path = rundir / f"{role.name}.img"
            path.write_bytes(bytes(STAND_IN_DISK))
            fds[role.name] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        elif role.kind is FdKind.DISK_ERRORS:
            (disk,) = (
                r.name for r in model.fds if r.kind is FdKind.DISK and r.option == role.option
            )
            fds[role.name] = os.open(f"/proc/self/fd/{fds[disk]}", os.O_RDONLY | os.O_CLOEXEC)
        else:
            fds[role.name] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return fds


def stand_in_transport() -> dict[str, object]:
    """DeviceSpec.transport for the stand-in fds: RAM from gpa 0, INTx on GSI 16."""
    return {"pci": [3, 0], "intx_gsi": 16, "ram": [[0, STAND_IN_RAM, 0]]}


def _frame_pair() -> tuple[int, int]:
    """(the device's end, the far end) of a socketpair carrying one frame per message,
    both non-blocking."""
    import socket

    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for end in ends:
        end.setblocking(False)
    return ends[0].detach(), ends[1].detach()


def _memfd(name: str, size: int) -> int:
    """A memfd sealed as the monitor seals guest RAM and a device's other memfds (the
    sandbox's file-size limit leaves sealed ones out: sandbox/device.py)."""
    import fcntl

    from splitvmm.monitor.memory import SEALS

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


# The virtio layout a driver reaches through the flat window (virtio_function's BAR 0 at
# 0x1000): common configuration, then the ISR.
VIRTIO_COMMON = 0x1000
VIRTIO_ISR = 0x2000
QUEUE_SIZE = 16
# Queue q's rings from DESC + q * QUEUE_STRIDE, its buffers from BUFFERS + q * QUEUE_STRIDE.
DESC, AVAIL, USED, BUFFERS, QUEUE_STRIDE = 0x1000, 0x2000, 0x3000, 0x10000, 0x10000


class GuestRing:
    """Queues of a virtio device as a driver lays them out in the stand-in guest RAM (virtio
    1.2 2.7): each chain a readable and a writable descriptor (either may be left out)."""

    def __init__(self, ram_fd: int, queue: int = 0) -> None:
        import mmap

        self.mem = mmap.mmap(ram_fd, STAND_IN_RAM)
        self.avail_idx: dict[int, int] = {}

    @staticmethod
    def driver_setup(queues: list[int], features: int = 0) -> list[tuple[int, int, int]]:
        """(window offset, value, size) writes: reset, features (`features`, bits 0-31, and
        VERSION_1), each queue, DRIVER_OK."""
        c = VIRTIO_COMMON
        writes = [
            (0x04, 0x0006, 2),  # command: memory space and bus master on, INTx not disabled
            (c + 0x14, 0, 1), (c + 0x14, 1, 1), (c + 0x14, 3, 1),  # reset, ACK, DRIVER
            (c + 0x08, 0, 4), (c + 0x0C, features, 4),  # driver features 0-31
            (c + 0x08, 1, 4), (c + 0x0C, 1, 4),  # driver features 32-63: VERSION_1
            (c + 0x14, 0xB, 1),  # FEATURES_OK
        ]  # fmt: skip
        for q in queues:
            at = q * QUEUE_STRIDE
            writes += [
                (c + 0x16, q, 2), (c + 0x18, QUEUE_SIZE, 2),  # queue q, its size
                (c + 0x20, DESC + at, 8), (c + 0x28, AVAIL + at, 8), (c + 0x30, USED + at, 8),
                (c + 0x1C, 1, 2),  # enable
            ]  # fmt: skip
        return [*writes, (c + 0x14, 0xF, 1)]  # DRIVER_OK

    def add(self, queue: int, readable: bytes, writable: int) -> None:
        import struct

        at, idx = queue * QUEUE_STRIDE, self.avail_idx.get(queue, 0)
        parts = [(BUFFERS + at, len(readable), 0)] if readable else []
        if writable:
            parts.append((BUFFERS + at + 0x8000, writable, 2))  # VIRTQ_DESC_F_WRITE
        self.mem[BUFFERS + at : BUFFERS + at + len(readable)] = readable
        head = 2 * (idx % (QUEUE_SIZE // 2))
        for i, (gpa, length, flags) in enumerate(parts):
            more = i + 1 < len(parts)
            desc = struct.pack("<QIHH", gpa, length, flags | more, head + i + 1 if more else 0)
            where = DESC + at + 16 * (head + i)
            self.mem[where : where + 16] = desc
        slot = AVAIL + at + 4 + 2 * (idx % QUEUE_SIZE)
        self.mem[slot : slot + 2] = struct.pack("<H", head)
        self.avail_idx[queue] = (idx + 1) & 0xFFFF
        self.mem[AVAIL + at + 2 : AVAIL + at + 4] = struct.pack("<H", self.avail_idx[queue])

    def close(self) -> None:
        self.mem.close()


@contextlib.contextmanager
def _spawned(model: str) -> Iterator[SpawnedDevice]:
    with tempfile.TemporaryDirectory(prefix="splitvmm-audit-") as rundir:
        os.chmod(rundir, 0o700)
        dev = SpawnedDevice(model, Path(rundir))
        try:
            yield dev
        finally:
            dev.close()
