"""The device side of fault injection (protocol/faults.py): count frames, fire once."""

from __future__ import annotations

import ctypes
import os
import select

__all__ = ["FaultInjector", "crash", "os", "select"]  # tests patch os and select

from splitvmm.protocol.faults import EXIT_STATUS, Fault


class FaultInjector:
    """The fault armed in this process, if any, and the access frames received since."""

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault
        self.frames = 0

    def arm(self, fault: Fault) -> None:
        """Arm `fault` (replacing any), counting frames from now."""
        self.fault, self.frames = fault, 0

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
