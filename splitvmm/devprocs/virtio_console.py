"""virtio-console (virtio 1.2 5.3): one port, receiveq0 (queue 0, host -> guest) and
transmitq0 (queue 1, guest -> host). No VIRTIO_CONSOLE_F_MULTIPORT, and no F_SIZE: the device
does not know the operator's terminal, and a fixed 80x25 would be wrong more often than the
driver's own default; no F_EMERG_WRITE either (a register write cannot wait for the line).
The configuration space reads as struct virtio_console_config with cols, rows and emerg_wr
zero (their features are off) and max_nr_ports 1.

Transmit. The guest's buffers go to the device's output (fd role `out`: stdio, a file or a
`unix:` socket, as the serial device's) through its bounded buffer (output.py). While the
buffer has no room the device takes no chain from transmitq0, so no byte is lost and only
the guest is slowed: its driver waits for used buffers. A chain is completed (used ring) only
once the line took every byte of it, not when the bytes entered the buffer: the used ring is
what a crash restart takes up from, so a byte the dead process held but never sent is in a
chain the new process runs again. Chains complete in order.

Receive. Host input (the operator's keyboard when the output is stdio: the monitor's INPUT
frames; or what the `unix:` peer writes on the output socket) waits in a buffer of
RX_BUFFER_MAX bytes until the driver posts receive buffers. Neither source overflows it: the
monitor sends no more than the room the runtime says it has (protocol/events.py input_room),
and a `unix:` peer is not read while the buffer is full (its writes wait). What overflows it
anyway (a monitor that ignores the room) is dropped and counted (rx_dropped).

Snapshot (quiesced: no chain taken, the output held). The state is the transport's, the
pending input, and for transmit: the queue position at the oldest chain not completed (a
restore takes the chains in flight again from guest RAM), `tx_sent`, the bytes of those
chains the line took already (a restore drops them unsent), and `tx_held`, bytes a device
reset left in the buffer that belong to no chain. So a snapshot during traffic loses no byte
and repeats none, each way. The bytes to drop (after a restore or a crash restart) are
dropped from the chains as they run again, never counted in the output's `emitted`, which
stays the count of this VM's line (a regular file's growth, what a restart goes by): the
chain at the used idx starts `tx_sent` before that count, below 0 after a restore, and
tx_sent is right whether the drop has run yet or not.

Crash restart. The new process starts from the last checkpoint the monitor read (published
by the runtime every few frames, and by this device after a batch of completed transmit
chains, at most one each CHECKPOINT_INTERVAL_S), and takes each queue up at its used ring
in guest RAM:
* receive: before each completion the device writes to its progress page how many input
  bytes it had delivered before the used idx that completion makes (progress.py, stream
  RECEIVE); the new process takes the record of the used idx it finds in guest RAM, less the
  checkpoint's count, as what the dead process delivered since, and drops that many from the
  front of the checkpoint's pending input and the journalled input frames it re-applies: no
  byte lost or repeated, however many chains completed since (bulk input through the
  monitor comes in 8-byte frames and completes hundreds between two checkpoints it reads).
  Without a record, the used entries since the checkpoint's position say it (their len),
  while fewer than a queue size completed; past that input may repeat, never be lost.
  Bytes the dead process read from a `unix:` peer and had not delivered are lost (they were
  never a frame).
* transmit: the chains from the used ring's idx run again, and the bytes of them the line
  took already must be dropped. The checkpoint cannot say how many: the monitor reads a
  device's events only around its own requests (a ping a second, while the guest's kicks
  go through ioeventfds), and what the device had queued dies with it, so the checkpoint is
  usually older than the last completion. So before each completion the device writes to
  its progress page (progress.py), which outlives it, where in the output the chain at the
  next used idx starts. For a regular file the monitor knows what the line took (the file's
  growth: the checkpoint's `emitted` plus the monitor's `skip`); the new process drops that
  minus the start the page gives for the used idx in guest RAM, and every byte goes out
  exactly once. Without such a record (a page that holds none for that idx), or for a pipe,
  socket or terminal, it goes by the checkpoint: if no chain completed since, it drops the
  checkpoint's `tx_sent` and, for a file, the file's growth since; else it drops nothing
  and the bytes the line took of the chains from the used idx come out twice. No byte is
  lost: whichever way, the output's count it carries on with is where the line is (a
  file's growth), which the next restart goes by. Unless the file is truncated or written
  by another meanwhile (its growth then counts what we never sent), or, with no record to
  go by, a multiple of 65536 chains completed since the checkpoint (used idx wraps: the
  checkpoint then looks in step, and its `tx_sent` and the growth are dropped from chains
  that are not its).
* a driver that reset the device since the checkpoint (the state counts resets): its
  queues are another session's, so the checkpoint's position says nothing of them. The new
  session's transmit chains go out whole (their bytes the line took come out twice), and
  bytes of the old session's chains the line had not taken are lost with the memory its
  driver gave up. Receive goes by the progress page across a reset: the enable of the new
  ring records the count so far, and a reset records it too (under NO_RING) for a crash
  before the driver enables receiveq0 again, so input the old session's ring got does not
  repeat.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Self

from splitvmm.devprocs.base import DeviceContext, Source, register
from splitvmm.devprocs.output import CAPACITY
from splitvmm.devprocs.progress import RECEIVE, TRANSMIT, Progress
from splitvmm.devprocs.virtio.guestram import GuestRamError
from splitvmm.devprocs.virtio.pci import VirtioPciDevice
from splitvmm.devprocs.virtio.queue import RING_HEADER, USED_ELEM, Chain, QueueError, SplitQueue
from splitvmm.devprocs.virtio.state import U64, QueueState, VirtioPciState
from splitvmm.errors import StateError
from splitvmm.protocol import schema
from splitvmm.protocol.models import unix_output_path
from splitvmm.protocol.schema import Upgrade
from splitvmm.record import Struct, replace

log = logging.getLogger("splitvmm.dev.virtio-console")

VIRTIO_ID_CONSOLE = 3
RX, TX = 0, 1  # receiveq0, transmitq0
CONFIG = struct.Struct("<HHII")  # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
# Host input waiting for receive buffers: a paste's worth, as the serial device holds.
RX_BUFFER_MAX = 4096
MAX_COUNTER = (1 << 64) - 1
NO_RING = 1 << 16  # the receive record's idx while no ring is enabled (no used idx is it)
# A checkpoint after a completion batch at most this often: the monitor reads them only
# around its requests (a heartbeat's ping a second, when the guest's transmit goes through
# ioeventfds), and one per batch would queue more than a request may find ahead of its
# reply (protocol/events.py MAX_EVENTS_PER_REQUEST). The progress page, not the checkpoint,
# is what makes a restart exact.
CHECKPOINT_INTERVAL_S = 0.05


class VirtioConsoleState(VirtioPciState, frozen=True, kw_only=True):
    """The transport's state (its transmit queue saved at the oldest chain not completed),
    the console's buffers and its counters."""

    VERSION: ClassVar[int] = 2
    rx_pending: Annotated[bytes, schema.MaxLen(RX_BUFFER_MAX)] = b""
    tx_sent: U64 = 0  # bytes of the chains in flight the line took already
    tx_held: Annotated[bytes, schema.MaxLen(CAPACITY)] = b""  # buffered, of no chain
    bytes_in: U64 = 0
    bytes_out: U64 = 0
    rx_dropped: U64 = 0
    # Device resets so far (v2): a crash restart tells the queues of the checkpoint's
    # session from those of a driver that reset and set them up again since.
    resets: U64 = 0
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {1: lambda f: {**f, "resets": 0}}


class _TxChain(Struct):
    """A transmit chain taken from the ring and not completed yet."""

    chain: Chain
    left: list[tuple[int, int]]  # (gpa, len) of its bytes not in the output buffer yet
    total: int
    end: int  # the output's count past its last byte: where the next chain starts


@register
class VirtioConsole(VirtioPciDevice):
    NAME = "virtio-console"
    WINDOW = 0x6000
    State = VirtioConsoleState
    DEVICE_ID = VIRTIO_ID_CONSOLE
    CLASS_CODE = 0x078000  # simple communication controller, other (as QEMU's)

    def __init__(self, ctx: DeviceContext) -> None:
        self._rx = bytearray()
        # A crash restart's checkpoint (None: there was none), until after_restart()
        self._checkpoint_taken: VirtioConsoleState | None = None
        self._tx: deque[_TxChain] = deque()
        # The output's count at the start of the oldest chain in flight (the used idx's). Below
        # `emitted` by what the line took of it, below 0 by what another VM's line took of it:
        # a restore's chain the old line took part of (the module docstring)
        self._tx_done = 0
        # Bytes of the chains in flight that a line took already (a dead process's, or the
        # snapshotted VM's), dropped as they run again; not counted in `emitted` again
        self._drop = 0
        self._progress = ctx.made("progress", Progress, f"{self.NAME}: no progress page")
        self._published = 0.0  # time.monotonic() of the last checkpoint _checkpoint() sent
        self.bytes_in = self.bytes_out = self.rx_dropped = 0
        self.resets = 0
        self._socket_input = bool(ctx.prepared.get("input_socket"))
        self._input_fd = ctx.fds["out"] if self._socket_input else None
        self._built = False  # reset_model() from the constructor records no reset
        super().__init__(ctx)  # resets the transport, which calls reset_model()
        self._built = True

    @classmethod
    def setup(cls, ctx: DeviceContext) -> None:
        """Guest RAM, the progress page (what the process before this one left there),
        whether the output is a `unix:` socket whose peer writes the input, and whether it
        is a regular file (a restart then knows what the line took). Only a `unix:` output
        is read for input: `stdio` may be a socket too (the monitor's stdout under socat,
        inetd or systemd), whose input is the monitor's, through the channel."""
        super().setup(ctx)
        mode = os.fstat(ctx.fds["out"]).st_mode
        unix = unix_output_path(ctx.options.get("output", ""))
        ctx.prepared["input_socket"] = unix is not None and stat.S_ISSOCK(mode)
        ctx.prepared["output_file"] = stat.S_ISREG(mode)

    # -- what the driver sees -------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)  # cols, rows (no F_SIZE), one port, emerg_wr

    def handle(self, queue: int, chain: Chain) -> int:
        raise NotImplementedError("virtio-console serves its queues in process()")

    def reset_model(self) -> None:
        """The chains in flight are the driver's no more; their buffered bytes still go out
        (tx_held in a snapshot), and new chains start after them. Bytes of those chains the
        line took already were to be dropped as they ran again: they will not, and the new
        session's first bytes are not theirs."""
        out = self.ctx.out
        self._tx = deque()
        self._tx_done = out.emitted + out.pending()
        self._drop = 0
        self.resets = min(self.resets + 1, MAX_COUNTER)
        if self._built and not self.ctx.replaying:  # the receive ring is gone: its count
            self._progress.write(NO_RING, self.bytes_in, RECEIVE)

    def process(self, q: int) -> None:
        """A notify: receive buffers posted (pending input goes into them), or chains to
        transmit."""
        try:
            if q == RX:
                self._receive()
            elif q == TX:
                self._transmit()
        except (QueueError, GuestRamError) as e:
            self.ring_failed(q, e)  # the chains used before it are notified

    def _take(self, ring: SplitQueue) -> Chain | None:
        chain = ring.pop()
        if chain is None:
            ring.enable_notifications()  # EVENT_IDX: kick me at the next one...
            chain = ring.pop()  # ...which may have come meanwhile
        return chain

    # -- receive: host -> guest ---------------------------------------------------------------
    def host_input(self, data: bytes) -> None:
        """Bytes from the host (ConsoleInput): into receive buffers, or wait for them. While
        a restart replays its journal, every byte is kept: those the dead process delivered
        are among them, and after_restart() drops those, then caps what is left."""
        if self.ctx.replaying:
            self._rx += data
            return
        room = RX_BUFFER_MAX - len(self._rx)
        if len(data) > room:
            self.rx_dropped = min(self.rx_dropped + len(data) - room, MAX_COUNTER)
            self._warn.warning("rx_dropped", "%s: no receive buffer and the input buffer is "
                               "full: dropped %d byte(s) so far", self.NAME, self.rx_dropped)  # fmt: skip
        self._rx += data[:room]
        self.process(RX)

    def input_buffer(self) -> tuple[int, int] | None:
        """ConsoleInput: with a `unix:` output the peer's writes are the input, read here
        only while `_rx` has room (event_sources); else it comes through the monitor."""
        return None if self._socket_input else (len(self._rx), RX_BUFFER_MAX)

    def _receive(self) -> None:
        ring = self.rings[RX]
        if not self._rx or ring is None or not self._ready():
            return
        done = 0
        while self._rx:
            if done == ring.size:  # a driver refilling as fast as we fill: the event loop
                self._notify[RX].trigger()  # (frames, the heartbeat) first, then the rest
                break
            chain = self._take(ring)
            if chain is None:
                break
            written = self._fill(chain)
            # before used idx says so: what a restart drops of the input it replays
            self._progress.write((ring.used_idx + 1) & 0xFFFF, self.bytes_in, RECEIVE)
            ring.push(chain.head, written)
            done += 1
        if done:
            self.signal_used(RX, ring)

    def _fill(self, chain: Chain) -> int:
        written = 0
        for gpa, length in chain.writable:
            if not self._rx:
                break
            chunk = bytes(self._rx[:length])
            self.ram.write(gpa, chunk)
            del self._rx[: len(chunk)]
            written += len(chunk)
        self.bytes_in = min(self.bytes_in + written, MAX_COUNTER)
        return written

    def _on_input_socket(self) -> None:
        """The `unix:` peer wrote: take what the input buffer has room for."""
        fd = self._input_fd
        if fd is None:
            return
        try:
            data = os.read(fd, RX_BUFFER_MAX - len(self._rx))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""  # the peer is gone (ECONNRESET): input ends
        if not data:
            self._input_fd = None  # end of input; the output side finds out on its own
            return
        self.host_input(data)

    def event_sources(self) -> Sequence[Source]:
        """The transport's, and the `unix:` peer while the input buffer has room (else its
        writes wait in the socket) and the device is not quiesced (input read then would
        miss the snapshot being taken)."""
        sources = super().event_sources()
        if self._input_fd is None or self.quiesced or len(self._rx) >= RX_BUFFER_MAX:
            return sources
        return [*sources, Source(self._input_fd, self._on_input_socket)]

    # -- transmit: guest -> host -------------------------------------------------------------------
    def output_room(self) -> None:
        """The line took buffered bytes (OutputProducer): complete what it sent, take more."""
        self.process(TX)

    def _transmit(self) -> None:
        ring = self.rings[TX]
        if ring is None or not self._ready():
            return
        out = self.ctx.out
        completed = self._complete_sent(ring)
        deadline = self.clock_ns() + self.BUDGET_NS
        while out.room():
            # A line that takes all at once (a file) would let one chain of up to 4 GiB, or
            # a ring of them, hold the event loop past the heartbeat: every BUDGET_NS the
            # rest waits for a later call if anything else waits (as process() does).
            if self.clock_ns() >= deadline:
                if self.ctx.waiting():
                    self.budget_yields += 1
                    self._notify[TX].trigger()  # back after the frames and fds that wait
                    break
                self.budget_renewals += 1
                deadline = self.clock_ns() + self.BUDGET_NS
            tx = self._current_tx(ring)
            if tx is None:
                break
            self._put(tx, deadline)
        completed += self._complete_sent(ring)
        if completed:
            self.signal_used(TX, ring)
            self._checkpoint()

    def _put(self, tx: _TxChain, deadline: int) -> None:
        """As much of the chain's bytes as the buffer takes (a slice of guest RAM each), until
        `deadline` (clock_ns); those a line took already (_drop) dropped without a copy."""
        out = self.ctx.out
        while tx.left and out.room() and self.clock_ns() < deadline:
            gpa, length = tx.left[0]
            if self._drop:
                n = min(length, self._drop)
                self._drop -= n
            else:
                n = min(length, out.room())
                out.put(self.ram.read(gpa, n))
            tx.left[0] = (gpa + n, length - n)
            if n == length:
                tx.left.pop(0)

    def _current_tx(self, ring: SplitQueue) -> _TxChain | None:
        """The chain whose bytes go out next: the last taken if some of it is left, else the
        next from the ring (None: none is available)."""
        if self._tx and self._tx[-1].left:
            return self._tx[-1]
        chain = self._take(ring)
        if chain is None:
            return None
        total = sum(length for _, length in chain.readable)
        start = self._tx[-1].end if self._tx else self._tx_done
        self._tx.append(_TxChain(chain, list(chain.readable), total, start + total))
        return self._tx[-1]

    def _complete_sent(self, ring: SplitQueue) -> int:
        """Complete, in order, the chains whose every byte the line took."""
        done = 0
        while self._tx:
            end = self._tx[0].end
            if self._tx[0].left or end > self.ctx.out.emitted:
                break
            tx = self._tx.popleft()
            # Before used idx says so, in what the file took, as a checkpoint counts it
            # (BoundedOutput.taken): a restart measures the file's growth against both. In
            # `emitted`, a full disk's lost bytes put each record past the file, and a
            # restart sent the chain in flight again whole.
            self._progress.write((ring.used_idx + 1) & 0xFFFF, end - self.ctx.out.lost)
            ring.push(tx.chain.head, 0)  # transmit buffers are read only: nothing written
            self._tx_done = end
            self.bytes_out = min(self.bytes_out + tx.total, MAX_COUNTER)
            done += 1
        return done

    def _checkpoint(self) -> None:
        """A checkpoint at each completion batch: a crash restart then knows which of the
        bytes it sends again the line took already (the module docstring); at most one each
        CHECKPOINT_INTERVAL_S."""
        now = time.monotonic()
        if now - self._published < CHECKPOINT_INTERVAL_S:
            return
        self._published = now
        self.ctx.events.publish_state(self.NAME, self.save())

    def _note_progress(self, queues: tuple[int, ...] = (RX, TX)) -> None:
        """The progress page says, for the used idx of each queue, where the transmit chain
        there starts and how much input was delivered before it (progress.py)."""
        for q in queues:
            ring = self.rings[q]
            if ring is not None:
                tx = self._tx_done - self.ctx.out.lost  # what the file took (_complete_sent)
                count, stream = (tx, TRANSMIT) if q == TX else (self.bytes_in, RECEIVE)
                self._progress.write(ring.used_idx, count, stream)

    def _enable_queue(self, q: int) -> None:
        super()._enable_queue(q)
        self._note_progress((q,))

    # -- counters -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rx_dropped": self.rx_dropped,
            "rx_pending": len(self._rx),
            "tx_buffered": self.ctx.out.pending(),
            "tx_in_flight": len(self._tx),
            "bad_access": self.ctx.counters.bad_access,
        }

    # -- state ------------------------------------------------------------------------------------------
    def model_fields(self) -> dict[str, Any]:
        out = self.ctx.out
        orphans = max(0, self._tx_done - out.emitted)  # buffered bytes before any chain's
        return {
            "rx_pending": bytes(self._rx),
            "tx_sent": max(0, out.emitted - self._tx_done),
            "tx_held": out.buffered()[:orphans],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rx_dropped": self.rx_dropped,
            "resets": self.resets,
        }

    def save(self) -> VirtioPciState:
        """The transmit queue at its oldest chain not completed: a restore takes the chains
        in flight again from guest RAM (tx_sent says what of them went out)."""
        state = super().save()
        queues = list(state.queues)
        queues[TX] = replace(queues[TX], last_avail=queues[TX].used_idx)
        return replace(state, queues=tuple(queues))

    @classmethod
    def from_state(cls, ctx: DeviceContext, state: Any) -> Self:
        if len(state.tx_held) > ctx.out.room():
            raise StateError(
                f"virtio-console state: tx_held {len(state.tx_held)} > {ctx.out.room()} bytes"
            )
        device = cls(ctx)
        device._rx = bytearray(state.rx_pending)
        device.bytes_in, device.bytes_out = state.bytes_in, state.bytes_out
        device.rx_dropped, device.resets = state.rx_dropped, state.resets
        return device

    @classmethod
    def restore(cls, ctx: DeviceContext, state: Any) -> Self:
        device = super().restore(ctx, state)
        if ctx.restarted:
            device._checkpoint_taken = state  # taken up once the journal is replayed
            return device
        # The chain at the used idx starts tx_sent back: the snapshotted VM's line took that
        # much of it, this one nothing (none of it is in this output's count)
        taken = ctx.out.emitted
        device._carry_on(taken, taken + len(state.tx_held) - state.tx_sent, state.tx_held)
        device._note_progress()
        return device

    def after_restart(self) -> None:
        """The queues (the transport's), then the bytes to drop and the held bytes, and the
        input the dead process delivered since its checkpoint, dropped from the front of
        what is pending now: the checkpoint's, then the replayed INPUT frames' (a `unix:`
        peer's bytes it read since were never frames: those it delivered are in no buffer
        here, those it did not are lost). See the module docstring."""
        super().after_restart()
        then, self._checkpoint_taken = self._checkpoint_taken, None
        out = self.ctx.out
        file_skip, out.skip = out.skip, 0  # dropped from the chains as they run (_drop)
        self._resend(then, out.emitted + file_skip)
        delivered = self._delivered_since(then)
        del self._rx[:delivered]
        # the dead process's count: the progress page's next records go on from it
        self.bytes_in = min(self.bytes_in + delivered, MAX_COUNTER)
        if len(self._rx) > RX_BUFFER_MAX:  # more than a live process would have held
            self.rx_dropped = min(self.rx_dropped + len(self._rx) - RX_BUFFER_MAX, MAX_COUNTER)
            del self._rx[RX_BUFFER_MAX:]
        self._note_progress()

    def _resend(self, state: VirtioConsoleState | None, taken: int) -> None:
        """After a crash, the line having taken `taken` bytes (exact for a regular file: the
        checkpoint's count and the file's growth since): where the chain at the used ring's
        idx starts in that count, and the held bytes that go out before it (_carry_on)."""
        queue = self.queues[TX]
        # A ring whose enable the dead process may never have applied took no chain from it
        # (virtio/pci.py after_restart): a record of its idx is an older ring's
        fresh = TX in self._enabled_unconfirmed
        records = self._progress.records() if queue.enabled and not fresh else {}
        start = records.get(queue.used_idx)
        if self.ctx.prepared["output_file"] and start is not None and start <= taken:
            return self._carry_on(taken, start)  # held bytes before it: the line took them
        if state is None:
            return self._carry_on(taken, taken)  # no checkpoint: every chain, whole
        then = state.queues[TX]
        same = state.resets == self.resets and _layout(then) == _layout(queue)
        emitted = self.ctx.out.emitted  # the checkpoint's: its held bytes went out first
        if same and queue.enabled and then.enabled and queue.used_idx == then.used_idx:
            # no completion since the checkpoint: its chains in flight start tx_sent back
            # from its count, after its held bytes
            return self._carry_on(taken, emitted + len(state.tx_held) - state.tx_sent,
                                  state.tx_held)  # fmt: skip
        # Chains completed since an older checkpoint, or a driver that reset since (its
        # chain at the same used idx is another): sent again whole, none lost; of the held
        # bytes, those the line took since the checkpoint (a file's growth) are not
        return self._carry_on(taken, max(taken, emitted + len(state.tx_held)), state.tx_held)

    def _carry_on(self, taken: int, start: int, held: bytes = b"") -> None:
        """Go on from a line that took `taken` bytes, with the chain at the used idx starting
        at `start` in that count, after `held` (bytes of no chain, ending at `start`): the
        bytes of those chains the line took are dropped as they run again (_drop), those of
        `held` it did not take are buffered again. The output's count stays the line's own
        (a regular file's growth: what the next restart goes by); `start` may be below 0,
        where the line before a restore took part of that chain."""
        out = self.ctx.out
        out.emitted = taken
        self._drop = max(0, taken - start)
        if start > taken:
            out.put(held[max(0, len(held) - (start - taken)) :])
        self._tx_done = start

    def _delivered_since(self, state: VirtioConsoleState | None) -> int:
        """The input bytes receive chains got between the checkpoint and the crash: what
        the progress page says was delivered before the used idx in guest RAM, less the
        checkpoint's count; with no receive ring (a reset since), the count the reset
        recorded. Without such a record (a page from before the device wrote them), the len
        of each used entry since the checkpoint's position (device-written, still in the used
        ring unless more than a ring's worth completed); from 0 where the ring was enabled
        since (an enable starts the used ring at 0)."""
        ring = self.rings[RX]
        records = self._progress.records(RECEIVE)
        since = 0 if state is None else state.bytes_in
        if ring is None:
            # No receive ring now (the driver reset since): nothing was filled after the
            # older of the last two records but the chain the newer one was for, so the
            # older is what was delivered, less at most that chain (may repeat, never lost)
            if self.queues[RX].enabled:
                return 0  # a ring the successor could not open: as before
            if (at_reset := records.get(NO_RING)) is not None and at_reset >= since:
                return at_reset - since  # the count the dead process had at the reset
            counts = [c for c in records.values() if c >= since]
            return min(counts) - since if counts else 0
        delivered = records.get(ring.used_idx)
        if delivered is None and RX in self._enabled_unconfirmed:
            # A ring whose enable the dead process may never have applied (virtio/pci.py
            # after_restart): it completed nothing there, and the reset before that enable
            # recorded its count (an enable it applied records its own, of idx 0)
            delivered = records.get(NO_RING)
        if delivered is not None and delivered >= since:
            return delivered - since
        saved, now = None if state is None else state.queues[RX], self.queues[RX]
        reset = state is not None and state.resets != self.resets  # another session's ring
        if reset:
            log.warning("%s: the driver reset since the checkpoint: input delivered before "
                        "that may repeat", self.NAME)  # fmt: skip
        same = saved is not None and saved.enabled and _layout(saved) == _layout(now)
        then = saved.used_idx if same and not reset and saved is not None else 0
        count = (ring.used_idx - then) & 0xFFFF
        if count > ring.size:
            log.warning("%s: over %d receive completions since the checkpoint: input may "
                        "repeat", self.NAME, ring.size)  # fmt: skip
            return 0
        total = 0
        for i in range(count):
            entry = ring.used + RING_HEADER + USED_ELEM.size * ((then + i) % ring.size)
            total += self.ram.u32(entry + 4)
        return total


def _layout(queue: QueueState) -> tuple[int, int, int, int]:
    """Where a queue's ring is: the same after a checkpoint unless the driver set it up anew."""
    return queue.size, queue.desc, queue.driver, queue.device
