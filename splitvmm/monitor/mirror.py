"""RegisterMirror: the monitor answers reads of a device's mirrored registers itself.

A guest read forwarded to a device costs a round trip on its channel (~100-200 us here); a
polled 8250 reads LSR once per byte it prints. A device model declares which registers of
its window it mirrors (ModelDescriptor.mirrored: offsets and sizes, nothing else: the
monitor knows no register's meaning), and its process publishes their current values in
MIRROR frames (protocol/wire.py): before the reply to every read, after every frame that
changed them, and after any host event (its output line draining) that did.

Exactness: the monitor answers a read from the mirror only when the answer is what the
device would have given at that point of the guest's accesses.

* Stamps. Each MIRROR carries the frames the device had applied when it took the values,
  numbered as the slot numbers the frames it sends (monitor/slot.py's journal: reads,
  posted writes, host input). A mirror whose stamp equals the frames sent so far has seen
  every access: a read after a posted write sees that write's effect, or the mirror is
  not current and the read goes to the device.
* Credit. Waiting for the device to apply a posted write would cost the round trip the
  mirror saves, so the device may promise more: `credit` further one-byte writes at
  `credit_offset` leave every mirrored value as it is (the 8250: THR writes while its
  output keeps up do not change LSR). A wider write is no credit write: a byte-wide device
  splits it over the next registers, as an ISA bus does. The mirror answers when every
  frame sent after its stamp is such a write, within the credit. The promise is the
  device's to keep (devprocs/serial.py says how).
* Restamps. A forwarded read is a frame, so after it the mirror is behind; rather than send
  a whole MIRROR that says nothing new, a device whose values, credit offset and credit are
  those of its last MIRROR after the read marks its reply RESTAMPED with the read's stamp
  (protocol/wire.py), and the monitor stamps its copy anew. The copy it restamps is the
  device's last MIRROR: the channel is ordered and every frame before a reply is handled
  before it (monitor/channel.py), and a device restamps only when no MIRROR of it waits
  unsent (devprocs/runtime.py MirrorPublisher). A copy the monitor dropped (quiesce) stays
  dropped: a restamp gives no values.
* Side effects. A value is published as valid only while reading it has no side effect
  (an 8250 clears LSR's overrun bit and MSR's delta bits on read: the device marks them not
  valid while one is set, the read goes to the device, which clears the bit once, and its
  next MIRROR makes the register valid again). So a read the mirror answers is one the
  device need not see.
* Host events (output drained, input) change values without a guest access. Input is a
  frame like the others (the mirror is no longer current); a drain is not: until the
  device's new MIRROR arrives the mirror answers with the values from before it, which is
  what the device answered a read that came before the drain.

News: each read looks whether the device sent anything (a read(2) of its socket: a system
call, ~2 us, more in a vCPU's loop on a PVM host, a tenth of a polled byte's time) and takes it first,
except while the latest MIRROR says the device is quiet (ModelDescriptor.quiet_while: the
8250 with THRI off), fewer than NEWS_EVERY reads went without, and the news was taken less
than NEWS_MAX_AGE_NS ago (by any read or request: a driver that sleeps between polls, as
Linux's tcdrain does, sees its line drained at its next poll). Quiet, the device raises no
interrupt but in answer to a frame, and what it does on its own (its line draining) shows
only through its mirrored registers, which an unrefreshed mirror answers with their values
from before it, as above: the guest cannot tell that read from one made a moment sooner.
The condition is the stale MIRROR's, which is also the device's now: every frame sent after
its stamp is a credit write (a read answered) or the read goes to the device, whose reply
comes after its news. Without a THRE interrupt to say the line drained, a guest that waits
for it would be the one to tell (hence THRI off). What no rule here can see: a host that
feeds a device's output back to the guest some other way (a relay into another device) lets
it learn of the drain sooner, and read THRE and TEMT clear (its line full) after seeing its
byte come back, for up to NEWS_MAX_AGE_NS (before, for the socket's own delivery time).

Held writes (monitor/writebehind.py): writes KVM kept without an exit are frames the slot
has not sent yet; a read answered meanwhile counts them as sent after the mirror's stamp, as
one run at the end (the device's credit covers them or the read waits until they are sent).

Journal and restarts: a read answered from the mirror is no frame. It is neither sent nor
journaled, and the device's frame count does not include it, so checkpoints and a crash
restart's replay are those of a guest that never made the read; since the read had no side
effect, the restarted device ends in the same state as one that had served it.

Trust: a MIRROR is checked against the declaration (wire.decode_mirror): a value only for a
declared register, of its declared size, a credit inside the window; anything else breaks
the channel. A hostile device can lie only about its own registers, which it answers anyway.

Invalidation: the mirror belongs to one process's channel, so a restarted device starts
with none until its new process publishes; a snapshot's quiesce pauses it (slot.control)
until the resume, whose reply comes after the device's new MIRROR.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from splitvmm.protocol import wire
from splitvmm.protocol.models import condition_holds

# While the device is quiet, a read asks for its news once in this many, and once this long
# has passed since it was last taken (the docstring): a polled byte's time is ~50-100 us here.
NEWS_EVERY = 8
NEWS_MAX_AGE_NS = 1_000_000


class RegisterMirror:
    """The latest MIRROR of one device process, and the frames sent to it since."""

    def __init__(
        self,
        registers: tuple[tuple[int, int], ...],
        quiet_while: tuple[tuple[int, int, int], ...] = (),
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """`registers`, `quiet_while`: the model's (ModelDescriptor.mirrored, .quiet_while);
        `clock`: nanoseconds, for the news's age."""
        self._registers = {offset: (i, size) for i, (offset, size) in enumerate(registers)}
        # (index in a MIRROR's values, mask, value): every one holds while the device is quiet
        self._quiet_while = tuple(
            (self._registers[offset][0], mask, value) for offset, mask, value in quiet_while
        )
        self._quiet = False  # what the latest MIRROR says
        self._unasked = 0  # reads made since the news was taken
        self._clock = clock
        self._news_at = clock()  # when it was taken: none yet, and no MIRROR to be quiet
        self._latest: wire.Mirror | None = None
        self.paused = False  # a snapshot's quiesce until its resume: every read goes through
        # The frames sent last, all writes at _run_offset: _run of them (None: not a write).
        self._run_offset: int | None = None
        self._run = 0

    @property
    def declared(self) -> bool:
        """Whether the model mirrors any register (else no read is answered here)."""
        return bool(self._registers)

    def covers(self, offset: int) -> bool:
        """Whether a read at `offset` may be answered here (a mirrored register starts there)."""
        return offset in self._registers

    def take(self, mirror: wire.Mirror) -> None:
        self._latest = mirror
        self._quiet = bool(self._quiet_while) and all(
            (v := mirror.values[i]) is not None and condition_holds(v, mask, value)
            for i, mask, value in self._quiet_while
        )

    def invalidate(self) -> None:
        self._latest = None
        self._quiet = False

    @property
    def quiet(self) -> bool:
        """Whether the latest MIRROR says the device is quiet (ModelDescriptor.quiet_while)."""
        return self._quiet

    def news_due(self) -> bool:
        """Whether a read must take the device's news before the mirror answers it (the
        module docstring): always, unless quiet, with fewer than NEWS_EVERY reads made and
        less than NEWS_MAX_AGE_NS passed since it was taken."""
        if not self._quiet or self._unasked >= NEWS_EVERY - 1:
            return True
        if self._clock() - self._news_at >= NEWS_MAX_AGE_NS:
            return True
        self._unasked += 1
        return False

    def news_taken(self) -> None:
        """The device's news was just taken (its channel's drain_events)."""
        self._unasked, self._news_at = 0, self._clock()

    def restamp(self, stamp: int) -> None:
        """The device's last MIRROR holds at `stamp` too (a RESTAMPED read reply)."""
        m = self._latest
        if m is not None:  # a new Mirror, not replace(): cheaper per read
            self._latest = wire.Mirror(m.values, m.credit_offset, m.credit, stamp)

    def sent(self, write_offset: int | None) -> None:
        """The slot numbered one more frame: a one-byte write at `write_offset`, or None for
        another."""
        if write_offset is not None and write_offset == self._run_offset:
            self._run += 1
        else:
            self._run_offset, self._run = write_offset, int(write_offset is not None)

    def values(self, offsets: Sequence[int]) -> list[bytes] | None:
        """The latest MIRROR's values of the registers at `offsets`, however many frames were
        sent since (None: none taken, paused, or one not declared or marked not valid)."""
        mirror = self._latest
        if mirror is None or self.paused:
            return None
        found = []
        for offset in offsets:
            where = self._registers.get(offset)
            value = None if where is None else mirror.values[where[0]]
            if value is None:
                return None
            found.append(value)
        return found

    def answer(
        self, offset: int, size: int, frames: int, held: int = 0, held_at: int = 0
    ) -> bytes | None:
        """The value of a read of `size` bytes at `offset`, after `frames` frames were sent
        and `held` more writes at `held_at` that are still to be sent (write-behind: they
        came before the read), if the mirror has it exactly (the module docstring); None:
        ask the device, after sending what is held."""
        mirror, where = self._latest, self._registers.get(offset)
        if mirror is None or where is None or self.paused or where[1] != size:
            return None
        value = mirror.values[where[0]]
        behind = (frames - mirror.stamp) & wire.STAMP_MASK
        if value is None or behind + held == 0:
            return value
        run_offset, run = self._run_offset, self._run
        if held:  # the writes after the sent ones: the run ends with them
            run = held + (run if run_offset == held_at else 0)
            run_offset = held_at
        behind += held
        covered = run_offset == mirror.credit_offset and run >= behind
        return value if covered and behind <= mirror.credit else None
