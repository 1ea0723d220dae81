"""Why a VM stopped: a typed outcome the CLI turns into an exit status and a message."""

from __future__ import annotations

from splitvmm.record import Struct

# `splitvmm up` exit statuses. Debug-exit statuses are always odd ((v << 1) | 1),
# so the monitor's own outcomes use even numbers.
EXIT_CLEAN = 0  # i8042 reset / guest power-off
EXIT_VM_FAULT = 4  # triple fault, emulation failure, failed entry, device failure


class Outcome(Struct, frozen=True):
    status: int
    message: str

    @classmethod
    def fault(cls, message: str) -> Outcome:
        return cls(EXIT_VM_FAULT, message)
