"""8250/16550A UART (COM1), register names from Linux <linux/serial_reg.h>.

Transmit goes through the device's bounded output buffer (ctx.out, output.py),
which stands for the line: a byte written to THR enters it at once, and leaves
as fast as the host's output takes it. LSR reports that buffer the way a
16550A with a slow line does: THRE is clear while the buffer has no room for what
a driver writes on THRE (one byte, or with FIFOs on a full 16-byte FIFO load, which
Linux's 8250 driver writes at once), TEMT while it has no room for TEMT_ROOM bytes,
and THRE rising again is a THRE interrupt event. A driver that polls THRE (or waits
for its interrupt, or for TEMT) loses nothing; bytes written with no room at all are
dropped and counted (counters.tx_dropped), never waited for.

Why TEMT is room, not an empty buffer: the buffer is the host's side of the line (a
pipe's kernel buffer, QEMU's chardev), not the UART's FIFO, which is also why FCR's
CLEAR_XMIT leaves it alone. And whether the host takes a byte the moment it is
written is the host's timing: were LSR to show it, a THR write's effect on LSR would
depend on it, and no register mirror could answer the poll after the write (the
credit below). With TEMT clear while any byte waited, a guest printing to a terminal
or pipe sent every LSR poll to this process and back (bench/serial.py --output pipe:
362.5 us a byte, 85-105 since). What TEMT still promises a driver that waits for
it is room for a whole FIFO of any 8250 it may believe it drives.

Host input waits in the receive buffer until the guest reads RBR. In loopback the
receiver hears the transmitter only: input the monitor sent before it learned that
(it sends only into room this device reported) waits on the line, `line_in`, and
reaches the receive buffer when loopback ends, as the rest of the host's does. The interrupt
line is edge-signalled through an irqfd (ISA IRQs are edge-triggered on the
IOAPIC): a pulse each time a new interrupt condition appears, and after each RBR
read that leaves data (the next byte is a new receive event, as on a 16450). With
FIFOs on, received data at or above the trigger level is a received-data interrupt,
and less is a character timeout (IIR 0x0C), at once: the four character times of
quiet a 16550A waits for have passed by the time a guest looks (host input comes in
bursts, and nothing here keeps a timer for it).

Register mirror (monitor/mirror.py): the monitor answers reads of IER/DLM, LCR, MCR, LSR,
MSR and SCR from the values this device publishes. LSR is published as not valid while OE
is set, MSR while a delta bit is set (in loopback too): reading them clears those bits, so
such a read comes here, clears them once, and the next mirror is valid again. LSR is not
valid either while THRE is clear with THRI on: the line draining then raises the THRE
interrupt (its edge goes from output_room(), before the runtime publishes the MIRROR that
says THRE rose), and a handler that reads LSR first must see THRE set, not the monitor's
copy from before the drain. The credit is for one-byte THR writes (offset 0; a wider
write reaches IER too), while a write changes none of those registers: with DLAB set (it
writes DLL); with THRE clear (the byte is buffered or dropped: THRE and TEMT stay
clear); with nothing buffered and an output that takes every byte at once (no line, or a
regular file: THRE and TEMT stay set); else for the writes that leave THRE's and TEMT's
room as it was, however few bytes the host takes meanwhile. None in loopback (a THR write
sets DR) or while the output is held for a snapshot.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import ClassVar, Self

from splitvmm.devprocs.base import (
    DeviceContext,
    DeviceState,
    RegisterDevice,
    register,
)
from splitvmm.errors import StateError
from splitvmm.protocol.schema import Upgrade
from splitvmm.protocol.wire import MAX_CREDIT, Mirror
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.record import replace

log = logging.getLogger("splitvmm.dev.serial")

# The receive buffer: a 16550A has a 16-byte FIFO; we hold more so that pasted
# input is not lost while the guest is slow, and count what overflows.
RX_BUFFER_MAX = 4096
TX_FIFO_LEN = 16  # the 16550A's transmit FIFO: what a driver may write on one THRE
# TEMT: room for the largest transmit FIFO an 8250-family driver may believe it has (the
# 16C950's 128 bytes), so that one which waits for TEMT and writes a whole FIFO loses nothing.
TEMT_ROOM = 128
RX_FIFO_LEN = 16  # its receive FIFO: what the receiver holds in loopback (_loop_back)
# The host input asked for (input_buffer): the buffer less a receive FIFO, which the bytes a
# loopback test leaves unread take when loopback ends, ahead of the input that waited
# (FreeBSD's uart probe stops at the overrun and leaves loopback without reading its 16).
RX_HOST_ROOM = RX_BUFFER_MAX - RX_FIFO_LEN
MAX_COUNTER = (1 << 63) - 1


class Reg(enum.IntEnum):
    RX_TX = 0  # RBR (read) / THR (write); DLL when LCR.DLAB
    IER = 1  # DLM when LCR.DLAB
    IIR_FCR = 2  # IIR (read) / FCR (write)
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


# Each access names its register by offset (checked against the window by wire.decode_access)
# and each read answers a byte: looked up, not built (Reg(offset) and bytes([value]) cost
# ~0.3 and ~0.15 us a call here, on the path of every forwarded read: bench/exit_rtt.py)
_REGS = tuple(Reg)
_BYTES = tuple(bytes([value]) for value in range(256))
_QUIET_READS = frozenset((Reg.IER, Reg.IIR_FCR, Reg.LCR, Reg.MCR, Reg.SCR))  # quiet_reads()


# The register bits are IntEnums, not IntFlags: an IntFlag's `&`, `|` and `~` build a new
# member each time (~1 us apiece, a dozen per access, measured), an IntEnum's are int's own.
class Ier(enum.IntEnum):
    RDI = 0x01  # received data available
    THRI = 0x02  # transmitter holding register empty
    RLSI = 0x04  # receiver line status
    MSI = 0x08  # modem status


class Iir(enum.IntEnum):
    NO_INT = 0x01
    MSI = 0x00
    THRI = 0x02
    RDI = 0x04
    RLSI = 0x06
    CTI = 0x0C  # character timeout: data below the FIFO trigger level
    FIFO_ENABLED = 0xC0  # 16550A with FIFOs on


class Fcr(enum.IntEnum):
    ENABLE_FIFO = 0x01
    CLEAR_RCVR = 0x02
    CLEAR_XMIT = 0x04
    TRIGGER = 0xC0  # the receive FIFO's trigger level: 1, 4, 8 or 14 bytes


RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # by FCR bits 7-6


class Lcr(enum.IntEnum):
    WLEN8 = 0x03
    DLAB = 0x80


class Mcr(enum.IntEnum):
    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10


class Lsr(enum.IntEnum):
    DR = 0x01  # data ready
    OE = 0x02  # overrun
    THRE = 0x20  # transmit holding register empty
    TEMT = 0x40  # transmitter empty


class Msr(enum.IntEnum):
    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


# No modem: report the lines a terminal that is always there would assert.
MSR_CONNECTED = Msr.DCD | Msr.DSR | Msr.CTS
MSR_DELTAS = Msr.DCTS | Msr.DDSR | Msr.TERI | Msr.DDCD  # cleared by reading MSR


class UartState(DeviceState, frozen=True, kw_only=True):
    """v2 added tx and tx_dropped, v3 line_in, v4 rx_cleared. lsr: OE is state; THRE and TEMT
    are saved as the guest would have read them, and derived again from tx on restore."""

    VERSION: ClassVar[int] = 4
    ier: int = 0
    lcr: int = int(Lcr.WLEN8)
    mcr: int = int(Mcr.OUT2)
    lsr: int = int(Lsr.THRE | Lsr.TEMT)
    msr: int = int(MSR_CONNECTED)
    scr: int = 0
    dll: int = 12  # 9600 baud
    dlm: int = 0
    fcr: int = 0
    thr_interrupt: bool = False  # a THRE interrupt is pending (cleared by IIR read or THR write)
    rx: bytes = b""
    tx: bytes = b""  # written by the guest, not yet taken by the host's output
    tx_dropped: int = 0  # bytes written to THR with no room for them
    line_in: bytes = b""  # host input that came in loopback: rx's once loopback ends
    # the receiver was cleared and has taken no byte since: all of rx is the host's backlog
    rx_cleared: bool = False

    # v1 transmitted at once: nothing was ever buffered or dropped. v2 dropped what came in
    # loopback.
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {
        1: lambda f: {**f, "tx": "", "tx_dropped": 0},
        2: lambda f: {**f, "line_in": ""},
        3: lambda f: {**f, "rx_cleared": False},
    }


@register
class Uart8250(RegisterDevice):
    NAME = "serial"
    WINDOW = 8
    State = UartState

    def __init__(self, ctx: DeviceContext, state: UartState | None = None) -> None:
        super().__init__(ctx)
        s = state or UartState()
        self.ier, self.lcr, self.mcr = s.ier, s.lcr, s.mcr
        self.lsr = int(s.lsr & Lsr.OE)  # THRE, TEMT and DR are derived, never stored
        self.msr, self.scr, self.dll, self.dlm, self.fcr = s.msr, s.scr, s.dll, s.dlm, s.fcr
        self.rx = bytearray(s.rx)
        self.line_in = bytearray(s.line_in)
        self.rx_cleared = s.rx_cleared and bool(self.rx) and not s.mcr & Mcr.LOOP
        ctx.out.put(s.tx)  # restore() checked that it fits; the line may take it at once
        ctx.counters.tx_dropped = s.tx_dropped
        # THRE as the guest last saw it: the saved LSR's (a new UART's: the buffer's).
        self._thre = bool(s.lsr & Lsr.THRE) if state is not None else self._holding_empty()
        self.thr_interrupt = s.thr_interrupt and self._thre
        self._warn = RateLimitedLog(log)
        # The saved one's edge went out before, but KVM injects it from a worker, maybe after
        # the snapshot read the irqchip: a restore sends it again (a spurious edge costs the
        # driver an IIR read; a lost one leaves it waiting for ever). A restart's goes out
        # in after_restart().
        self._irq_pending = ctx.restarted and self._irq_asserted()
        # A line that took the buffered bytes made THRE rise: a THRE interrupt event, with
        # its edge, as it would have been had the VM run on (after a crash, after_restart()
        # sends the one edge, once the journal is replayed).
        self._check_thre()
        if not ctx.restarted:
            self._update_irq()

    # -- guest accesses -------------------------------------------------------
    # A wider access is byte cycles at consecutive ports, as an ISA bus splits it for an
    # 8-bit device (QEMU's serial does the same): `outw 0x3fb` writes LCR, then MCR.
    def read(self, offset: int, size: int) -> bytes:
        if size == 1:  # the common case, without a loop
            value = self._read_reg(_REGS[offset])
            self._update_irq()
            return _BYTES[value]
        values = bytearray()
        for at in range(offset, offset + size):
            values.append(self._read_reg(_REGS[at]))
            self._update_irq()
        return bytes(values)

    def write(self, offset: int, data: bytes) -> None:
        for at, value in enumerate(data, offset):
            self._write_reg(_REGS[at], value)
            self._update_irq()

    def quiet_reads(self) -> frozenset[int]:
        """IER (DLM with DLAB set), IIR (it may clear a THRE interrupt, which no mirrored
        register shows), LCR, MCR and SCR. Not RBR (it takes a byte: LSR's DR), LSR (it
        clears OE) nor MSR (it clears the deltas)."""
        return _QUIET_READS

    def mirror(self) -> Mirror:
        """The registers its descriptor mirrors (IER, LCR, MCR, LSR, MSR, SCR), as reads
        return them now, and the THR writes that leave them so (the module docstring)."""
        side_effect_msr = self.msr & MSR_DELTAS
        empty = self._holding_empty()  # once: the LSR's value and the credit both need it
        # THRE clear with THRI on: the line draining raises the THRE interrupt before the
        # MIRROR that says so can reach the monitor, whose copy would answer the handler's
        # LSR read with THRE clear still (the module docstring)
        thre_due = self.ier & Ier.THRI and not empty
        values = (
            _BYTES[self.dlm if self._dlab() else self.ier],
            _BYTES[self.lcr],
            _BYTES[self.mcr],
            None if self.lsr & Lsr.OE or thre_due else _BYTES[self._lsr_value(empty)],
            None if side_effect_msr else _BYTES[self._modem_status()],
            _BYTES[self.scr],
        )
        return Mirror(values, Reg.RX_TX, self._thr_credit(empty))

    def _thr_credit(self, empty: bool) -> int:
        """`empty`: _holding_empty() now."""
        out = self.ctx.out
        if self._dlab():
            return MAX_CREDIT
        if self.mcr & Mcr.LOOP or out.held:
            return 0
        if not empty or out.immediate() and not out.pending():
            return MAX_CREDIT
        room, temt_room = out.room(), self._temt_room()
        return min(room - (temt_room if room >= temt_room else self._fifo_load()), MAX_CREDIT)

    def output_room(self) -> None:
        self._check_thre()
        self._update_irq()

    def host_input(self, data: bytes) -> None:
        if self.mcr & Mcr.LOOP:
            # The receiver hears the transmitter only: what the monitor sent into the room
            # it was told of before the guest turned loopback on waits on the line.
            room = RX_BUFFER_MAX - len(self.line_in)
            if len(data) > room:  # more than any room reported: the monitor's mistake
                self._count_overrun(len(data) - room)
            self.line_in += data[:room]
            return
        self._receive(data)
        self._update_irq()

    def input_buffer(self) -> tuple[int, int]:
        """ConsoleInput: host input comes only through the monitor, into `rx`. In loopback
        the receiver is the transmitter's: no room, so the input waits on the host side
        until the guest ends loopback (Linux's probe); what was on its way already waits
        here (`line_in`)."""
        waiting = len(self.rx) + len(self.line_in)
        return waiting, 0 if self.mcr & Mcr.LOOP else RX_HOST_ROOM

    # -- registers --------------------------------------------------------------
    def _dlab(self) -> bool:
        return bool(self.lcr & Lcr.DLAB)

    def _read_reg(self, reg: Reg) -> int:
        match reg:
            case Reg.RX_TX if self._dlab():
                return self.dll
            case Reg.RX_TX:
                return self._read_rbr()
            case Reg.IER if self._dlab():
                return self.dlm
            case Reg.IER:
                return self.ier
            case Reg.IIR_FCR:
                return self._read_iir()
            case Reg.LCR:
                return self.lcr
            case Reg.MCR:
                return self.mcr
            case Reg.LSR:
                value = self._lsr_value(self._holding_empty())
                self.lsr &= ~Lsr.OE  # overrun is cleared by reading LSR
                return value
            case Reg.MSR:
                value = self._modem_status()
                self.msr &= ~MSR_DELTAS  # deltas clear on read
                return value
            case Reg.SCR:
                return self.scr

    def _write_reg(self, reg: Reg, value: int) -> None:
        match reg:
            case Reg.RX_TX if self._dlab():
                self.dll = value
            case Reg.RX_TX:
                self._transmit(value)
            case Reg.IER if self._dlab():
                self.dlm = value
            case Reg.IER:
                self._write_ier(value)
            case Reg.IIR_FCR:
                self._write_fcr(value)
            case Reg.LCR:
                self.lcr = value
            case Reg.MCR:
                self._write_mcr(value)
            case Reg.LSR | Reg.MSR:
                self.ctx.counters.bad_access += 1  # read-only registers (factory test only)
            case Reg.SCR:
                self.scr = value

    def _read_rbr(self) -> int:
        if not self.rx:
            return 0
        value = self.rx[0]
        del self.rx[0]
        self.rx_cleared = False  # the byte went through the receiver
        if self.rx and self.ier & Ier.RDI:
            # The next byte takes the one read: a new receive event, hence a new edge on the
            # (edge-triggered) ISA line, as when a 16450's holding register fills again or a
            # 16550A's FIFO times out. A driver that reads one byte per interrupt gets them all.
            self._irq_pending = False
        return value

    def _transmit(self, value: int) -> None:
        if self.mcr & Mcr.LOOP:
            self._loop_back(value)
        elif not self.ctx.out.put(bytes([value])):
            self._drop()
        # Writing THR clears a THRE interrupt. If the holding register is empty again at
        # once (the line took the byte, or has room for more), that is itself a new
        # interrupt event: the line pulses again even if the last THRE was not acknowledged.
        self._thre = self._holding_empty()
        self.thr_interrupt = self._thre
        if self._thre:
            self._irq_pending = False

    def _drop(self) -> None:
        self.ctx.counters.tx_dropped = min(self.ctx.counters.tx_dropped + 1, MAX_COUNTER)
        self._warn.warning(
            "tx_dropped",
            "the guest wrote to THR while THRE was clear and the output was full: "
            "dropped %d byte(s) so far",
            self.ctx.counters.tx_dropped,
        )

    def _write_ier(self, value: int) -> None:
        enabling_thri = value & Ier.THRI and not self.ier & Ier.THRI
        self.ier = value & 0x0F
        if enabling_thri and self._thre:
            # Enabling ETBEI while THR is empty raises THRE at once (Linux relies on it).
            self.thr_interrupt = True

    def _write_mcr(self, value: int) -> None:
        """MCR; in loopback its outputs drive MSR's lines, and each change of a line sets its
        delta bit (TERI: RI falling) as the modem's would (PC16550D: MCR bit 4)."""
        before = self._modem_lines()
        leaving_loopback = self.mcr & ~value & Mcr.LOOP
        if value & ~self.mcr & Mcr.LOOP:
            # The receiver keeps what the chip's holds (_loop_back); the host input behind
            # that is the line's, which loopback disconnects: it waits in line_in, first in
            # line, until loopback ends. Left in rx, a looped-back byte went in behind it,
            # and a 16450-mode test read a typed byte back instead of its own.
            # Just after a clear the receiver holds none of it (Linux's size_fifo).
            held = 0 if self.rx_cleared else RX_FIFO_LEN if self.fcr & Fcr.ENABLE_FIFO else 1
            self.line_in[:0] = self.rx[held:]
            del self.rx[held:]
            self.rx_cleared = False
        self.mcr = value & 0x1F
        if leaving_loopback and self.line_in:
            self.rx_cleared = not self.rx  # an empty receiver: the line's bytes are behind it
            self._receive(bytes(self.line_in))  # the line is the receiver's again
            self.line_in.clear()
        self._check_thre()  # the transmitter is the line's again, or the receiver's
        changed = before ^ self._modem_lines()
        self.msr |= (
            (Msr.DCTS if changed & Msr.CTS else 0)
            | (Msr.DDSR if changed & Msr.DSR else 0)
            | (Msr.TERI if changed & before & Msr.RI else 0)
            | (Msr.DDCD if changed & Msr.DCD else 0)
        )

    def _write_fcr(self, value: int) -> None:
        """PC16550D FCR: turning the FIFOs on or off clears them, as the clear bits do; the
        other bits are programmed only with bit 0 set ("FCR0 must be a 1 when other FCR bits
        are written to or they will not be programmed"); and "the transmitter interrupt
        after changing FCR0 will be immediate, if it is enabled"."""
        toggled = (value ^ self.fcr) & Fcr.ENABLE_FIFO
        if toggled or value & Fcr.ENABLE_FIFO and value & Fcr.CLEAR_RCVR:
            # What the receiver holds, a FIFO's worth: the host's input behind it in `rx` is
            # the line's, and has not reached the receiver yet (rx_cleared), so a clear that
            # follows drops none of it and a loopback test right after it reads back its own
            # bytes only (Linux's size_fifo: a backlog made it count 64 bytes of FIFO).
            # In 16450 mode (FIFOs off until this write) the receiver holds one byte, RBR.
            if not self.rx_cleared:
                del self.rx[: RX_FIFO_LEN if self.fcr & Fcr.ENABLE_FIFO else 1]
            self.rx_cleared = bool(self.rx) and not self.mcr & Mcr.LOOP
        # CLEAR_XMIT keeps the buffered output: it stands for the host's line, not for the
        # FIFO, and dropping it would cut the last lines a firmware or boot stage printed.
        # FCR is write-only: with bit 0 clear the trigger level is unused until it is set.
        self.fcr = value & (Fcr.ENABLE_FIFO | Fcr.TRIGGER) if value & Fcr.ENABLE_FIFO else 0
        self._check_thre()  # FIFOs on or off change what "empty" needs
        if toggled and self._thre:
            self.thr_interrupt = True

    # -- the transmitter: the output buffer seen as a slow line -----------------------
    def _fifo_load(self) -> int:
        """What a driver writes on THRE: a byte; with FIFOs, a FIFO load."""
        return TX_FIFO_LEN if self.fcr & Fcr.ENABLE_FIFO else 1

    def _holding_empty(self) -> bool:
        """THRE: room for what a driver writes on THRE. In loopback the transmitter's bytes
        go to the receiver at once, not to the line (PC16550D MCR bit 4)."""
        return bool(self.mcr & Mcr.LOOP) or self.ctx.out.room() >= self._fifo_load()

    def _temt_room(self) -> int:
        """The room TEMT needs: TEMT_ROOM (the whole buffer, if it is smaller), and never
        less than THRE's."""
        return max(self._fifo_load(), min(TEMT_ROOM, self.ctx.out.capacity))

    def _lsr_value(self, empty: bool) -> int:
        """LSR as a read returns it; `empty`: _holding_empty() now."""
        return self._line_status(empty) | (Lsr.DR if self.rx else 0)

    def _line_status(self, empty: bool) -> int:
        """THRE and TEMT (the module docstring): both are room in the buffer; `empty`:
        _holding_empty() now."""
        if not empty:
            return self.lsr
        looped = self.mcr & Mcr.LOOP
        temt = Lsr.TEMT if looped or self.ctx.out.room() >= self._temt_room() else 0
        return self.lsr | Lsr.THRE | temt

    def _check_thre(self) -> None:
        """THRE rising is a THRE interrupt event; THRE falling takes a pending one back."""
        thre = self._holding_empty()
        if thre != self._thre:
            self.thr_interrupt = thre
        self._thre = thre

    def _read_iir(self) -> int:
        iir = self._pending_iir()
        if iir == Iir.THRI:
            self.thr_interrupt = False  # reading IIR with THRE the source clears it
        fifo = Iir.FIFO_ENABLED if self.fcr & Fcr.ENABLE_FIFO else 0
        return iir | fifo

    def _modem_status(self) -> int:
        """MSR as a read returns it (reading clears its deltas: _read_reg)."""
        return self._modem_lines() | self.msr & MSR_DELTAS

    def _modem_lines(self) -> int:
        """MSR's line bits: the modem's (self.msr), or in loopback the MCR's outputs wired
        back, DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD."""
        if self.mcr & Mcr.LOOP:
            m = self.mcr
            return (
                (Msr.DSR if m & Mcr.DTR else 0)
                | (Msr.CTS if m & Mcr.RTS else 0)
                | (Msr.RI if m & Mcr.OUT1 else 0)
                | (Msr.DCD if m & Mcr.OUT2 else 0)
            )
        return self.msr & ~MSR_DELTAS

    def _loop_back(self, value: int) -> None:
        """Loopback: the transmitter's byte goes into the receiver, which holds what the
        chip's holds (PC16550D LSR bit 1): its 16-byte FIFO, or with FIFOs off one byte. A
        byte past that is an overrun: lost with FIFOs on, written over the unread one
        without (a driver sizes the FIFO so: Linux's size_fifo). Host input is the host's
        buffer, RX_BUFFER_MAX deep, but in loopback the guest alone decides the timing. The
        receiver assembles the word length LCR sets (5 to 8 bits, right-justified: PC16550D
        RBR), so the bits above it read 0."""
        value &= (1 << (5 + (self.lcr & Lcr.WLEN8))) - 1
        fifo = self.fcr & Fcr.ENABLE_FIFO
        if len(self.rx) < (RX_FIFO_LEN if fifo else 1):
            self.rx.append(value)
            return
        self.lsr |= Lsr.OE
        self._count_overrun(1)
        if not fifo:
            self.rx[-1] = value

    def _receive(self, data: bytes) -> None:
        room = RX_BUFFER_MAX - len(self.rx)
        if len(data) > room:
            self._count_overrun(len(data) - room)
            self.lsr |= Lsr.OE
        self.rx += data[:room]

    def _count_overrun(self, lost: int) -> None:
        self.ctx.counters.rx_overrun = min(self.ctx.counters.rx_overrun + lost, MAX_COUNTER)

    # -- interrupt --------------------------------------------------------------
    def _pending_iir(self) -> int:
        if self.ier & Ier.RLSI and self.lsr & Lsr.OE:
            return Iir.RLSI
        if self.ier & Ier.RDI and self.rx:
            if self.fcr & Fcr.ENABLE_FIFO and len(self.rx) < RX_TRIGGER_LEVELS[self.fcr >> 6]:
                return Iir.CTI
            return Iir.RDI
        if self.ier & Ier.THRI and self.thr_interrupt and self._thre:
            return Iir.THRI
        if self.ier & Ier.MSI and self.msr & MSR_DELTAS:
            return Iir.MSI
        return Iir.NO_INT

    def _irq_asserted(self) -> bool:
        """An interrupt pending and the line to the PIC open: OUT2 gates it on PC serial
        ports, and loopback holds the OUT pins inactive (PC16550D: MCR bit 4)."""
        wired = self.mcr & (Mcr.OUT2 | Mcr.LOOP) == Mcr.OUT2
        return wired and self._pending_iir() != Iir.NO_INT

    def _update_irq(self) -> None:
        pending = self._irq_asserted()
        if pending and not self._irq_pending and not self.ctx.replaying:
            self.ctx.irq.trigger()  # a replayed frame's edge went out from the dead process
        self._irq_pending = pending

    def after_restart(self) -> None:
        """The journal replayed (registers only: no edge went out for it): one edge if an
        interrupt is pending now, for the one the dead process may have died before sending.

        THRE set now is a THRE interrupt event again. The host's line may have taken bytes
        after the checkpoint: the dead process saw THRE rise then (an interrupt, maybe sent),
        at a moment no frame records, and this process starts with that room already there,
        with no rise to see. A driver that enabled THRI and waits for it to send more (Linux's
        tty path) would wait for ever; the worst a THRE interrupt too many does is make it
        look for bytes to send."""
        self._check_thre()
        if self._thre:
            self.thr_interrupt = True
        self._irq_pending = self._irq_asserted()
        if self._irq_pending:
            self.ctx.irq.trigger()

    # -- state ------------------------------------------------------------------
    def save(self) -> UartState:
        return UartState(
            ier=self.ier, lcr=self.lcr, mcr=self.mcr,
            lsr=int(self._line_status(self._holding_empty())), msr=self.msr,
            scr=self.scr, dll=self.dll, dlm=self.dlm, fcr=self.fcr,
            thr_interrupt=self.thr_interrupt, rx=bytes(self.rx), line_in=bytes(self.line_in),
            rx_cleared=self.rx_cleared,
            tx=self.ctx.out.buffered(), tx_dropped=self.ctx.counters.tx_dropped,
        )  # fmt: skip

    @classmethod
    def restore(cls, ctx: DeviceContext, state: UartState) -> Self:
        for name in ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr"):
            value = getattr(state, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise StateError(f"serial: {name}={value!r} is not a byte")
        if len(state.rx) > RX_BUFFER_MAX:
            raise StateError(f"serial: rx buffer {len(state.rx)} > {RX_BUFFER_MAX} bytes")
        if len(state.line_in) > RX_BUFFER_MAX:
            raise StateError(f"serial: line_in {len(state.line_in)} > {RX_BUFFER_MAX} bytes")
        if state.line_in and not state.mcr & Mcr.LOOP:  # it would never reach rx
            raise StateError("serial: line_in holds input, and loopback is off")
        if len(state.tx) > ctx.out.room():
            raise StateError(f"serial: tx buffer {len(state.tx)} > {ctx.out.room()} bytes")
        if not isinstance(state.tx_dropped, int) or not 0 <= state.tx_dropped <= MAX_COUNTER:
            raise StateError(f"serial: tx_dropped={state.tx_dropped!r} is not a counter")
        if state.ier & ~0x0F or state.mcr & ~0x1F:
            raise StateError("serial: reserved IER/MCR bits set")
        return cls(ctx, replace(state))
