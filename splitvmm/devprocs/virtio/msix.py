"""A PCI function's interrupts as a device process signals them: MSI-X and INTx.

MSI-X (PCI Local Bus 3.0 6.8.2): the table and the pending bits (PBA) live in BAR 1; the
enable and function-mask bits in the capability's message control (config space). Each
vector has an irqfd (fd role msix<k>) that the monitor registered on a GSI of its own, but a
GSI goes nowhere until the monitor installs its route: the device asks for one (event
`msi`: vector, address, data) whenever MSI-X is enabled and an unmasked entry holds a
message it has no route for, and signals the vector only once a route_done for that very
message came back ok. Until then, and while the vector or the function is masked or the
function may not master the bus (an MSI-X message is a memory write: PCI 3.0 6.2.2, Bus
Master Enable clear "disables the device from generating PCI accesses"), the vector's
pending bit is set; it is signalled when the last obstacle goes. Which vectors may fire is
also stored in the device's progress page at each change (devprocs/progress.py): the
monitor signals those, and only those, for a device it leaves dead.

INTx (PCI 3.0 2.2.6, virtio 1.2 4.1.4.5): a level-triggered line through an irqfd with a
resample fd. The device asserts it (writes the irqfd) when the ISR becomes non-zero while
MSI-X is disabled and INTx is not disabled in the command register; the guest's EOI
deasserts it in KVM and signals the resample fd, and the device asserts again if the ISR
is still non-zero (the driver did not read it yet).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from splitvmm.devprocs.base import DeviceEvents, Trigger
from splitvmm.record import Struct

NO_VECTOR = 0xFFFF  # virtio 1.2 4.1.5.1.2: "no vector"
ENTRY_SIZE = 16  # message address (lo, hi), message data, vector control
PBA_OFFSET = 0x800  # in BAR 1, after the table
VECTOR_MASKED = 1  # vector control bit 0
# x86 MSI: a message must target the local APICs' window (the monitor checks it again)
MSI_ADDRESS = range(0xFEE00000, 0xFEF00000)


class Entry(Struct):
    address: int = 0
    data: int = 0
    control: int = VECTOR_MASKED  # every vector is masked at reset (PCI 3.0 6.8.2.9)


class Msix:
    """The MSI-X table, PBA and control bits of one function, and its route requests."""

    def __init__(
        self,
        triggers: Sequence[Trigger],
        events: DeviceEvents,
        unmasked: memoryview | None = None,
        enabled_flag: memoryview | None = None,
    ) -> None:
        """`unmasked`: the progress page's byte per vector (devprocs/progress.py), told
        whether each vector may fire whenever that changes; `enabled_flag`: its MSI-X Enable
        byte, told likewise. None: nobody is told."""
        self.triggers = list(triggers)  # one irqfd per vector
        self.events = events
        self.entries = [Entry() for _ in triggers]
        self.pending = 0  # bit k: vector k is pending
        self.enabled = False
        self.function_mask = False
        self.bus_master = False  # the command register's Bus Master Enable
        self.routed: list[tuple[int, int] | None] = [None] * len(triggers)  # confirmed messages
        self._asked: dict[int, tuple[int, int, int]] = {}  # route id -> (vector, address, data)
        self.refused = 0  # route requests the monitor refused (a bad message from the guest)
        # Each vector's message the monitor refused: not asked for again until the guest
        # writes its entry (else every interrupt would cost the monitor a refusal)
        self._refused: list[tuple[int, int] | None] = [None] * len(triggers)
        self._unmasked = unmasked
        if unmasked is not None and len(unmasked) < len(triggers):
            raise ValueError(f"{len(triggers)} vectors, a byte for {len(unmasked)}")
        # The vectors `unmasked` says may fire (a bit each); None: not told yet, so the first
        # change stores every byte. Not at reset: the page holds what the process before this
        # one stored, true for the guest until a restore sets the table it had (set_control).
        self._told: int | None = None
        self._enabled_flag = enabled_flag  # the page's MSI-X Enable byte (None: not told)
        self._told_enabled: bool | None = None

    @property
    def vectors(self) -> int:
        return len(self.entries)

    # -- the guest's accesses (BAR 1) -----------------------------------------------------
    def read(self, offset: int, size: int) -> bytes | None:
        """A table or PBA read; None for an access of the wrong size or alignment."""
        if size not in (4, 8) or offset % size:
            return None
        if offset < PBA_OFFSET:
            raw = b"".join(self._entry_bytes(e) for e in self.entries)
        else:
            raw = self.pending.to_bytes(-(-self.vectors // 64) * 8, "little")
            offset -= PBA_OFFSET
        return raw[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> bool:
        """A table write (the PBA is read-only); False for a bad size, alignment or place."""
        if len(data) not in (4, 8) or offset % len(data) or offset >= self.vectors * ENTRY_SIZE:
            return False
        for i in range(0, len(data), 4):
            self._write_dword(offset + i, int.from_bytes(data[i : i + 4], "little"))
        self._tell()
        self.update()
        return True

    def _write_dword(self, offset: int, value: int) -> None:
        # Any write to an entry asks again, even for the message refused (the refusal may
        # have been the host's, for the moment): one request per write at most.
        self._refused[offset // ENTRY_SIZE] = None
        entry = self.entries[offset // ENTRY_SIZE]
        field = offset % ENTRY_SIZE
        if field == 0:
            entry.address = (entry.address & ~0xFFFF_FFFF) | (value & ~3)  # dword aligned
        elif field == 4:
            entry.address = (entry.address & 0xFFFF_FFFF) | (value << 32)
        elif field == 8:
            entry.data = value
        else:
            entry.control = value & VECTOR_MASKED

    @staticmethod
    def _entry_bytes(e: Entry) -> bytes:
        return struct.pack("<QII", e.address, e.data, e.control)

    def set_control(self, enabled: bool, function_mask: bool) -> None:
        """The capability's message control bits, as the guest wrote them."""
        self.enabled, self.function_mask = enabled, function_mask
        self._tell()
        self.update()

    def set_bus_master(self, enabled: bool) -> None:
        self.bus_master = enabled
        self._tell()
        self.update()

    def _tell(self) -> None:
        """Store in the progress page which vectors may fire now, and whether MSI-X Enable is
        set, where that changed: what the monitor signals for this device once it is left
        dead (PCI 3.0 6.8.2.9: while a vector is masked its message is not sent, only its
        pending bit set), and whether it may raise its INTx then (6.8.2.3: not with MSI-X
        enabled)."""
        flag = self._enabled_flag
        if flag is not None and self._told_enabled is not self.enabled:
            flag[0] = int(self.enabled)
            self._told_enabled = self.enabled
        page = self._unmasked
        if page is None:
            return
        now = 0
        if self.enabled and not self.function_mask and self.bus_master:
            for k, entry in enumerate(self.entries):
                # routed: the monitor's route for the vector is this message (a refused or
                # unanswered one leaves the GSI on an older message, or on none)
                routed = self.routed[k] == (entry.address, entry.data)
                if not entry.control & VECTOR_MASKED and routed:
                    now |= 1 << k
        changed = now ^ self._told if self._told is not None else (1 << self.vectors) - 1
        for k in range(self.vectors):
            if changed >> k & 1:
                page[k] = now >> k & 1
        self._told = now

    # -- signalling ------------------------------------------------------------------------
    def signal(self, vector: int) -> None:
        """Raise `vector` now if it may fire, else make it pending."""
        if vector >= self.vectors:
            return  # NO_VECTOR, or one the table lacks: the driver asked for no interrupt
        self.pending |= 1 << vector
        self.update()

    def update(self) -> None:
        """Ask for the routes now needed, then fire what is pending and may fire."""
        if not self.enabled:
            return
        for k, entry in enumerate(self.entries):
            if entry.control & VECTOR_MASKED:
                continue
            message = (entry.address, entry.data)
            unrouted = self.routed[k] != message and self._refused[k] != message
            if unrouted and not self._asking(k, message):
                self._ask(k, message)
            may_fire = not self.function_mask and self.bus_master and self.routed[k] == message
            if self.pending >> k & 1 and may_fire:
                self.pending &= ~(1 << k)
                self.triggers[k].trigger()

    def _asking(self, vector: int, message: tuple[int, int]) -> bool:
        return (vector, *message) in self._asked.values()

    def _ask(self, vector: int, message: tuple[int, int]) -> None:
        # One request per vector at most: an answer for an older message of this vector is
        # of no use any more, and a guest rewriting its table cannot grow this.
        self._asked = {i: a for i, a in self._asked.items() if a[0] != vector}
        route_id = self.events.request_msi(vector, *message)
        self._asked[route_id] = (vector, *message)

    def route_done(self, route_id: int, ok: bool, reason: str) -> None:
        """The monitor's answer: the vector may fire once its entry still holds that message."""
        asked = self._asked.pop(route_id, None)
        if asked is None:
            return  # not ours (an INTx or older request): nothing waits on it
        vector, address, data = asked
        if not ok:
            self.refused += 1
            self._refused[vector] = (address, data)
            return
        self.routed[vector] = (address, data)
        self._tell()
        self.update()


class Intx:
    """INTA# through a level irqfd and its resample fd (see the module docstring)."""

    def __init__(self, irqfd: Trigger, asserting: Callable[[], bool]) -> None:
        self.irqfd = irqfd
        self.asserting = asserting  # whether the line should be up now

    def update(self) -> None:
        """The ISR became non-zero (or the guest ended the interrupt): assert if due."""
        if self.asserting():
            self.irqfd.trigger()
