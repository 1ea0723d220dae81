"""DeviceChannel: the monitor's end of one device process's ZeroMQ channel (ZMTP, spoken by
the monitor itself over a UNIX socket: monitor/zmtp.py, protocol/zmtp.py).

It forwards guest accesses and control requests as frames, numbers each request,
gives it a deadline, charges slow replies to a latency budget, and checks every
reply. It keeps the device's register mirror (monitor/mirror.py) from the MIRROR frames
the device sends. Anything wrong -- a malformed frame, a wrong sequence number, a missed
deadline, slow replies past the budget, EOF -- raises ChannelError; the device's
slot (monitor/slot.py) then fails the device, whose on_crash policy decides what
happens next. A channel lives as long as one process of its device.

A device waiting on its host's disk is slow, not hung. A device that says so (`host_io`:
the flag in its progress page, protocol/models.py PROGRESS_HOST_IO_BYTE, set around each
disk call that may block) is waited for past a deadline, as long as the flag stays set,
and that wait is not charged to its latency budget: a frozen file system, a slow NFS
server or a large sync held virtio-blk in one call for seconds, and the heartbeat failed
it (with on_crash = "stop", the VM), or killed it mid-call, where SIGKILL waits for the
call anyway. QEMU and crosvm wait for their disks too. The wait is logged every
HOST_IO_LOG_S.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

from splitvmm.errors import ProtocolError, SplitvmmError
from splitvmm.monitor import zmtp
from splitvmm.monitor.budget import LatencyBudget
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.protocol import control, events, wire
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.polling import PollWindow, max_poll_ns
from splitvmm.protocol.zmtp import encode
from splitvmm.sandbox.spawn import DeviceProcess, how_ended, readable

READ_TIMEOUT_MS = 2000  # a device that does not answer a read by then has failed
# ... and one that answers every read just under that deadline stalls the vCPUs (and any
# pause waiting for them) for good. Replies slower than SLOW_REPLY_MS (a healthy round trip
# is 0.1-0.3 ms here; 50 ms is a loaded host's whole scheduling period on top) add up over
# LATENCY_WINDOW_S; more than LATENCY_BUDGET_MS of them (two replies near the deadline) is a
# failure. A healthy device, even one a guest polls back to back, never has a slow reply.
SLOW_REPLY_MS = 50
LATENCY_WINDOW_S = 10
LATENCY_BUDGET_MS = 2500
WRITE_TIMEOUT_MS = 2000  # a device that stops draining posted writes has failed
# ... and one that drains them just under that, each time, holds the writing vCPU for good: a
# post's wait for room this long is charged to its latency budget, as a slow reply is. A
# shorter one is the device at work: a guest writing an 8250 blind hands it KVM's ring (169
# writes) in one post, faster than it applies them, and a post waited ~80 ms here while it
# worked through the frames filling our send buffer; charged, it failed within seconds.
SLOW_POST_MS = 500
CONTROL_TIMEOUT_MS = 10000  # quiesce may wait for in-flight I/O to finish
READY_TIMEOUT_MS = 15000  # interpreter start + imports + sandbox entry
# A warm spare has done all that: READY after it is handed its state takes ~4 ms (a long
# journal's replay more). One that hangs is given up for a cold start well before a guest's
# access stops waiting for the restart (slot.py RESTART_WAIT_MS, READY_TIMEOUT_MS).
SPARE_READY_TIMEOUT_MS = 2000
READY_POLL_MS = 100  # how often we look whether it died before READY
EXITED_GRACE_MS = 50  # for the last frame of a device that exited (a libzmq peer's I/O thread)
# `ctl devices` asks each device for its counters (stats) and waits this long: a device busy
# serving a long queue answers later, and its late answer is dropped when it comes (at most
# MAX_LATE_STATS of them waiting, with the heartbeat's pings to a device in host I/O; a
# device that leaves more unanswered has failed).
STATS_TIMEOUT_MS = 200
MAX_LATE_STATS = 8
# A process seen dead (pidfd) may have answered just before: its frames are in the kernel's
# socket buffer (the connection's end after them), or, from a libzmq peer (any ZeroMQ PAIR
# socket may be a device's end), still in its I/O thread.
GONE_WAIT_MS = 100
MAX_DRAINED = 64  # frames one drain_events() call handles at most
# How long (this thread's CPU) one drain_events() call may take: the rest waits for the next
# call. Each frame is checked whole (up to control.MAX_DEVICE_FRAME, ~30 ms for a hostile
# 64 KiB publish), so a count alone let a device hold a vCPU's mirrored read for seconds.
DRAIN_LIMIT_S = SLOW_REPLY_MS / 1000


_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT

NO_EVENTS = "sent an event, which this channel takes none of"
HOST_IO_LOG_S = 10  # a wait past a deadline on a device in a host I/O call: logged this often

log = logging.getLogger("splitvmm.channel")


class ChannelError(SplitvmmError):
    """The device broke its channel (str() says how); the device has failed."""


class _ReplyLate(ChannelError):
    """No reply by the request's deadline (and no host I/O call to wait on), or events
    around it whose handling ran past it: the one ChannelError a stats request takes for a
    late answer rather than a broken device."""


class _InHostIo(Exception):
    """Past a request's deadline, the device is inside a host I/O call (ping(), stats()):
    `sent` says whether the request left (then its answer may still come), or waited in a
    full queue (then none will)."""

    def __init__(self, sent: bool) -> None:
        super().__init__()
        self.sent = sent


class DeviceChannel:
    """Not thread-safe: the slot serializes every call (vCPUs share a device)."""

    def __init__(
        self,
        model: str,
        endpoint: str,
        listener: int,
        on_event: Callable[[events.Event], None] | None = None,
        host_io: Callable[[], bool] | None = None,
        access_poll: PollWindow | None = None,
    ) -> None:
        """Serve the channel on `listener`, the device's listening socket (made before the
        device started: it may have connected already, and the kernel queued its connection
        in the backlog). We own `listener` from now on. `access_poll`: the window a vCPU's
        wait for its access's reply looks through first (the slot's, kept across its
        device's processes); a new one of max_poll_ns() without.
        `on_event` gets each event the device sends unasked (protocol/events.py), checked;
        without one, an event breaks the channel like any frame nobody asked for.
        `host_io` says whether the device is inside a host I/O call now (the module
        docstring); None: it never is."""
        self.endpoint = endpoint
        self._host_io = host_io
        # Set once the VM stops (give_up_host_io): no more waiting on a host I/O call.
        self._gave_up_host_io = threading.Event()
        self._waited_on_host_io = False  # by the last request, past its deadline
        self._host_io_since = self._host_io_logged = 0.0  # that wait's start, its last log
        self._on_event = on_event
        self._model = model  # what a saved state must say it is
        descriptor = MODELS[model]
        self._mirrored, self._window = descriptor.mirrored, descriptor.transport.size
        # this process's: a new one starts empty
        self.mirror = RegisterMirror(self._mirrored, descriptor.quiet_while)
        # Frames posted since the last request: each may bring one MIRROR (the device's
        # values after it), over the events a request may meet (_request).
        self._posted = 0
        self._seq = 0
        self._budget = LatencyBudget(LATENCY_BUDGET_MS, LATENCY_WINDOW_S, SLOW_REPLY_MS)
        self._checked_ms = 0.0  # drains' event checking not charged yet (_charge_drain)
        self._events_ms = 0.0  # the CPU the last request's events took, its first one's not
        self._events_seen = 0  # events (not MIRRORs) the last request handled
        self._link = zmtp.ZmtpLink(listener, control.MAX_DEVICE_FRAME)
        # A vCPU's wait for its access's reply looks before it sleeps (protocol/polling.py):
        # the reply of a device that is running comes within tens of microseconds.
        self.access_poll = PollWindow(max_poll_ns()) if access_poll is None else access_poll
        # A request's wait: the link's fd (for reading) and the process's pidfd
        self._poller = select.poll()
        self._polled = self._link.fd
        self._poller.register(self._polled, _POLLIN)
        self._pidfd: int | None = None
        # Requests given up on without a failure, whose answers are dropped when they come:
        # seq -> the reply's op ("counters": stats; "pong": a ping to a device in host I/O)
        self._late: dict[int, str] = {}
        # The last state this process published: what its CHECKPOINT frames say still holds.
        self._published: events.Published | None = None

    def watch_process(self, process: DeviceProcess) -> None:
        """A request fails as soon as `process` ends (its pidfd polls readable), not at its
        deadline: a vCPU waiting on a device that died is told at once."""
        if self._pidfd is None and process.pidfd >= 0:
            self._pidfd = process.pidfd
            self._poller.register(process.pidfd, _POLLIN)

    def wait_ready(self, process: DeviceProcess, timeout_ms: int = READY_TIMEOUT_MS) -> None:
        """READY within `timeout_ms`, or ChannelError saying why not (the device's own words,
        truncated)."""
        start = time.monotonic()
        while not self._frame_within(READY_POLL_MS):
            # Its connection ended (_frame_within returns at once from then on): no frame
            # can come. Its process is ending, most likely: its warden, whose pidfd we hold,
            # ends a moment after the device proper, whose exit closed the connection.
            closed = self._link.closed
            if closed:
                process.ended(GONE_WAIT_MS / 1000)
            waited = round((time.monotonic() - start) * 1000)
            try:
                status = process.poll()
            except SplitvmmError as e:  # it ended, and its launcher is gone: as slot.py _how
                raise ChannelError(
                    f"ended before it was ready; its exit status is unknown ({e})"
                ) from None
            # A device that refuses to start sends why, then exits: the frame may reach our
            # socket just after the poll gave up, so it is looked for once more.
            if status is not None and self._frame_within(EXITED_GRACE_MS):
                break
            # How it ended, with no "within N ms": the wait began after its start, and the
            # end of a process dead by then read "exited with status 3 within 0 ms".
            if status is not None:
                raise ChannelError(f"{how_ended(status)} before it was ready")
            # The VM is stopping (give_up_host_io: a stop signal while devices start): its
            # READY is waited for no longer, nor is the stop held up to READY_TIMEOUT_MS
            stopping = self._gave_up_host_io.is_set()
            if closed or stopping or waited >= timeout_ms:
                if closed or not stopping:
                    why = "closed its end of the channel" if closed else "did not start"
                else:
                    why = "was given up as the VM stopped"
                raise ChannelError(f"{why} within {waited} ms, before it was ready")
        buf = self._link.take()
        try:
            if control.is_control(buf):
                msg = control.decode(buf)
                if msg["op"] != "error":  # only a Failed frame says why it cannot start
                    raise ProtocolError(f"sent {msg['op']!r} where READY was expected")
                text = msg["message"][: control.MAX_ERROR_TEXT]
                raise ProtocolError(f"refused to start: {text!r}")
            wire.decode_ready(buf)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None

    # -- requests ------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        seq = self._next_seq()
        reply = self._access(wire.encode_read(seq, offset, size))
        try:
            data, stamp = wire.decode_read_reply(reply, seq, size)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None
        if stamp is not None:
            self.mirror.restamp(stamp)
        return data

    def sync(self, drain: bool = False) -> None:
        """Wait until the device applied everything sent so far (posted writes included);
        `drain`: the last request before it ends, its slow output line given time too."""
        seq = self._next_seq()
        reply = self._access(wire.encode_sync(seq, drain))
        try:
            wire.decode_sync_done(reply, seq)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None

    def control(
        self, op: str, timeout_ms: int, args: dict[str, object] | None = None
    ) -> dict[str, object]:
        """A control request (quiesce, save, resume, retry, fault or link with `args`), its
        checked reply."""
        seq = self._next_seq()
        frame = control.encode({"op": op, "seq": seq, **(args or {})})
        reply = self._request_charged(frame, timeout_ms)
        try:
            checked = control.check_reply(control.decode(reply), op, seq, self._model)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None
        if op == "save":
            self._check_state_version(checked)
        return checked

    def ping(self, timeout_ms: int) -> bool:
        """The heartbeat: True once the device answered within `timeout_ms`; False if it is
        inside a host I/O call, past the deadline or before it (one ping at a time waits for
        it; its answer is dropped when it comes): the supervisor, which pings every device
        from one thread, goes on; ChannelError if it is hung."""
        if "pong" in self._late.values() and self._host_io is not None and self._host_io():
            return False
        if len(self._late) >= MAX_LATE_STATS:
            raise ChannelError(f"left {MAX_LATE_STATS} requests unanswered")
        seq = self._next_seq()
        try:
            reply = self._request_charged(
                control.encode({"op": "ping", "seq": seq}), timeout_ms, False
            )
        except _InHostIo as e:
            if e.sent:
                self._late[seq] = "pong"
            return False
        try:
            control.check_reply(control.decode(reply), "ping", seq, self._model)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None
        return True

    def stats(self, timeout_ms: int = STATS_TIMEOUT_MS) -> dict[str, int] | None:
        """The device's counters (Device.stats(), checked), or None if it does not answer
        within `timeout_ms`: that is no failure (its answer is dropped when it comes)."""
        if "counters" in self._late.values() and self._host_io is not None and self._host_io():
            return None  # one stats request at a time waits on a device in host I/O
        if len(self._late) >= MAX_LATE_STATS:
            raise ChannelError(f"left {MAX_LATE_STATS} requests unanswered")
        seq = self._next_seq()
        try:
            reply = self._request_charged(
                control.encode({"op": "stats", "seq": seq}), timeout_ms, False
            )
        except (_ReplyLate, _InHostIo) as e:
            # Only lateness is no failure: a frame around the request that breaks the
            # protocol (a bad publish or MIRROR, a stall it may not ask for) fails the device
            # here as around any other request, else a device could time its garbage to
            # the stats requests it sees come.
            if isinstance(e, _ReplyLate) and self._pidfd is not None and readable(self._pidfd, 0):
                raise  # it ended: its supervisor says how
            if not isinstance(e, _InHostIo) or e.sent:
                self._late[seq] = "counters"
            return None
        try:
            msg = control.check_reply(control.decode(reply), "stats", seq, self._model)
        except ProtocolError as e:
            raise ChannelError(str(e)) from None
        return cast(dict[str, int], msg["counters"])  # checked: control.CountersReply

    def post(self, frame: bytes) -> None:
        """Send a frame that gets no reply (a write, host input). It waits only while the
        device's queue is full, at most WRITE_TIMEOUT_MS, and not at all once its process
        has ended (its pidfd): a posted write to a dead device held the slot's lock, and
        every vCPU's access behind it, for the whole timeout (seen as 2 s restart stalls)."""
        self.post_many((frame,))

    def answer(self, frame: bytes) -> None:
        """A frame that answers one of the device's events (a route request's route_done).
        Not a guest's frame: no MIRROR follows it, so it does not widen the next request's
        allowance of events (_posted: a device asking for routes grew it by one an answer,
        without bound). And no wait past WRITE_TIMEOUT_MS on a device that says it is in
        host I/O: the request its events came with may be the supervisor's ping, which must
        never wait on one device; a device that asks must take its answers."""
        try:
            self._send(encode(frame), "an answer to its event", wait_host_io=False)
        except _InHostIo:
            raise ChannelError(
                f"took no answer to its event within {WRITE_TIMEOUT_MS} ms"
            ) from None

    def post_many(self, frames: Sequence[bytes]) -> None:
        """Posted frames, in order, each a ZMTP message, in one write: one wake-up of the
        device for all. A wait of SLOW_POST_MS or more for room in its full queue is charged
        to its latency budget as a slow reply is: a device that made room just under
        WRITE_TIMEOUT_MS each time held the vCPU that wrote for ~1.5 s a write, for good, and
        was never failed."""
        self._waited_on_host_io = False  # a wait on its disk here is this post's own
        waited_ms = self._send(b"".join(map(encode, frames)), "a posted write")
        if waited_ms >= SLOW_POST_MS and not self._waited_on_host_io:  # (the disk's: not its)
            self._charge(waited_ms)
        self._posted += len(frames)

    def _send(self, data: bytes, what: str, wait_host_io: bool = True) -> float:
        """Send `data`, ZMTP messages (protocol/zmtp.py encode; `what` they are, for
        messages), waiting only while the device has not connected or greeted yet, or its
        socket buffer is full, at most WRITE_TIMEOUT_MS, and not at all once its process has
        ended (its pidfd) or its connection has: a frame to a device that has just died would
        otherwise wait out the whole timeout, holding the slot's lock. A device inside a host
        I/O call is waited for past that, as by _request, or, without `wait_host_io`,
        _InHostIo is raised (`sent`: whether the message was taken, to go out before anything
        else): the supervisor's ping must not wait on one device's disk (or on a device that
        says it is in one and never drains). The ms it waited for room (0: none)."""
        link = self._link
        taken = link.send(data)
        if taken and link.flush():
            return 0.0
        start = time.monotonic()
        deadline = start + WRITE_TIMEOUT_MS / 1000
        while True:
            if self._pidfd is not None and readable(self._pidfd, 0):
                raise ChannelError(f"its process ended with {what} unsent")
            if link.closed:
                raise ChannelError(f"closed its channel with {what} unsent")
            left_ms = round((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                if not self._still_in_host_io():  # its queue may wait on its disk
                    raise ChannelError(f"stopped taking frames (none within {WRITE_TIMEOUT_MS} ms)")
                if not wait_host_io:
                    raise _InHostIo(sent=taken)
                deadline = time.monotonic() + WRITE_TIMEOUT_MS / 1000
                continue
            # Its greeting and READY first (then we may send); then room in its buffer, and
            # meanwhile what it sends, a frame at most (its connection's end among it).
            if not link.reader.ready:
                self._poll(left_ms, _POLLIN)
            else:  # a frame held: what follows it waits until it is taken
                self._poll(left_ms, _POLLOUT if self._frame_ready() else _POLLOUT | _POLLIN)
            self._frame_ready()
            if not taken:
                taken = link.send(data)
            if taken and link.flush():
                return (time.monotonic() - start) * 1e3

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _access(self, frame: bytes) -> bytes:
        """A read or sync, which a vCPU waits for: its deadline, then the latency budget. A
        slow one is charged whole; under SLOW_REPLY_MS, the CPU its events took past the
        first (_request's events_ms, _timed_event) adds up across accesses as a drain's
        checking does (_sum_checked): a device answering each of the guest's accesses with
        ~255 route requests, each a whole KVM_SET_GSI_ROUTING (~40 us-0.2 ms here) holding
        the GIL and the VM's routes, cost the vCPU ~10-50 ms an access, for ever, and was
        never charged. (Thread CPU, not wall time: a route's ioctl waits out a grace period
        besides, ~1.4-3x its CPU here, which is not counted.)"""
        start = time.monotonic()
        reply = self._request(frame, READ_TIMEOUT_MS, poll=self.access_poll)
        if not self._waited_on_host_io:  # the disk's slowness is not the device's
            waited_ms = (time.monotonic() - start) * 1e3
            if waited_ms >= SLOW_REPLY_MS:
                self._charge(waited_ms)
            elif self._events_ms:
                self._sum_checked(self._events_ms)
        return reply

    def _request_charged(self, frame: bytes, timeout_ms: int, wait_host_io: bool = True) -> bytes:
        """_request for a ping, stats or control request, whose waits no vCPU makes and none
        is charged: the CPU this thread spent on it, which is the device's events before its
        reply, is charged as a drain's is, summed under SLOW_REPLY_MS too. Uncharged, a
        device that sent ~1 s of costly events before each pong (within the ping's deadline)
        held the supervisor, and the GIL every vCPU needs, for that long each heartbeat;
        charged from SLOW_REPLY_MS up only, one that paced them to ~40 ms a request (a
        route request is a whole KVM_SET_GSI_ROUTING) was never charged."""
        start = time.thread_time()  # this thread's CPU: not the host's or the GIL's stalls
        try:
            return self._request(frame, timeout_ms, wait_host_io)
        finally:
            spent_ms = (time.thread_time() - start) * 1e3
            self._charge_drain(spent_ms, spent_ms)

    def _charge(self, waited_ms: float) -> None:
        """Charge a wait on the device (or the time its events took) to its latency budget;
        ChannelError once the budget is spent."""
        over_ms = self._budget.charge(waited_ms)
        if over_ms is not None:
            raise ChannelError(
                f"its slow replies took {over_ms:.0f} ms within {LATENCY_WINDOW_S} s, over "
                f"the budget of {LATENCY_BUDGET_MS} ms"
            )

    def _request(
        self,
        frame: bytes,
        timeout_ms: int,
        wait_host_io: bool = True,
        poll: PollWindow | None = None,
    ) -> bytes:
        """Send a frame and wait for its one reply, within `timeout_ms`; the device's events
        before it (sent unasked, or while it worked on this request) are handled first, in
        the order sent, those waiting unread included (within the same allowance). Not
        drained before the send: that would read the socket once more (a read(2) that finds
        nothing, ~2 us) for what the loop reads anyway. Past the deadline, a device inside a
        host I/O call is waited for (the module docstring), or, without `wait_host_io`,
        _InHostIo is raised."""
        self._waited_on_host_io = False
        self._events_ms, self._events_seen = 0.0, 0
        try:
            self._send(encode(frame), "a request", wait_host_io=wait_host_io)
            deadline = time.monotonic() + timeout_ms / 1000
            allowed, self._posted = events.MAX_EVENTS_PER_REQUEST + self._posted, 0
            for taken in range(allowed + 1):
                while True:
                    try:
                        buf = self._recv(deadline, poll, again=taken > 0)
                        break
                    except _NoFrame:
                        if self._link.closed or not self._still_in_host_io():
                            raise
                        if not wait_host_io:
                            raise _InHostIo(sent=True) from None
                    deadline = time.monotonic() + timeout_ms / 1000  # wait on, a slice more
                # Replies are binary (an access's: no event, checked first, on every access),
                # or control of another op
                if wire.is_access_reply(buf) or not self._timed_event(buf):
                    self.mirror.news_taken()  # everything the device sent before its reply
                    return buf
                # The deadline bounds the events too: _recv returns a frame already there
                # however late, and checking each one (up to MAX_DEVICE_FRAME) takes time.
                if time.monotonic() > deadline:  # late: handling its events took the time
                    raise _ReplyLate(f"kept sending events past its {timeout_ms} ms deadline")
            raise ChannelError(f"sent more than {allowed} events around one request")
        except _NoFrame:
            if self._dropped():
                raise ChannelError("closed its end of the channel") from None
            raise _ReplyLate(f"no reply within {timeout_ms} ms") from None

    @property
    def connection_ended(self) -> bool:
        """Whether the device's connection has ended, as far as read or written: what it sent
        before may still wait unread."""
        return self._link.closed

    def _dropped(self) -> bool:
        """Whether the device's connection has ended (its process is alive: _recv answers
        for one that ended). Looked at past a deadline only."""
        self._frame_ready()  # the connection's end comes after the device's last bytes
        return self._link.closed

    def give_up_host_io(self) -> None:
        """The VM is stopping: a request past its deadline is no longer waited for because
        the device says it is inside a host I/O call. The flag is the device's to write, so
        a device that sets it and never answers held a vCPU's read, a quiesce and the
        teardown's sync for ever, and the monitor never exited. Safe from any thread (a
        waiting request holds the slot's lock); the wait in progress ends with its slice."""
        self._gave_up_host_io.set()

    def _still_in_host_io(self) -> bool:
        """Whether the device, past a deadline, says it is inside a host I/O call: then it
        is waited for (the module docstring), and the wait logged every HOST_IO_LOG_S."""
        if self._host_io is None or self._gave_up_host_io.is_set() or not self._host_io():
            return False
        now = time.monotonic()
        if not self._waited_on_host_io:
            self._waited_on_host_io, self._host_io_since, self._host_io_logged = True, now, now
        elif now - self._host_io_logged >= HOST_IO_LOG_S:
            self._host_io_logged = now
            log.warning(
                "device %s: waiting %.0f s past a deadline for a host I/O call of its disk "
                "(slow storage, not a hung device)",
                Path(self.endpoint).stem,
                now - self._host_io_since,
            )
        return True

    def _frame_ready(self, chunks: int = zmtp.PUMP_CHUNKS) -> bool:
        """Whether a whole frame from the device waits (ZmtpLink.frame_ready: `chunks`, how
        many reads it may make, 0 for none); ChannelError, and its connection ended, if it
        broke ZMTP."""
        try:
            return self._link.frame_ready(chunks)
        except ProtocolError as e:
            self._link.close_peer()
            raise ChannelError(str(e)) from None

    def _poll(self, timeout_ms: int, events: int = _POLLIN, pid: bool = True) -> dict[int, int]:
        """Wait up to `timeout_ms` for the link's fd (`events`) or, with `pid`, the process's
        end: the fds ready. The request's wait (for reading, and the end) keeps its poller."""
        fd = self._link.fd
        if pid and events == _POLLIN:
            poller = self._poller
            if fd != self._polled:  # the device's connection, accepted on the listener
                self._poller.unregister(self._polled)
                self._poller.register(fd, _POLLIN)
                self._polled = fd
        else:
            poller = select.poll()
            poller.register(fd, events)
            if pid and self._pidfd is not None:
                poller.register(self._pidfd, _POLLIN)
        return dict(poller.poll(timeout_ms))

    def _frame_within(self, timeout_ms: int) -> bool:
        """Whether a whole frame comes within `timeout_ms` (then _link.take() gives it)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._frame_ready():
            left_ms = round((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or self._link.closed:
                return False
            self._poll(left_ms, pid=False)
        return True

    def _recv(self, deadline: float, poll: PollWindow | None = None, again: bool = False) -> bytes:
        """The next frame by `deadline` (_NoFrame if none came, at once once the connection
        has ended); ChannelError if the process ended first. With `poll`, looked for through
        its window before the wait sleeps (protocol/polling.py); `again`, through what is left
        of the window the request's first frame was looked for in (PollWindow.poll)."""
        link = self._link
        if poll is not None and poll.poll(lambda: self._frame_ready() or link.closed, again):
            return self._recv_waiting(deadline)  # caught: a frame, or the connection's end
        frame = self._recv_waiting(deadline)
        if poll is not None:
            poll.woke()
        return frame

    def _recv_waiting(self, deadline: float) -> bytes:
        """_recv, asleep in poll(2) until a frame or the process's end comes."""
        link = self._link
        while True:
            if self._frame_ready(chunks=0):  # in what was read: no system call
                return link.take()
            if link.closed:  # no frame can come; the process may be ending
                if self._pidfd is not None and readable(self._pidfd, GONE_WAIT_MS / 1000):
                    raise ChannelError("its process ended during a request")
                raise _NoFrame()
            left_ms = max(0, round((deadline - time.monotonic()) * 1000))
            fd = link.fd
            ready = self._poll(left_ms)
            if ready.get(fd) and self._frame_ready():
                return link.take()
            if self._pidfd is not None and ready.get(self._pidfd):
                return self._last_words()
            if left_ms == 0:
                raise _NoFrame()

    def _last_words(self) -> bytes:
        """What a process that ended during a request sent before it ended, if anything: its
        bytes are in the kernel's socket buffer, before the connection's end."""
        if self._frame_within(GONE_WAIT_MS):
            return self._link.take()
        raise ChannelError("its process ended during a request")

    def drain_events(self, limited: bool = True) -> None:
        """Handle what the device sent while nobody asked: events only; any other frame
        breaks the channel. At most MAX_DRAINED frames a call, and no more once DRAIN_LIMIT_S has
        passed: a device that keeps sending cannot hold the caller here (a vCPU, or the
        supervisor, which watches every device); what it sends meanwhile waits for the next
        call. The CPU time the drain took (this thread's: the host's preemptions and the
        GIL's waits are not the device's doing) is charged to its budget as a slow reply's
        wait is. `limited`=False: a process that ended, whose last frames are all wanted."""
        self.mirror.news_taken()
        start = time.thread_time()  # this thread's CPU: not the host's or the GIL's stalls
        checked = 0.0  # of it, checking the events (the rest is reading the socket)
        for _ in range(MAX_DRAINED):
            if limited and time.thread_time() - start > DRAIN_LIMIT_S or not self._frame_ready():
                break
            began = time.thread_time()
            if not self._handled_event(self._link.take()):
                raise ChannelError("sent a frame nobody asked for")
            checked += time.thread_time() - began
        if limited:  # what its events cost us, as a slow reply would: a device that keeps
            # sending costly ones has failed
            self._charge_drain((time.thread_time() - start) * 1e3, checked * 1e3)

    def _charge_drain(self, spent_ms: float, checked_ms: float) -> None:
        """A drain's CPU, `checked_ms` of it the events' checking: charged whole from
        SLOW_REPLY_MS up, as a slow reply is. Under it, the checking adds up across drains and
        is charged once the sum reaches SLOW_REPLY_MS: a device pacing costly events to just
        under the threshold each drain (on a vCPU's thread for a mirrored read, the
        write-behind flusher's, the console's) was never charged (4.5 s of the monitor's CPU
        in 150 drains). An honest drain is mostly its read of the socket, never summed: a
        polled 8250's 16 KiB took ~2100 drains and 71 events, ~40 ms of CPU."""
        if spent_ms >= SLOW_REPLY_MS:
            self._charge(spent_ms)
            return
        self._sum_checked(checked_ms)

    def _sum_checked(self, checked_ms: float) -> None:
        """Add the CPU that checking a device's events took; charged once it reaches
        SLOW_REPLY_MS (_charge_drain)."""
        self._checked_ms += checked_ms
        if self._checked_ms >= SLOW_REPLY_MS:
            checked, self._checked_ms = self._checked_ms, 0.0
            self._charge(checked)

    def _timed_event(self, buf: bytes) -> bool:
        """_handled_event for a frame that is no access reply; the CPU of each event after a
        request's first added to its events_ms (_access). The first is free: an honest device
        sends one at most for the access that caused it (a write to its MSI-X table, which it
        must ask a route for, each time: a guest rewriting one entry in a loop made its honest
        device pay for every KVM_SET_GSI_ROUTING, and fail). Nor a MIRROR, whose check is
        bounded: no clock is read on a vCPU's way through a mirrored register
        (CLOCK_THREAD_CPUTIME_ID is a system call)."""
        if wire.is_mirror(buf):
            return self._handled_event(buf)
        self._events_seen += 1
        if self._events_seen == 1:
            return self._handled_event(buf)
        began = time.thread_time()
        handled = self._handled_event(buf)
        self._events_ms += (time.thread_time() - began) * 1e3
        return handled

    def _handled_event(self, buf: bytes) -> bool:
        """Whether `buf` was an event, a MIRROR or a CHECKPOINT, now handled (decoded once:
        events.event_in, wire.decode_mirror, wire.decode_checkpoint)."""
        if wire.is_access_reply(buf):  # first: what a vCPU's read waits for
            return False
        if wire.is_mirror(buf):
            self._take_mirror(buf)
            return True
        if wire.is_checkpoint(buf):
            if self._on_event is None:
                raise ChannelError(NO_EVENTS)
            event: events.Event | None = self._checkpoint_event(buf)
        else:
            try:
                event = events.event_in(buf, self._model)
                if event is None and self._late and control.is_control(buf):
                    late = control.decode(buf)
                    if self._late.get(late["seq"]) == late["op"]:
                        del self._late[late["seq"]]  # an answer given up on
                        return True
            except ProtocolError as e:  # a broken control frame
                raise ChannelError(f"bad event: {e}") from None
        if event is None:
            return False
        if self._on_event is None:
            raise ChannelError(NO_EVENTS)
        if type(event) is events.Published:
            self._check_state_version(event.state)
            self._published = event
        self._on_event(event)
        return True

    def _check_state_version(self, state: Mapping[str, object]) -> None:
        """A state document (a save's, a publish's) in the version its model saves: a device
        of this release writes no other (devprocs/base.py checks each State against its
        descriptor), and a snapshot holding another would pass `snapshot verify`, then fail
        its restore, or a restart would hand it to the next process."""
        expected = MODELS[self._model].state_version
        if state["version"] != expected:
            raise ChannelError(
                f"sent a state of version {state['version']}, where a {self._model} device "
                f"saves version {expected}"
            )

    def _checkpoint_event(self, buf: bytes) -> events.Published:
        """A CHECKPOINT: the state this process published last, at a later point."""
        try:
            applied, emitted = wire.decode_checkpoint(buf)
        except ProtocolError as e:
            raise ChannelError(f"bad checkpoint: {e}") from None
        if self._published is None:
            raise ChannelError("sent a checkpoint before it published any state")
        return events.Published(self._published.state, applied, emitted)

    def _take_mirror(self, buf: bytes) -> None:
        if not self.mirror.declared:
            raise ChannelError(f"sent a register mirror, but a {self._model} mirrors none")
        try:
            self.mirror.take(wire.decode_mirror(buf, self._mirrored, self._window))
        except ProtocolError as e:
            raise ChannelError(f"bad register mirror: {e}") from None

    def close(self) -> None:
        self._link.close()
        Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


class _NoFrame(Exception):
    """No frame came by the deadline (or can come: the connection ended)."""
