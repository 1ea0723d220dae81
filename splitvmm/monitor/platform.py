"""The tiny platform devices that end the VM, kept in the monitor on purpose.

They parse no guest data beyond one byte and their only effect is to stop
the machine, which only the monitor can do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# i8042 (PS/2 controller) commands 0xF0-0xFF pulse low the output port bits whose bits 3:0 in
# the command are clear (IBM PC AT Technical Reference); output bit 0 is the CPU reset line, so
# every even one resets. Linux's reboot=k writes 0xFE.
I8042_CMD_PULSE_OUTPUT = 0xF0
# Command 0xD1 writes the output port: the next byte on the data port is its new value (same
# reference), so a 0 in its bit 0 resets as well. Its bit 1, the A20 gate, is ignored: KVM has
# no A20 gate (addresses never wrap).
I8042_CMD_WRITE_OUTPUT = 0xD1
I8042_OUTPUT_RESET = 1 << 0
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
    """Just enough of the PS/2 controller for a reset: status reads idle, a pulse of the
    reset line (0xFE, or any pulse command with bit 0 clear) resets, and so does an output
    port written (0xD1) with bit 0 clear. A 0xD1 still waiting for its data byte is not in a
    snapshot: once restored, that byte goes to the keyboard, which is absent."""

    name = "i8042"
    WINDOW = 5  # ports 0x60..0x64; only the first (data) and last (command/status) decode

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._write_output = False  # the last command was 0xD1: the next data byte is the port

    def read(self, offset: int, size: int) -> bytes:
        # byte by byte, as an ISA bus splits a wider access: 0x64 reads idle, the rest 0
        return bytes(I8042_STATUS_IDLE if at == 4 else 0 for at in range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:  # the data port: the output port after 0xD1, else the absent keyboard's
            write_output, self._write_output = self._write_output, False
            if write_output and not data[0] & I8042_OUTPUT_RESET:
                self._reset()
        if not 0 <= 4 - offset < len(data):
            return
        command = data[4 - offset]  # the command byte, wherever in the access it lands
        self._write_output = command == I8042_CMD_WRITE_OUTPUT  # a new command drops a pending one
        pulse = command & I8042_CMD_PULSE_OUTPUT == I8042_CMD_PULSE_OUTPUT
        if pulse and not command & I8042_OUTPUT_RESET:
            self._reset()


# Hardware-reduced ACPI registers (ACPI 6.3 4.8.3.7 sleep control, 4.8.3.8 sleep status).
SLEEP_CONTROL, SLEEP_STATUS, RESET = 0, 1, 2  # offsets in the window, as the FADT says
SLP_EN = 1 << 5
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7


class AcpiPm:
    """The FADT's sleep control, sleep status and reset registers: entering S5 (the DSDT's
    _S5 sleep type with SLP_EN) powers off, writing the reset value resets."""

    name = "acpi-pm"
    WINDOW = 3

    def __init__(self, s5_type: int, reset_value: int, end: Callable[[str], None]) -> None:
        self._s5_type, self._reset_value = s5_type, reset_value
        self._end = end  # ends the VM with status 0, for the reason given

    def read(self, offset: int, size: int) -> bytes:
        return b"\x00" * size  # never asleep, so never waking: WAK_STS (bit 7) clear

    def write(self, offset: int, data: bytes) -> None:
        """Byte by byte, as an ISA bus splits a wider access (the FADT says byte access,
        but a word write over two registers reaches both)."""
        for at, value in enumerate(data, offset):
            if at == SLEEP_CONTROL and value & SLP_EN:
                if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self._s5_type:
                    self._end("guest powered off (ACPI S5)")
                    return
            elif at == RESET and value == self._reset_value:
                self._end("guest reset through the ACPI reset register")
                return


# The Generic Event Device's events (ACPI 6.3 5.6.9): bits of its event register, as QEMU
# numbers them (docs/specs/acpi_hw_reduced_hotplug.rst: bit 1, system power down).
GED_POWER_BUTTON = 1 << 1
GED_EVENTS = GED_POWER_BUTTON  # every bit the register may hold


class AcpiGed:
    """The Generic Event Device's event register: how a hardware-reduced platform tells the OS
    of an event it has no fixed register for. An event sets its bit and pulses the GED's
    interrupt (edge-triggered); the OS's GED driver (Linux: acpi-ged) runs the DSDT's _EVT,
    which reads the register and notifies the object the event is for: the power button
    (PNP0C0C, Notify 0x80), whose driver asks the OS to shut down. A read returns the events
    set since the last one and clears those it read, as QEMU's register does; writes do
    nothing. Events and reads come from different threads (the control socket's, a vCPU's)."""

    name = "acpi-ged"
    WINDOW = 4  # one 32-bit register: the DSDT's field reads it with DWordAcc

    def __init__(self, pulse: Callable[[], None]) -> None:
        self._pulse = pulse  # an edge on the GED's interrupt line
        self._lock = threading.Lock()
        self._events = 0

    @property
    def events(self) -> int:
        """The events set and not read yet (a snapshot saves them)."""
        with self._lock:
            return self._events

    def restore(self, events: int) -> None:
        """A snapshot's events, set without an interrupt (resend() raises one once the
        vCPUs' state is back)."""
        if events & ~GED_EVENTS:
            raise ValueError(f"GED events {events:#x} hold bits no event has")
        with self._lock:
            self._events = events

    def resend(self) -> None:
        """Pulse the interrupt again if events wait unread: the edge an event raised may not
        be in the saved irqchip or LAPIC (KVM injects an irqfd from a kernel worker, which
        can land after the save's reads). A second edge is harmless: _EVT reads the register
        once and notifies only for a bit it finds set, so an extra run finds 0."""
        with self._lock:
            if self._events:
                self._pulse()

    def signal(self, event: int) -> None:
        with self._lock:
            self._events |= event
            self._pulse()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            shift = 8 * offset
            read = self._events >> shift & ((1 << 8 * size) - 1)
            self._events &= ~(read << shift)
        return read.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        pass  # nothing to write: an event is the monitor's to set
