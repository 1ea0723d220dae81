"""The device side of fault injection (protocol/faults.py): count frames, fire once; an
io-error goes to the model's requests (RequestFaults)."""

from __future__ import annotations

import collections
import ctypes
import os
import select

__all__ = ["FaultInjector", "RequestFaults", "crash", "os", "select"]  # tests patch os, select

from splitvmm.errors import ProtocolError
from splitvmm.protocol.faults import EXIT_STATUS, Fault


class RequestFaults:
    """The io-error fault armed in a model that serves requests (virtio-blk), if any: which
    of its next requests fail (protocol/faults.py). One at a time: arming replaces it.

    A request is known by its place: its queue's ring (a reset makes a new one) and that
    ring's count of chains taken, itself included (mod 2^16, far more than `window`). A
    stall gives the chain it met, and every one taken after it, back to the ring
    (virtio/pci.py), and they are asked about again when taken again: the last `window`
    requests asked about (the most a model has in flight, all a stall can give back) keep
    their answer, so that one taken again is counted once and told the same, even after the
    fault is spent."""

    def __init__(self, window: int = 1) -> None:
        self.armed = False  # checked first on every request: the rest costs nothing then
        self._fault: Fault | None = None
        self._seen = self._left = 0
        self.injected = 0  # requests failed so far
        self._told: collections.deque[tuple[object, int, bool]] = collections.deque(maxlen=window)

    def arm(self, fault: Fault) -> None:
        self._fault, self._seen, self._left, self.armed = fault, 0, fault.count, True

    def fails(self, kind: str | None, ring: object, place: int) -> bool:
        """Whether a request of `kind` (read, write, flush; None: one no fault counts, such
        as GET_ID), taken as chain `place` of `ring`, fails now. Call it once per request
        taken, as it is served."""
        for told_ring, told_place, failed in self._told:
            if told_ring is ring and told_place == place:
                return failed  # taken again after a stall: the answer it had
        failed = self._counts(kind)
        self._told.append((ring, place, failed))
        # Armed until no request it failed can be taken again
        self.armed = self._fault is not None or any(f for _, _, f in self._told)
        return failed

    def _counts(self, kind: str | None) -> bool:
        fault = self._fault
        if fault is None or kind is None or fault.on not in ("any", kind):
            return False
        self._seen += 1
        if self._seen < fault.after:
            return False
        self._left -= 1
        if not self._left:
            self._fault = None
        self.injected += 1
        return True


class FaultInjector:
    """The fault armed in this process, if any, and the access frames received since;
    `requests`: the model's RequestFaults, which an io-error arms (None: it has none)."""

    def __init__(self, fault: Fault | None = None, requests: RequestFaults | None = None) -> None:
        self.fault: Fault | None = None
        self.frames = 0
        self.requests = requests
        if fault is not None:
            self.arm(fault)

    def arm(self, fault: Fault) -> None:
        """Arm `fault` (replacing any of its sort), counting frames, or requests, from now;
        ProtocolError for an io-error where the model serves no requests."""
        if fault.kind != "io-error":
            self.fault, self.frames = fault, 0
        elif self.requests is None:
            raise ProtocolError("an io-error fault needs a model that serves requests")
        else:
            self.requests.arm(fault)

    def received(self) -> None:
        """An access frame came in, before it is applied: `exit` fires here."""
        if self.fault is None:
            return
        self.frames += 1
        if self.fault.kind == "exit" and self.frames >= self.fault.after:
            os._exit(EXIT_STATUS)  # mid-request: the frame is neither applied nor answered

    def awaits_reply(self) -> bool:
        """A fault that fires at a reply (`delay`, `drop`) is armed: reads must reach the
        device, not the monitor's register mirror (runtime.MirrorPublisher)."""
        return self.fault is not None and self.fault.kind in ("delay", "drop")

    def send_reply(self) -> bool:
        """Before a reply: False if it is dropped. `delay` and `drop` fire at the first reply
        at or after their frame (a write gets no reply)."""
        fault = self.fault
        if fault is None or fault.kind not in ("delay", "drop") or self.frames < fault.after:
            return True
        self.fault = None
        if fault.kind == "delay":
            select.poll().poll(fault.delay_ms)  # poll() with no fds: the sandbox allows it
        return fault.kind == "delay"

    def answered(self) -> None:
        """A frame was applied and answered: `crash` fires here."""
        fault = self.fault
        if fault is not None and fault.kind == "crash" and self.frames >= fault.after:
            crash()


# A non-canonical x86-64 address: no mapping can ever hold it (address 0 can be mapped, with
# vm.mmap_min_addr = 0), and a read of it is a general-protection fault: SIGSEGV.
NON_CANONICAL = 1 << 63


def crash() -> None:
    """Die by SIGSEGV: a fault the CPU raises, which the kernel forces even on pid 1 of a PID
    namespace (protocol/faults.py says why not raise())."""
    ctypes.c_char.from_address(NON_CANONICAL).value  # noqa: B018 (the read is the point)
