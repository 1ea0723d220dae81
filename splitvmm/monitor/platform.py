"""The two tiny platform devices that end the VM, kept in the monitor on purpose.

They parse no guest data beyond one byte and their only effect is to stop
the machine, which only the monitor can do.
"""

from __future__ import annotations

from collections.abc import Callable

# i8042 (PS/2 controller) command 0xFE pulses the CPU reset line; Linux uses it for reboot=k.
I8042_CMD_RESET = 0xFE
I8042_STATUS_IDLE = 0x00  # output buffer empty, input buffer empty


class DebugExit:
    """QEMU's isa-debug-exit: a write of V ends the VM with exit status (V << 1) | 1."""

    name = "debug-exit"

    def __init__(self, stop: Callable[[int, str], None]) -> None:
        self._stop = stop

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        self._stop((value << 1) | 1, f"guest wrote {value:#x} to the debug-exit port")


class I8042:
    """Just enough of the PS/2 controller for a reset: status reads idle, 0xFE resets."""

    name = "i8042"
    WINDOW = 5  # ports 0x60..0x64; only the first (data) and last (command/status) decode

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes([I8042_STATUS_IDLE]) * size if offset == 4 else b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == 4 and data[0] == I8042_CMD_RESET:
            self._reset()
