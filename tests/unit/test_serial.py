"""The 8250 register model against a fake irq and an output buffer (no process, no channel);
last, its mirror and the THRE interrupt of a draining line, over a real channel socket."""

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from splitvmm.devprocs import runtime
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.eventloop import EventLoop
from splitvmm.devprocs.output import BoundedOutput
from splitvmm.devprocs.serial import (
    RX_BUFFER_MAX,
    RX_FIFO_LEN,
    TEMT_ROOM,
    TX_FIFO_LEN,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    Reg,
    Uart8250,
    UartState,
)
from splitvmm.errors import StateError
from splitvmm.fdline import FdLine
from splitvmm.monitor.mirror import RegisterMirror
from splitvmm.monitor.slot import DeviceSlot, SlotState, Spawn
from splitvmm.protocol import codec, events, wire
from splitvmm.protocol.models import SERIAL, condition_holds
from splitvmm.protocol.wire import MAX_CREDIT
from splitvmm.record import replace
from tests.fakes import FakeIrq, FakeLine, MonitorEnd, channel_pair

GOLDENS = Path(__file__).resolve().parents[1] / "conformance" / "goldens"


def make_uart() -> tuple[Uart8250, bytearray, FakeIrq]:
    line = FakeLine()
    irq = FakeIrq()
    return Uart8250(DeviceContext(irq=irq, out=BoundedOutput(line))), line.data, irq


def test_uart_thr_write_emits_byte():
    uart, out, _ = make_uart()
    uart.write(Reg.RX_TX, b"A")
    assert out == b"A"


def test_uart_reset_lsr_reports_transmitter_empty():
    uart, _, _ = make_uart()
    assert uart.read(Reg.LSR, 1)[0] & (Lsr.THRE | Lsr.TEMT) == Lsr.THRE | Lsr.TEMT


def test_uart_dlab_set_redirects_to_divisor_latch():
    uart, out, _ = make_uart()
    uart.write(Reg.LCR, bytes([Lcr.DLAB | Lcr.WLEN8]))
    uart.write(Reg.RX_TX, b"\x01")
    uart.write(Reg.IER, b"\x02")
    assert (uart.read(Reg.RX_TX, 1), uart.read(Reg.IER, 1), out) == (b"\x01", b"\x02", bytearray())


def test_uart_host_input_sets_data_ready_and_reads_in_order():
    uart, _, _ = make_uart()
    uart.host_input(b"ok")
    lsr = uart.read(Reg.LSR, 1)[0]
    first, second = uart.read(Reg.RX_TX, 1), uart.read(Reg.RX_TX, 1)
    assert (lsr & Lsr.DR, first, second, uart.read(Reg.LSR, 1)[0] & Lsr.DR) == (
        Lsr.DR,
        b"o",
        b"k",
        0,
    )


def test_uart_rx_interrupt_enabled_pulses_irq_once_per_new_condition():
    uart, _, irq = make_uart()
    uart.write(Reg.IER, bytes([Ier.RDI]))
    uart.host_input(b"a")
    uart.host_input(b"b")
    assert (irq.count, uart.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (1, Iir.RDI)


def test_uart_out2_clear_gates_the_irq_line():
    uart, _, irq = make_uart()
    uart.write(Reg.MCR, b"\x00")
    uart.write(Reg.IER, bytes([Ier.RDI]))
    uart.host_input(b"a")
    assert irq.count == 0


def test_uart_enabling_thri_raises_thre_interrupt_at_once():
    uart, _, irq = make_uart()
    uart.write(Reg.IER, bytes([Ier.THRI]))
    assert (irq.count, uart.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (1, Iir.THRI)


def test_uart_iir_read_clears_thre_interrupt():
    uart, _, _ = make_uart()
    uart.write(Reg.IER, bytes([Ier.THRI]))
    uart.read(Reg.IIR_FCR, 1)
    assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.NO_INT


def test_uart_fifo_enabled_iir_reports_16550a():
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, b"\x01")
    assert uart.read(Reg.IIR_FCR, 1)[0] & 0xC0 == 0xC0


def test_uart_loopback_routes_thr_to_rbr_and_mcr_to_msr():
    uart, out, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP | Mcr.OUT2 | Mcr.RTS]))
    uart.write(Reg.RX_TX, b"Z")
    msr = uart.read(Reg.MSR, 1)[0]
    # DSR fell as the lines switched from the modem's (DCD, DSR, CTS) to MCR's outputs.
    want = Msr.CTS | Msr.DCD | Msr.DDSR
    assert (out, uart.read(Reg.RX_TX, 1), msr) == (bytearray(), b"Z", want)


@pytest.mark.parametrize("lcr,received", [(0x00, 0x1F), (0x01, 0x3F), (0x02, 0x7F), (0x03, 0xFF)])
def test_uart_loopback_receives_the_word_length_lcr_sets(lcr, received):
    """PC16550D: the receiver assembles 5 to 8 data bits (LCR bits 0-1), right-justified in
    RBR; the bits above read 0. 0xff looped back with 5-bit words read 0xff."""
    uart, _, _ = make_uart()
    uart.write(Reg.LCR, bytes([lcr]))
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.write(Reg.RX_TX, b"\xff")
    assert uart.read(Reg.RX_TX, 1)[0] == received


def test_uart_loopback_mcr_changes_set_msr_deltas_and_a_modem_status_interrupt():
    """PC16550D, MCR bit 4: in loopback the modem status interrupts work, driven by MCR."""
    uart, _, _ = make_uart()
    uart.write(Reg.IER, bytes([Ier.MSI]))
    uart.write(Reg.MCR, b"\x10")  # loopback, every output off: DCD, DSR and CTS fall
    uart.write(Reg.MCR, b"\x1f")  # every output on: every line rises

    assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.MSI
    assert uart.read(Reg.MSR, 1)[0] == 0xFB  # the four lines, DCTS, DDSR, DDCD
    assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.NO_INT
    uart.write(Reg.MCR, b"\x1b")  # OUT1 off: RI falls, the trailing edge
    assert uart.read(Reg.MSR, 1)[0] == Msr.DSR | Msr.CTS | Msr.DCD | Msr.TERI


def test_uart_loopback_holds_the_irq_line_down():
    """Loopback forces OUT2 inactive, which on a PC closes the IRQ gate."""
    uart, _, irq = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP | Mcr.OUT2]))
    uart.write(Reg.IER, bytes([Ier.RDI]))
    uart.write(Reg.RX_TX, b"Z")

    assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.RDI and irq.count == 0


def test_uart_rbr_read_leaving_data_is_a_new_receive_edge():
    """The ISA line is edge-triggered: a driver that reads IIR and one byte per interrupt
    must get an interrupt for each byte that follows."""
    uart, _, irq = make_uart()
    uart.write(Reg.IER, bytes([Ier.RDI]))
    uart.host_input(b"abc")
    got = []
    for _ in range(3):
        assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.RDI
        got.append(uart.read(Reg.RX_TX, 1))

    assert (b"".join(got), irq.count) == (b"abc", 3)
    assert uart.read(Reg.IIR_FCR, 1)[0] & 0x0F == Iir.NO_INT


def test_uart_fifo_reports_data_below_the_trigger_level_as_a_character_timeout():
    """PC16550D: with FIFOs on, received data is an interrupt at the trigger level; less is
    a character timeout (IIR 0x0C), so a driver never reads past the data on RDA."""
    uart, _, irq = make_uart()
    uart.write(Reg.IIR_FCR, b"\x47")  # FIFOs on and cleared, trigger level 4
    uart.write(Reg.IER, bytes([Ier.RDI]))
    uart.host_input(b"123")
    assert (uart.read(Reg.IIR_FCR, 1)[0], irq.count) == (0xCC, 1)

    uart.host_input(b"45678")
    assert uart.read(Reg.IIR_FCR, 1)[0] == 0xC4
    got = b"".join(uart.read(Reg.RX_TX, 1) for _ in range(4))  # a driver reads 4 on RDA
    assert (got, uart.read(Reg.IIR_FCR, 1)[0]) == (b"1234", 0xC4)  # 4 left: still RDA
    uart.read(Reg.RX_TX, 1)
    assert uart.read(Reg.IIR_FCR, 1)[0] == 0xCC  # 3 left: below the trigger level


def test_uart_turning_the_fifos_off_clears_the_receiver():
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    uart.host_input(b"zz")
    uart.write(Reg.IIR_FCR, b"\x00")

    assert uart.read(Reg.LSR, 1)[0] & Lsr.DR == 0


def test_uart_restored_with_out2_clear_pulses_once_out2_is_set():
    """A pending interrupt behind a closed OUT2 gate is no edge yet: opening it is one."""
    line, irq = FakeLine(), FakeIrq()
    ctx = DeviceContext(irq=irq, out=BoundedOutput(line))
    uart = Uart8250.restore(ctx, UartState(ier=int(Ier.RDI), mcr=0, rx=b"x"))
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))

    assert irq.count == 1


def test_uart_scratch_register_holds_value():
    uart, _, _ = make_uart()
    uart.write(Reg.SCR, b"\x5a")
    assert uart.read(Reg.SCR, 1) == b"\x5a"


def test_uart_wide_access_is_byte_cycles_at_consecutive_ports():
    """An ISA bus splits a word or dword access to a byte-wide device into byte cycles (QEMU
    too); they were counted as bad and dropped: `outw 0x3fb` left LCR and MCR as they were,
    `inw 0x3fd` read zeros."""
    uart, out, _ = make_uart()
    uart.write(Reg.LCR, b"\x83\x0b")  # LCR with DLAB, then MCR
    uart.write(Reg.RX_TX, b"\x01\x00")  # DLL, DLM: 115200 baud
    uart.write(Reg.LCR, b"\x03")
    uart.write(Reg.RX_TX, b"AB")  # THR, then IER
    lsr_msr = uart.read(Reg.LSR, 2)
    singles = uart.read(Reg.LSR, 1) + uart.read(Reg.MSR, 1)
    regs = uart.read(Reg.IER, 4)  # IER, IIR, LCR, MCR
    assert (bytes(out), uart.dll, uart.dlm, uart.ctx.counters.bad_access) == (b"A", 1, 0, 0)
    assert (lsr_msr[0], regs[0], regs[2:]) == (singles[0], ord("B") & 0x0F, b"\x03\x0b")


def test_uart_rx_overflow_sets_overrun_and_counts():
    uart, _, _ = make_uart()
    uart.host_input(b"x" * (RX_BUFFER_MAX + 3))
    lsr = uart.read(Reg.LSR, 1)[0]
    assert (lsr & Lsr.OE, uart.ctx.counters.rx_overrun, uart.read(Reg.LSR, 1)[0] & Lsr.OE) == (
        Lsr.OE,
        3,
        0,
    )


def test_uart_receiver_line_status_outranks_data_ready_then_data_shows():
    """PC16550D table IV: receiver line status (priority 1, IIR 0x06) before received data
    (priority 2, 0x04); reading LSR clears it, and the data's interrupt is next."""
    uart, _, _ = make_uart()
    uart.write(Reg.IER, bytes([Ier.RDI | Ier.RLSI]))
    uart.host_input(b"x" * (RX_BUFFER_MAX + 1))  # data ready, and an overrun
    first = uart.read(Reg.IIR_FCR, 1)[0] & 0x0F
    uart.read(Reg.LSR, 1)
    second = uart.read(Reg.IIR_FCR, 1)[0] & 0x0F

    assert (first, second) == (Iir.RLSI, Iir.RDI)


def test_uart_fcr_clear_receiver_drops_pending_input():
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))  # in 16450 mode the receiver holds one
    uart.host_input(b"abc")
    uart.write(Reg.IIR_FCR, b"\x03")
    assert uart.read(Reg.LSR, 1)[0] & Lsr.DR == 0


def test_uart_size_fifo_in_loopback_after_a_clear_counts_16_with_host_input_waiting():
    """Linux's autoconfig measures the FIFO: clear it, loopback, 256 bytes out, count what
    reads back. Host input waiting before (the monitor sends it as soon as the device has
    room) must not be read back: with 81 bytes of it a FIFO of 64 was counted."""
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    uart.host_input(b"h" * 100)
    uart.write(Reg.IIR_FCR, b"\x07")
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    for i in range(256):
        uart.write(Reg.RX_TX, bytes([i]))
    got = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR and len(got) < 1024:
        got += uart.read(Reg.RX_TX, 1)
    assert bytes(got) == bytes(range(16))


def test_uart_input_on_its_way_when_loopback_starts_reaches_rbr_after_it():
    """The monitor sends input into the room it was told of; a guest may turn loopback on
    (Linux's probe) before it learns there is none. That input waits on the line: the
    loopback test reads back its own bytes only, and the typed ones come after it."""
    uart, _, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.host_input(b"typed")  # sent before the room went to 0
    room = uart.input_buffer()
    uart.write(Reg.RX_TX, b"L")
    looped = uart.read(Reg.RX_TX, 1)
    empty = not uart.read(Reg.LSR, 1)[0] & Lsr.DR

    uart.write(Reg.MCR, bytes([Mcr.OUT2 | Mcr.DTR | Mcr.RTS]))
    got = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR:
        got += uart.read(Reg.RX_TX, 1)

    assert (room, looped, empty, bytes(got)) == ((5, 0), b"L", True, b"typed")
    assert uart.ctx.counters.rx_overrun == 0


def test_uart_input_held_in_loopback_is_saved_and_restored():
    uart, _, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.host_input(b"held")
    state = uart.save()
    restored = Uart8250.restore(DeviceContext(irq=FakeIrq()), state)
    restored.write(Reg.MCR, bytes([Mcr.OUT2]))

    assert (state.line_in, restored.read(Reg.RX_TX, 1)) == (b"held", b"h")


def test_uart_fcr_bits_are_not_programmed_without_bit_0():
    """PC16550D FCR0: "must be a 1 when other FCR bits are written to or they will not be
    programmed": a clear-receiver bit alone drops nothing."""
    uart, _, _ = make_uart()
    uart.host_input(b"x")
    uart.write(Reg.IIR_FCR, b"\x02")
    assert uart.read(Reg.LSR, 1)[0] & Lsr.DR


@pytest.mark.parametrize("fcr", [b"\x07", b"\x00"], ids=["on", "off"])
def test_uart_changing_fcr0_gives_a_thre_interrupt_at_once(fcr):
    """PC16550D: "The transmitter interrupt after changing FCR0 will be immediate, if it is
    enabled": a driver that took the THRE interrupt, then turns the FIFOs on (or off) and
    waits for THRE before it sends, waited forever."""
    uart, _, irq = make_uart()
    if fcr == b"\x00":
        uart.write(Reg.IIR_FCR, b"\x07")
    uart.write(Reg.IER, bytes([Ier.THRI]))
    uart.read(Reg.IIR_FCR, 1)  # THRE taken
    before = irq.count

    uart.write(Reg.IIR_FCR, fcr)

    assert (uart.read(Reg.IIR_FCR, 1)[0] & 0x0F, irq.count) == (Iir.THRI, before + 1)


def test_uart_loopback_with_fifos_holds_16_bytes_then_overruns():
    """PC16550D LSR bit 1: a full FIFO keeps its bytes, the next one is lost and OE set. A
    driver that sizes the FIFO in loopback (Linux's size_fifo) counted 4096."""
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, b"\x07")
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    for k in range(32):
        uart.write(Reg.RX_TX, bytes([k]))
    lsr = uart.read(Reg.LSR, 1)[0]
    got = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR:
        got += uart.read(Reg.RX_TX, 1)
    assert (lsr & Lsr.OE, bytes(got)) == (Lsr.OE, bytes(range(16)))


def test_uart_loopback_without_fifos_overwrites_the_unread_byte():
    """16450 mode: OE, "thereby destroying the previous character"."""
    uart, _, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.write(Reg.RX_TX, b"1")
    uart.write(Reg.RX_TX, b"2")
    lsr = uart.read(Reg.LSR, 1)[0]
    assert (lsr & (Lsr.OE | Lsr.DR), uart.read(Reg.RX_TX, 1)) == (Lsr.OE | Lsr.DR, b"2")
    assert not uart.read(Reg.LSR, 1)[0] & Lsr.DR


def test_uart_16450_loopback_test_with_typed_input_waiting_reads_back_its_own_byte():
    """Input the host buffered past what the chip's receiver holds is the line's, which
    loopback disconnects (PC16550D MCR bit 4). With FIFOs off the receiver holds one byte:
    a looped-back byte overruns it ("thereby destroying the previous character") and reads
    back. It went in behind all the buffered input, and a BIOS's or a diagnostic's test read
    a byte typed during boot instead of its own. The rest comes after loopback ends."""
    uart, _, _ = make_uart()
    uart.host_input(b"abc")
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.write(Reg.RX_TX, b"\x55")
    lsr = uart.read(Reg.LSR, 1)[0]
    looped = uart.read(Reg.RX_TX, 1)
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    after = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR:
        after += uart.read(Reg.RX_TX, 1)
    assert (lsr & (Lsr.DR | Lsr.OE), looped, bytes(after)) == (Lsr.DR | Lsr.OE, b"\x55", b"bc")


def test_uart_fifo_loopback_reads_back_its_byte_after_the_16_the_receiver_held():
    """The same with FIFOs on: the receiver holds 16 bytes of the typed input; once the
    guest read those, its looped-back byte is next, not the 17th typed one."""
    uart, _, _ = make_uart()
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    typed = bytes(range(0x41, 0x41 + 20))
    uart.host_input(typed)
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    held = b"".join(uart.read(Reg.RX_TX, 1) for _ in range(16))
    uart.write(Reg.RX_TX, b"\x55")
    looped = uart.read(Reg.RX_TX, 1)
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    after = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR:
        after += uart.read(Reg.RX_TX, 1)
    assert (held, looped, bytes(after)) == (typed[:16], b"\x55", typed[16:])


def test_uart_save_restore_keeps_registers_and_unread_input():
    uart, _, _ = make_uart()
    uart.write(Reg.SCR, b"\x11")
    uart.host_input(b"typed")
    state = uart.save()
    restored = Uart8250.restore(DeviceContext(irq=FakeIrq()), state)
    assert restored.save() == state


@pytest.mark.parametrize(
    "bad",
    [
        UartState(lcr=256),
        UartState(ier=0x10),
        UartState(rx=b"x" * (RX_BUFFER_MAX + 1)),
        UartState(scr=-1),
    ],
    ids=["lcr-not-a-byte", "ier-reserved-bits", "rx-too-long", "negative"],
)
def test_uart_restore_bad_state_raises_state_error(bad):
    with pytest.raises(StateError):
        Uart8250.restore(DeviceContext(irq=FakeIrq()), bad)


# -- the transmitter against a slow line (output.py) ------------------------------------------
SMALL = 32  # the output buffer's capacity in these tests


BIG = 4 * TEMT_ROOM  # a buffer with room past what TEMT needs, as the real one (4 KiB)


def slow_uart(accept: int = 0, capacity: int = SMALL) -> tuple[Uart8250, FakeLine, FakeIrq]:
    """A UART whose line takes `accept` bytes, then nothing until the test says so."""
    line, irq = FakeLine(accept), FakeIrq()
    return Uart8250(DeviceContext(irq=irq, out=BoundedOutput(line, capacity))), line, irq


def transmit(uart: Uart8250, data: bytes) -> None:
    for byte in data:
        uart.write(Reg.RX_TX, bytes([byte]))


def line_status(uart: Uart8250) -> int:
    return uart.read(Reg.LSR, 1)[0] & (Lsr.THRE | Lsr.TEMT)


def reader_catches_up(uart: Uart8250, line: FakeLine) -> None:
    """What the runtime does when the line polls writable."""
    line.accept = 1 << 30
    uart.ctx.out.flush()
    uart.output_room()


# SERIAL.quiet_while (monitor/mirror.py, news): while it holds of the mirror, the line draining
# raises no interrupt, so a mirror that has not taken the device's news yet is still exact.
def quiet(uart: Uart8250) -> bool:
    mirror = RegisterMirror(SERIAL.mirrored, SERIAL.quiet_while)
    mirror.take(uart.mirror())
    return mirror.quiet


@pytest.mark.parametrize(
    ("ier", "dlab", "quiet_now", "drain_irqs"),
    [
        (Ier.RDI | Ier.RLSI | Ier.MSI, False, True, 0),  # every source but THRE
        (Ier.THRI, False, False, 1),  # THRE: the drain is an interrupt
        (Ier.THRI, True, False, 1),  # DLAB: the mirror shows DLM, not IER
        (0, True, False, 0),  # likewise, with IER off: not quiet, as it cannot be told
    ],
    ids=["thri off", "thri on", "dlab with thri", "dlab without"],
)
def test_uart_quiet_exactly_while_its_line_draining_raises_no_interrupt(
    ier, dlab, quiet_now, drain_irqs
):
    uart, line, irq = slow_uart()
    uart.write(Reg.IER, bytes([ier]))
    transmit(uart, b"x" * SMALL)  # buffered, past a FIFO load's room: THRE and TEMT clear
    assert line_status(uart) == 0
    if dlab:
        uart.write(Reg.LCR, bytes([Lcr.DLAB | Lcr.WLEN8]))
        uart.write(Reg.IER, b"\x00")  # DLM
    uart.host_input(b"y" * (RX_BUFFER_MAX + 1))  # data and an overrun pending: RDI, RLSI
    before = irq.count
    was_quiet = quiet(uart)
    reader_catches_up(uart, line)  # no frame: the host's line took the bytes
    assert (was_quiet, irq.count - before) == (quiet_now, drain_irqs)


# SERIAL.write_behind_while (monitor/writebehind.py): THR writes are held only for a driver
# that polls, whose THRE interrupt is off: no interrupt waits on the flusher's tick.
def wants_write_behind(uart: Uart8250) -> bool:
    mirror = RegisterMirror(SERIAL.mirrored, SERIAL.quiet_while)
    mirror.take(uart.mirror())
    when = SERIAL.write_behind_while
    values = mirror.values([offset for offset, _, _ in when])
    assert values is not None
    return all(condition_holds(v, m, want) for v, (_, m, want) in zip(values, when, strict=True))


@pytest.mark.parametrize(
    ("ier", "dlm", "wanted"),
    [
        (0, None, True),  # a polled driver
        (Ier.THRI, None, False),  # one that waits for the THRE interrupt
        (Ier.THRI, 0x00, False),  # DLAB: offset 1 mirrors DLM, whose bit 1 says nothing
        (Ier.THRI, 0x02, False),
        (0, 0x00, False),  # likewise: THRI cannot be told while DLAB is set
    ],
    ids=["thri off", "thri on", "dlab, thri on, dlm 0", "dlab, thri on, dlm 2", "dlab, thri off"],
)
def test_uart_write_behind_wanted_exactly_while_thri_is_off_and_dlab_clear(ier, dlm, wanted):
    uart, _, _ = slow_uart()
    uart.write(Reg.IER, bytes([ier]))
    if dlm is not None:
        uart.write(Reg.LCR, bytes([Lcr.DLAB | Lcr.WLEN8]))
        uart.write(Reg.IER, bytes([dlm]))  # DLM
    assert wants_write_behind(uart) == wanted


@pytest.mark.parametrize("accept", [0, 1], ids=["byte buffered", "byte taken"])
def test_uart_line_status_after_a_write_is_the_same_whether_the_line_took_it(accept):
    uart, _, _ = slow_uart(accept, BIG)
    transmit(uart, b"a")
    assert line_status(uart) == Lsr.THRE | Lsr.TEMT  # the buffer is the host's: room is left


def test_uart_line_room_below_temt_room_clears_temt_only():
    uart, _, _ = slow_uart(capacity=BIG)
    transmit(uart, b"x" * (BIG - TEMT_ROOM))
    at_room = line_status(uart)
    transmit(uart, b"x")
    assert (at_room, line_status(uart)) == (Lsr.THRE | Lsr.TEMT, Lsr.THRE)


def test_uart_temt_in_a_buffer_smaller_than_temt_room_needs_it_empty():
    uart, _, _ = slow_uart()
    transmit(uart, b"a")
    assert line_status(uart) == Lsr.THRE


def test_uart_line_full_clears_thre_and_temt():
    uart, _, _ = slow_uart(accept=5)
    transmit(uart, bytes(range(5 + SMALL)))
    assert line_status(uart) == 0


def test_uart_line_drained_sets_thre_temt_and_loses_nothing():
    uart, line, _ = slow_uart(accept=5)
    transmit(uart, bytes(range(5 + SMALL)))
    reader_catches_up(uart, line)
    assert (line_status(uart), line.data, uart.ctx.counters.tx_dropped) == (
        Lsr.THRE | Lsr.TEMT,
        bytes(range(5 + SMALL)),
        0,
    )


def test_uart_thr_written_with_thre_clear_drops_and_counts():
    uart, line, _ = slow_uart()
    transmit(uart, b"k" * SMALL + b"lost")
    reader_catches_up(uart, line)
    assert (line.data, uart.ctx.counters.tx_dropped, uart.save().tx_dropped) == (
        b"k" * SMALL,
        4,
        4,
    )


def test_uart_room_appearing_raises_thre_interrupt():
    uart, line, irq = slow_uart()
    uart.write(Reg.IER, bytes([Ier.THRI]))
    transmit(uart, b"x" * SMALL)
    iir_full = uart.read(Reg.IIR_FCR, 1)[0] & 0x0F
    pulses = irq.count
    reader_catches_up(uart, line)
    assert (iir_full, irq.count - pulses, uart.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (
        Iir.NO_INT,
        1,
        Iir.THRI,
    )


def test_uart_fifo_on_thre_needs_room_for_a_fifo_load():
    uart, _, _ = slow_uart()
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    transmit(uart, b"f" * (SMALL - TX_FIFO_LEN + 1))  # room for 15 bytes: not a whole load
    status = line_status(uart)
    transmit(uart, b"g")  # a driver that writes anyway still has room: nothing is lost
    assert (status, uart.ctx.counters.tx_dropped) == (0, 0)


def test_uart_save_keeps_unsent_output_and_restore_sends_it():
    uart, _, _ = slow_uart()
    transmit(uart, b"pending")
    state = uart.save()
    line = FakeLine()
    Uart8250.restore(DeviceContext(irq=FakeIrq(), out=BoundedOutput(line)), state)
    assert (state.tx, state.lsr & (Lsr.THRE | Lsr.TEMT), line.data) == (
        b"pending",
        Lsr.THRE,
        b"pending",
    )


def test_uart_restore_tx_over_capacity_raises_state_error():
    ctx = DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine(), SMALL))
    with pytest.raises(StateError, match="tx buffer"):
        Uart8250.restore(ctx, UartState(tx=b"x" * (SMALL + 1)))


@pytest.mark.parametrize("field", ["rx", "line_in"])
def test_uart_restore_input_over_the_buffer_raises_state_error(field):
    with pytest.raises(StateError, match=f"{field}.* > {RX_BUFFER_MAX} bytes"):
        Uart8250.restore(
            DeviceContext(irq=FakeIrq()), UartState(**{field: b"x" * (RX_BUFFER_MAX + 1)})
        )


# A counter's range as the monitor's stats take it (protocol/control.py), spelled out here:
# serial.MAX_COUNTER is what the check under test compares with
TX_DROPPED_MAX = (1 << 63) - 1


@pytest.mark.parametrize(
    "tx_dropped", [-1, TX_DROPPED_MAX + 1, "3"], ids=["negative", "too-big", "not-an-int"]
)
def test_uart_restore_tx_dropped_out_of_range_raises_state_error(tx_dropped):
    with pytest.raises(StateError, match="tx_dropped=.* is not a counter"):
        Uart8250.restore(DeviceContext(irq=FakeIrq()), UartState(tx_dropped=tx_dropped))


def test_uart_restore_keeps_the_largest_tx_dropped():
    uart = Uart8250.restore(DeviceContext(irq=FakeIrq()), UartState(tx_dropped=TX_DROPPED_MAX))
    assert uart.save().tx_dropped == TX_DROPPED_MAX


def test_uart_restore_refuses_held_input_outside_loopback():
    """line_in reaches rx when loopback ends: with loopback off it never would."""
    with pytest.raises(StateError, match="line_in holds input, and loopback is off"):
        Uart8250.restore(DeviceContext(irq=FakeIrq()), UartState(line_in=b"x"))


def test_uart_state_v1_document_migrates_with_empty_tx():
    doc = json.loads((GOLDENS / "vm" / "v1" / "serial0.json").read_text())
    fields = doc.pop("state")  # the snapshot chunk's name for the fields
    state = codec.state_from_document("serial", UartState, {**doc, "fields": fields})
    uart = Uart8250.restore(DeviceContext(irq=FakeIrq()), state)
    assert (state.tx, state.tx_dropped, line_status(uart)) == (b"", 0, Lsr.THRE | Lsr.TEMT)
    assert state.line_in == b""


def test_uart_state_current_document_round_trips():
    uart, _, _ = slow_uart()
    transmit(uart, b"queued")
    state = uart.save()
    doc = codec.state_document("serial", state)
    assert codec.state_from_document("serial", UartState, doc) == state


# -- the register mirror (monitor/mirror.py): what the device publishes and promises ------------
MIRRORED = (Reg.IER, Reg.LCR, Reg.MCR, Reg.LSR, Reg.MSR, Reg.SCR)  # SERIAL.mirrored, in order


def test_uart_mirror_values_are_what_reads_return():
    uart, _, _ = make_uart()
    uart.write(Reg.SCR, b"\x5a")
    uart.write(Reg.IER, b"\x05")
    values = uart.mirror().values
    assert values == tuple(uart.read(reg, 1) for reg in MIRRORED)


def test_uart_mirror_lsr_not_valid_while_overrun_set():
    uart, _, _ = make_uart()
    uart.host_input(b"x" * (RX_BUFFER_MAX + 1))
    assert uart.mirror().values[MIRRORED.index(Reg.LSR)] is None


def test_uart_lsr_read_clears_overrun_once_and_mirror_is_valid_again():
    uart, _, _ = make_uart()
    uart.host_input(b"x" * (RX_BUFFER_MAX + 1))
    first, second = uart.read(Reg.LSR, 1)[0], uart.read(Reg.LSR, 1)[0]
    assert (first & Lsr.OE, second & Lsr.OE) == (Lsr.OE, 0)
    assert uart.mirror().values[MIRRORED.index(Reg.LSR)] == bytes([second])


def test_uart_mirror_msr_not_valid_while_a_loopback_delta_is_set():
    uart, _, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    assert uart.mirror().values[MIRRORED.index(Reg.MSR)] is None

    assert uart.read(Reg.MSR, 1) == b"\x0b"  # DCD, DSR and CTS fell: read once, here
    assert uart.mirror().values[MIRRORED.index(Reg.MSR)] == b"\x00"


def test_uart_mirror_msr_not_valid_while_a_delta_is_set():
    ctx = DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine()))
    uart = Uart8250.restore(ctx, UartState(msr=int(Msr.DCD | Msr.DCTS)))
    assert uart.mirror().values[MIRRORED.index(Reg.MSR)] is None


def test_uart_credit_no_line_covers_thr_writes_that_keep_every_value():
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(None)))
    before = uart.mirror()
    transmit(uart, b"x" * 100)
    assert (before.credit_offset, before.credit) == (Reg.RX_TX, MAX_CREDIT)
    assert uart.mirror().values == before.values


def test_uart_credit_slow_line_with_bytes_buffered_is_exactly_what_keeps_thre():
    uart, _, _ = slow_uart()
    transmit(uart, b"a")  # buffered: THRE and TEMT set, room for SMALL - 1 more
    before = uart.mirror()
    transmit(uart, b"b" * before.credit)
    kept = uart.mirror().values
    transmit(uart, b"c")
    assert (before.credit, kept) == (SMALL - 2, before.values)
    assert uart.mirror().values != before.values  # one more write clears THRE


@pytest.mark.parametrize("accept", [0, 3], ids=["line takes nothing", "line takes 3 bytes"])
@pytest.mark.parametrize("fifo", [False, True], ids=["fifo off", "fifo on"])
def test_uart_credit_slow_line_with_nothing_buffered_is_exactly_what_keeps_lsr(accept, fifo):
    uart, _, _ = slow_uart(accept, BIG)
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO if fifo else 0]))
    before = uart.mirror()
    transmit(uart, b"b" * before.credit)
    kept = uart.mirror().values
    transmit(uart, b"c" * (accept + 1))  # what the line took, and one more: TEMT clears
    assert (before.credit, kept) == (BIG - TEMT_ROOM, before.values)
    assert uart.mirror().values != before.values


def test_uart_credit_below_temt_room_is_exactly_what_keeps_thre():
    uart, _, _ = slow_uart(capacity=BIG)
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    transmit(uart, b"a" * (BIG - TEMT_ROOM + 1))  # TEMT clear, THRE set
    before = uart.mirror()
    transmit(uart, b"b" * before.credit)
    kept = uart.mirror().values
    transmit(uart, b"c")
    assert (before.credit, kept) == (TEMT_ROOM - 1 - TX_FIFO_LEN, before.values)
    assert uart.mirror().values != before.values  # one more write clears THRE


def test_uart_credit_loopback_is_none():
    uart, _, _ = make_uart()
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    assert uart.mirror().credit == 0


def test_uart_credit_dlab_set_covers_divisor_writes():
    uart, _, _ = slow_uart()
    uart.write(Reg.LCR, bytes([Lcr.DLAB | Lcr.WLEN8]))
    before = uart.mirror()
    uart.write(Reg.RX_TX, b"\x01")
    assert (before.credit, uart.mirror().values) == (MAX_CREDIT, before.values)


def test_uart_replay_sends_no_edge_the_dead_process_sent_and_restart_sends_one_if_pending():
    """A crash restart re-applies the journal to the registers only: the guest had the edges
    its frames raised. after_restart sends one if an interrupt is pending then, for the one
    the dead process may have died before sending."""
    from splitvmm.devprocs import runtime
    from splitvmm.protocol import wire

    uart, _, _ = make_uart()
    checkpoint = uart.save()
    journal = [
        (wire.encode_write(Reg.MCR, bytes([Mcr.OUT2])), 0),
        (wire.encode_write(Reg.IER, bytes([Ier.THRI])), 0),  # THR empty: THRI, an edge
        (wire.encode_read(0, Reg.IIR_FCR, 1), 0),  # read: THRI taken back, the line falls
        (wire.encode_write(Reg.RX_TX, b"x"), 0),  # THR empty again at once: THRI, an edge
    ]
    irq = FakeIrq()
    back = Uart8250.restore(DeviceContext(irq=irq, restarted=True), checkpoint)
    runtime.replay(back, journal, runtime.Checkpoints(back))
    replayed = irq.count
    back.after_restart()
    assert (replayed, irq.count) == (0, 1)


# -- the register mirror's contract, whatever the guest and the host do (hypothesis) ---------
# The monitor answers reads of the mirrored registers from the last MIRROR this device sent,
# and after posted THR writes within its credit, without asking the device (monitor/mirror.py).
# That is only right if, after any sequence of guest accesses and host events: each value the
# mirror gives is what a read returns then, and that read changes nothing (no state, no
# interrupt edge: the device never sees it); and THR writes within the credit leave every
# value as it was, whatever the host's line takes between them (it only makes room).
def uart_step() -> st.SearchStrategy[tuple[str, int, bytes]]:
    """A guest access ((offset, data) inside the 8-port window; a read is data's length) or
    a host event, as (kind, offset, data)."""
    access = st.integers(0, 7).flatmap(
        lambda at: st.tuples(
            st.sampled_from(["read", "write"]),
            st.just(at),
            st.binary(min_size=1, max_size=min(4, 8 - at)),
        )
    )
    host = st.tuples(
        st.sampled_from(["input", "drain", "hold", "release"]),
        st.integers(0, 40),
        st.binary(max_size=40),
    )
    thr = st.tuples(st.just("thr"), st.integers(1, 40), st.just(b""))
    return st.one_of(access, host, thr)


def apply_step(uart: Uart8250, line: FakeLine, step: tuple[str, int, bytes]) -> None:
    kind, n, data = step
    match kind:
        case "read":
            uart.read(n, len(data))
        case "write":
            uart.write(n, data)
        case "input":
            uart.host_input(data)
        case "drain":  # the host's line takes n more bytes, as the runtime flushes on POLLOUT
            line.accept += n
            uart.ctx.out.flush()
            uart.output_room()
        case "hold" | "release":  # a snapshot holds the output (runtime.py quiesce)
            uart.ctx.out.held = kind == "hold"
            uart.output_room()
        case "thr":
            transmit(uart, bytes(n))


def assert_mirror_answers_reads(uart: Uart8250, irq: FakeIrq) -> None:
    mirror = uart.mirror()
    for reg, value in zip(MIRRORED, mirror.values, strict=True):
        if value is None:
            continue
        before, edges = uart.save(), irq.count
        assert uart.read(reg, 1) == value, f"{reg.name}: the mirror says {value.hex()}"
        assert (uart.save(), irq.count) == (before, edges), f"reading {reg.name} changed the UART"


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(uart_step(), max_size=30),
    capacity=st.sampled_from([SMALL, BIG, 4096]),
    accept=st.integers(0, 64),
    credit_writes=st.integers(0, 300),
    drains=st.lists(st.integers(0, 8), max_size=8),
)
def test_uart_mirror_answers_every_read_and_keeps_its_credit_after_any_history(
    steps, capacity, accept, credit_writes, drains
):
    uart, line, irq = slow_uart(accept, capacity)
    for step in steps:
        apply_step(uart, line, step)
        assert_mirror_answers_reads(uart, irq)

    mirror = uart.mirror()
    lsr = MIRRORED.index(Reg.LSR)
    for i in range(min(mirror.credit, credit_writes)):  # posted writes, the host draining
        uart.write(mirror.credit_offset, bytes([i & 0xFF]))
        if drains:
            apply_step(uart, line, ("drain", drains[i % len(drains)], b""))
    after = uart.mirror().values
    for i, (was, now) in enumerate(zip(mirror.values, after, strict=True)):
        if was is None or i == lsr and drains:
            continue
        assert now == was, f"{MIRRORED[i].name} moved within the credit"
    if drains and mirror.values[lsr] is not None and after[lsr] is not None:
        # room only grows with the host's drains: what THRE and TEMT said stays said
        kept = mirror.values[lsr][0] & (Lsr.THRE | Lsr.TEMT)
        assert after[lsr][0] & kept == kept

    document = json.loads(json.dumps(codec.state_document("serial", uart.save())))
    fresh = DeviceContext(irq=FakeIrq(), out=BoundedOutput(FakeLine(0), capacity))
    restored = Uart8250.restore(fresh, codec.state_from_document("serial", UartState, document))
    assert restored.save() == uart.save()


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(uart_step(), max_size=30),
    capacity=st.sampled_from([SMALL, BIG, 4096]),
    accept=st.integers(0, 64),
)
def test_uart_quiet_reads_change_nothing_its_mirror_says_after_any_history(steps, capacity, accept):
    """The runtime restamps the monitor's copy after a quiet read without asking mirror()
    again (runtime.MirrorPublisher applied_read): such a read must leave every value, the
    credit's offset and the credit as they were, in any state."""
    uart, line, _ = slow_uart(accept, capacity)
    for step in steps:
        apply_step(uart, line, step)
        for offset in sorted(uart.quiet_reads()):
            before = uart.mirror()
            uart.read(offset, 1)
            assert uart.mirror() == before, f"reading {Reg(offset).name} changed the mirror"


def test_uart_quiet_reads_leave_out_the_reads_that_clear_something() -> None:
    assert uart_quiet() == {Reg.IER, Reg.IIR_FCR, Reg.LCR, Reg.MCR, Reg.SCR}


def uart_quiet() -> set[int]:
    return set(Uart8250(DeviceContext(irq=FakeIrq())).quiet_reads())


# -- a crash restart, whatever came before and after (hypothesis) ----------------------------
# With on_crash = restart the guest must not notice: the successor starts from the last
# checkpoint, re-applies the frames since (devprocs/runtime.py replay), and drops the output
# bytes the dead process had written already (output.py skip: exact for a regular file, the
# FakeLine here). Checked against a twin UART that never crashed, fed the same frames and
# the same host line: after every step the two hold the same state, and their lines the
# same bytes (none lost, none twice).
def frame_step() -> st.SearchStrategy[tuple[str, int, bytes]]:
    """What the monitor sends (accesses of 1, 2 or 4 bytes inside the window, input in
    chunks of at most 8 bytes), the host's line draining, a checkpoint, a crash."""
    access = st.sampled_from([1, 2, 4]).flatmap(
        lambda size: st.tuples(
            st.sampled_from(["read", "write"]),
            st.integers(0, 8 - size),
            st.binary(min_size=size, max_size=size),
        )
    )
    return st.one_of(
        access,
        st.tuples(st.just("input"), st.just(0), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("drain"), st.integers(0, 40), st.just(b"")),
        st.tuples(st.just("thr"), st.integers(1, 40), st.just(b"")),
        st.sampled_from([("checkpoint", 0, b""), ("crash", 0, b"")]),
    )


def as_frame(kind: str, offset: int, data: bytes) -> bytes | None:
    from splitvmm.protocol import wire

    match kind:
        case "read":
            return wire.encode_read(0, offset, len(data))
        case "write":
            return wire.encode_write(offset, data)
        case "input" if data:  # the monitor sends no empty input
            return wire.encode_input(data)
    return None


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(frame_step(), max_size=40),
    capacity=st.sampled_from([SMALL, BIG]),
    accept=st.integers(0, 64),
)
# the line takes bytes between the checkpoint and the crash: THRE rose for the dead process
@example([("thr", 40, b""), ("checkpoint", 0, b""), ("drain", 5, b""), ("crash", 0, b"")], SMALL, 0)
def test_uart_crash_restart_is_invisible_to_the_guest_and_the_line(steps, capacity, accept):
    from splitvmm.devprocs import runtime
    from splitvmm.protocol import wire

    uart, line, _ = slow_uart(accept, capacity)
    twin, twin_line, _ = slow_uart(accept, capacity)
    checkpoint, emitted, journal = uart.save(), 0, []

    def send(frame: bytes) -> bytes | None:
        """The frame to both UARTs (the twin's reply: theirs are the same), journaled."""
        journal.append(frame)
        runtime._apply(uart, wire.decode_access(frame, 8))
        return runtime._apply(twin, wire.decode_access(frame, 8))

    for kind, n, data in steps:
        if kind == "checkpoint":
            checkpoint, emitted, journal = uart.save(), uart.ctx.out.emitted, []
        elif kind == "crash":
            out = BoundedOutput(line, capacity)  # the same file, reopened by the successor
            out.emitted, out.skip = emitted, max(0, len(line.data) - emitted)
            restarted = DeviceContext(irq=FakeIrq(), out=out, restarted=True)
            uart = Uart8250.restore(restarted, checkpoint)
            runtime.replay(uart, [(f, 0) for f in journal], runtime.Checkpoints(uart))
            uart.after_restart()
        elif kind == "drain":
            apply_step(uart, line, (kind, n, data))
            apply_step(twin, twin_line, (kind, n, data))
        elif kind == "thr":  # a driver that polls THRE before each byte
            for i in range(n):
                lsr = send(wire.encode_read(0, Reg.LSR, 1))
                if lsr is None or not lsr[0] & Lsr.THRE:
                    break
                send(wire.encode_write(Reg.RX_TX, bytes([i])))
        else:
            frame = as_frame(kind, n, data)
            if frame is not None:
                send(frame)
        if twin.ctx.counters.tx_dropped:
            # A driver that overran the line (a THR write with THRE clear: the byte dropped)
            # is left out: its successor replays the writes with the room the line made
            # since the checkpoint there from the start, and may take a byte it dropped.
            return
        ours, theirs = uart.save(), twin.save()
        if ours.thr_interrupt and not theirs.thr_interrupt and ours.lsr & Lsr.THRE:
            ours = replace(ours, thr_interrupt=False)  # the spare one after_restart raises
        assert ours == theirs
        assert bytes(line.data) == bytes(twin_line.data)


def test_uart_restart_after_the_line_took_bytes_raises_the_thre_interrupt_it_missed():
    """The host's line made room after the last checkpoint: the dead process saw THRE rise
    (a THRE interrupt) at a moment no frame records. Its successor finds THRE set already,
    with no rise to see; an interrupt-driven driver (Linux's tty path: THRI enabled, waiting
    for it to send more) would have waited for ever. It gets the interrupt again."""
    uart, line, _ = slow_uart(0, SMALL)
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    uart.write(Reg.IER, bytes([Ier.THRI]))
    uart.read(Reg.IIR_FCR, 1)  # the driver takes the THRE interrupt enabling THRI raised
    transmit(uart, bytes(SMALL))  # the line takes nothing: THRE clear
    checkpoint, emitted = uart.save(), uart.ctx.out.emitted
    line.accept = 1
    uart.ctx.out.flush()
    uart.output_room()  # THRE rises: the dead process's THRE interrupt, then it dies

    out = BoundedOutput(line, SMALL)
    out.emitted, out.skip = emitted, len(line.data) - emitted
    irq = FakeIrq()
    successor = Uart8250.restore(DeviceContext(irq=irq, out=out, restarted=True), checkpoint)
    successor.after_restart()

    assert (irq.count, successor.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (1, Iir.THRI)


def test_uart_restored_with_a_line_that_takes_its_buffer_raises_the_thre_interrupt():
    """Saved with its buffer full (THRE clear, a driver waiting for the THRE interrupt), and
    restored where the output takes the buffered bytes at once: THRE rises, as it would have
    had the VM run on, and that is a THRE interrupt, with its edge."""
    uart, _, _ = slow_uart(0, SMALL)
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    uart.write(Reg.IER, bytes([Ier.THRI]))
    uart.read(Reg.IIR_FCR, 1)  # the driver takes the THRE interrupt enabling THRI raised
    transmit(uart, bytes(SMALL))  # the line takes nothing: THRE clear
    state = uart.save()
    assert not state.lsr & Lsr.THRE

    irq = FakeIrq()
    restored = Uart8250.restore(DeviceContext(irq=irq, out=BoundedOutput(FakeLine(), SMALL)), state)

    assert (irq.count, restored.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (1, Iir.THRI)


def test_uart_restored_with_an_interrupt_pending_sends_its_edge():
    """The saved UART's edge went out before the snapshot, but KVM injects an irqfd from a
    kernel worker, maybe after the coordinator read the irqchip. With no edge sent again, the
    interrupt was lost for good: no new edge comes until the driver reads IIR, which it does
    from the interrupt handler it never ran."""
    line, irq = FakeLine(), FakeIrq()
    state = UartState(ier=int(Ier.RDI), mcr=int(Mcr.OUT2), rx=b"x")  # RDI pending, unread

    uart = Uart8250.restore(DeviceContext(irq=irq, out=BoundedOutput(line)), state)

    assert (irq.count, uart.read(Reg.IIR_FCR, 1)[0] & 0x0F) == (1, Iir.RDI)


def test_uart_restarted_with_an_interrupt_pending_leaves_the_edge_to_after_restart():
    line, irq = FakeLine(), FakeIrq()
    state = UartState(ier=int(Ier.RDI), mcr=int(Mcr.OUT2), rx=b"x")
    ctx = DeviceContext(irq=irq, out=BoundedOutput(line), restarted=True)

    uart = Uart8250.restore(ctx, state)
    before = irq.count
    uart.after_restart()

    assert (before, irq.count) == (0, 1)


@pytest.mark.parametrize("loopback", [False, True], ids=["rx", "line_in"])
def test_uart_input_past_the_buffer_is_dropped_and_its_state_restores(loopback):
    """More host input than RX_BUFFER_MAX (the monitor's mistake: it sends into the room it
    was told of) is counted as an overrun and dropped, never held: the receive buffer stays
    bounded, and the state a snapshot takes of it is one a restore accepts."""
    uart, _, _ = make_uart()
    if loopback:
        uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    uart.host_input(b"x" * (RX_BUFFER_MAX + 3))

    assert (uart.input_buffer()[0], uart.ctx.counters.rx_overrun) == (RX_BUFFER_MAX, 3)
    restored = Uart8250.restore(DeviceContext(irq=FakeIrq()), uart.save())
    assert restored.input_buffer()[0] == RX_BUFFER_MAX


# -- the THRE interrupt of a draining line, and the mirror ---------------------------------------
class MonitorChannel:
    """The monitor's DeviceChannel as the slot uses it: its news is what the device sent on
    the socket by then; a read goes to the device, its events and MIRROR before its reply."""

    def __init__(self, slot: DeviceSlot, end: MonitorEnd, *forwarded: threading.Event) -> None:
        self.slot, self.end, self.forwarded = slot, end, forwarded
        self.mirror = RegisterMirror(SERIAL.mirrored, SERIAL.quiet_while)
        self.seq = 0

    def _handled(self, buf: bytes) -> bool:
        if wire.is_mirror(buf):
            self.mirror.take(wire.decode_mirror(buf, SERIAL.mirrored, Uart8250.WINDOW))
            return True
        if wire.is_checkpoint(buf):
            return True
        event = events.event_in(buf, "serial")
        if event is not None and not isinstance(event, events.Published):
            self.slot._on_event(event)
        return event is not None

    def drain_events(self, limited: bool = True) -> None:
        self.mirror.news_taken()
        while True:
            try:
                buf = self.end.recv(0)
            except TimeoutError:
                return
            assert self._handled(buf)

    def read(self, offset: int, size: int) -> bytes:
        self.seq += 1
        self.end.send(wire.encode_read(self.seq, offset, size))
        for event in self.forwarded:  # the read is on its way to the device
            event.set()
        while self._handled(buf := self.end.recv()):
            pass
        self.mirror.news_taken()
        data, stamp = wire.decode_read_reply(buf, self.seq, size)
        if stamp is not None:
            self.mirror.restamp(stamp)
        return data


class GuestIsr:
    """The UART's interrupt line: its edge runs the guest's handler on a vCPU (a thread),
    which reads LSR first, through the slot. The edge returns once that read has its answer
    from the mirror, or has gone to the device: a vCPU that is quicker than the device."""

    def __init__(self) -> None:
        self.slot: DeviceSlot | None = None
        self.uart: Uart8250 | None = None
        self.decided = threading.Event()
        self.handler: threading.Thread | None = None
        self.read: list[int] = []
        self.held: list[int] = []  # what the 8250 itself held at the edge

    def trigger(self) -> None:
        if self.slot is None or self.uart is None:
            return  # an edge of the set-up, before the guest looks
        self.held.append(self.uart._lsr_value(self.uart._holding_empty()))
        self.handler = threading.Thread(target=self._handle)
        self.handler.start()
        assert self.decided.wait(5)

    def _handle(self) -> None:
        assert self.slot is not None
        self.read.append(self.slot.read(Reg.LSR, 1)[0])
        self.decided.set()


def full_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\0" * 512)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


def test_lsr_read_on_the_thre_interrupt_of_a_draining_line_sees_thre(tmp_path: Path, monkeypatch):
    """An interrupt-driven driver (THRI on) filled the line; the host's reader catches up:
    THRE rises, and with it the THRE interrupt. A handler that reads LSR first must see THRE
    set (the 8250 holds it set: that is what the interrupt says), not the mirror's value
    from before the line drained."""
    r, w = full_pipe()
    isr = GuestIsr()
    uart = Uart8250(DeviceContext(irq=isr, out=BoundedOutput(FdLine(w), 32)))
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    uart.write(Reg.IER, bytes([Ier.THRI]))
    uart.read(Reg.IIR_FCR, 1)  # the THRE interrupt enabling THRI raised, taken
    for byte in bytes(32):  # the driver fills the line: THRE clear
        uart.write(Reg.RX_TX, bytes([byte]))
    assert not uart._lsr_value(uart._holding_empty()) & Lsr.THRE

    monitor_end, device_end = channel_pair()
    uart.ctx.events.connect(device_end.send_now)  # as _serve_sandboxed() does
    slot = DeviceSlot(Spawn("serial0", "serial", 8), tmp_path, None, None)  # type: ignore[arg-type]
    forwarded = threading.Event()
    slot.channel = MonitorChannel(slot, monitor_end, forwarded, isr.decided)  # type: ignore[assignment]
    slot.state = SlotState.LIVE
    isr.slot, isr.uart = slot, uart

    def steps(loop: EventLoop) -> None:
        os.set_blocking(r, False)
        try:
            while os.read(r, 65536):
                pass
        except BlockingIOError:
            pass  # the host's reader took everything: the line polls writable
        loop.step()  # the line drains: THRE rises, its edge, then the new MIRROR
        if forwarded.is_set():
            loop.step()  # the handler's read, which came to the device

    monkeypatch.setattr(EventLoop, "run", steps)
    try:
        runtime.serve(uart, device_end, runtime.Checkpoints(uart))
        assert isr.handler is not None
        isr.handler.join(5)
        assert isr.held == [Lsr.THRE | Lsr.TEMT]  # the 8250 at the interrupt
        assert isr.read == isr.held  # what the guest's read got
    finally:
        for fd in (r, w):
            os.close(fd)
        monitor_end.close()
        device_end.close()


def drain_rx(uart: Uart8250) -> bytes:
    got = bytearray()
    while uart.read(Reg.LSR, 1)[0] & Lsr.DR and len(got) <= RX_BUFFER_MAX:
        got += uart.read(Reg.RX_TX, 1)
    return bytes(got)


def clear_fifos(uart: Uart8250) -> None:
    """Linux's serial8250_clear_fifos (autoconfig, and serial8250_do_startup at each first
    open of the tty): FIFOs on, both cleared, FIFOs off."""
    for fcr in (Fcr.ENABLE_FIFO, Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT, 0):
        uart.write(Reg.IIR_FCR, bytes([fcr]))


def test_uart_fifo_clear_keeps_the_input_the_host_buffered_behind_the_receiver():
    """PC16550D FCR bit 1 clears "all bytes in the RCVR FIFO": 16 at most. The host input
    `rx` holds past that is the line's (RX_BUFFER_MAX: "so that pasted input is not lost
    while the guest is slow"); the monitor stops reading stdin only once it is full. A
    paste, or commands piped into `splitvmm up`, that arrived before the guest's driver
    opened the port was dropped whole (up to 4 KiB) by Linux's clear_fifos."""
    uart = make_uart()[0]
    typed = bytes(range(256)) * 4  # 1 KiB, waiting before the driver starts
    uart.host_input(typed)

    clear_fifos(uart)
    got = drain_rx(uart)

    assert typed.endswith(got)
    assert len(typed) - len(got) <= RX_FIFO_LEN, f"{len(typed) - len(got)} bytes dropped"


def test_uart_size_fifo_after_a_clear_still_reads_back_only_its_own_bytes_and_keeps_input():
    """The clear keeps the host's backlog, and a loopback test right after it still reads
    back its own bytes only (Linux's size_fifo counts 16); the backlog comes after it."""
    uart = make_uart()[0]
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    typed = b"h" * 100
    uart.host_input(typed)
    uart.write(Reg.IIR_FCR, b"\x07")
    uart.write(Reg.MCR, bytes([Mcr.LOOP]))
    for i in range(256):
        uart.write(Reg.RX_TX, bytes([i]))
    looped = drain_rx(uart)
    uart.write(Reg.MCR, bytes([Mcr.OUT2]))
    after = drain_rx(uart)

    assert looped == bytes(range(RX_FIFO_LEN))
    assert typed.endswith(after) and len(typed) - len(after) <= RX_FIFO_LEN


def test_uart_loopback_transmitter_empties_whatever_the_hosts_line_does():
    """PC16550D MCR bit 4: in loopback "the output of the Transmitter Shift Register is
    looped back into the Receiver Shift Register input" and SOUT is held marking: "data
    that is transmitted is immediately received". THRE and TEMT stood for the host's line,
    which loopback disconnects: with it full (a terminal stopped with Ctrl-S, a `unix:`
    listener or a pipe that does not read yet) they stayed clear, and a loopback FIFO
    probe that waits for TEMT after each byte (FreeBSD uart(4) ns8250_bus_probe) gave up."""
    line = FakeLine(0)  # takes nothing
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(line, 32)))
    for _ in range(32):  # boot messages the host has not read yet: the line is full
        uart.write(Reg.RX_TX, b".")
    uart.write(Reg.MCR, bytes([Mcr.LOOP | Mcr.OUT2 | Mcr.DTR | Mcr.RTS]))
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT]))
    count, lsr = 0, 0
    while not lsr & Lsr.OE and count < 130:
        uart.write(Reg.RX_TX, b"\x00")
        count += 1
        lsr = uart.read(Reg.LSR, 1)[0]
        assert lsr & Lsr.TEMT, f"TEMT clear after looped byte {count}"
    assert count - 1 == RX_FIFO_LEN


def test_uart_fifo_enable_from_16450_mode_clears_the_one_byte_the_receiver_holds():
    """PC16550D FCR0: "When changing from the FIFO Mode to the 16450 Mode and vice versa,
    data is automatically cleared from the FIFOs". In 16450 mode (FCR0 clear, a UART's reset
    state, where Linux's autoconfig starts with `serial_out(UART_FCR, UART_FCR_ENABLE_FIFO)`)
    the receiver holds one byte, RBR (the model's own _write_mcr: `held = ... 1` with FIFOs
    off); the host's backlog behind it is the line's. Turning FIFOs on dropped 16 bytes of
    `rx`, 15 of them typed input that had never reached the receiver."""
    uart = make_uart()[0]
    typed = bytes(range(100))
    uart.host_input(typed)  # FCR is 0: 16450 mode

    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))
    got = drain_rx(uart)

    assert typed.endswith(got)
    assert len(typed) - len(got) <= 1, f"{len(typed) - len(got)} bytes dropped"


def test_uart_linux_clear_fifos_from_16450_mode_drops_at_most_the_receivers_byte():
    """serial8250_clear_fifos as autoconfig and the first open run it on a port whose FIFOs
    are off: ENABLE_FIFO, ENABLE_FIFO | CLEAR_RCVR | CLEAR_XMIT, 0."""
    uart = make_uart()[0]
    typed = b"echo pasted before getty opened the port\n" * 8
    uart.host_input(typed)

    for fcr in (Fcr.ENABLE_FIFO, Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT, 0):
        uart.write(Reg.IIR_FCR, bytes([fcr]))
    got = drain_rx(uart)

    assert typed.endswith(got)
    assert len(typed) - len(got) <= 1, f"{len(typed) - len(got)} bytes dropped"


def test_uart_linux_probe_open_and_termios_lose_a_byte_per_fifo_enable_not_16():
    """Linux's own sequence, FIFOs off at each FCR0 0 -> 1: autoconfig's probe
    (FCR=ENABLE_FIFO), its closing clear_fifos and RBR read; the first open's clear_fifos
    and the reads that clear the interrupt registers; set_termios's two-step FCR write
    (ENABLE_FIFO, then ENABLE_FIFO | trigger 8). The commit counted 51 bytes of a 1 KiB
    paste lost here: 16 at each of the three FIFO enables, each from 16450 mode, where the
    receiver holds one byte."""
    uart = make_uart()[0]
    typed = bytes(range(256)) * 4
    uart.host_input(typed)
    read_on_purpose = 0

    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))  # autoconfig: is there a FIFO?
    uart.read(Reg.IIR_FCR, 1)
    for fcr in (Fcr.ENABLE_FIFO, Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT, 0):
        uart.write(Reg.IIR_FCR, bytes([fcr]))  # autoconfig's reset: clear_fifos
    uart.read(Reg.RX_TX, 1)  # ...and serial_in(UART_RX)
    read_on_purpose += 1
    for fcr in (Fcr.ENABLE_FIFO, Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT, 0):
        uart.write(Reg.IIR_FCR, bytes([fcr]))  # serial8250_do_startup: clear_fifos
    for reg in (Reg.LSR, Reg.RX_TX, Reg.IIR_FCR, Reg.MSR):  # "clear the interrupt registers"
        uart.read(reg, 1)
    read_on_purpose += 1
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO]))  # set_termios, two steps
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO | 0x80]))
    got = drain_rx(uart)

    assert typed.endswith(got)
    assert len(typed) - len(got) - read_on_purpose <= 3, f"{len(typed) - len(got)} bytes lost"


def test_uart_freebsd_probe_leaving_its_looped_bytes_unread_drops_no_waiting_input():
    """FreeBSD uart(4) ns8250_bus_probe on a port in 16450 mode: loopback on, FIFOs on and
    reset, THR writes until LSR says OE (16 bytes in the receiver), loopback off without
    reading them, FIFOs reset. Host input that waited from before (commands piped into
    `splitvmm up`: the monitor sends all the room the device reports) goes behind those 16
    bytes when loopback ends; with the buffer full of it, the last 15 found no room and
    were dropped as an overrun."""
    uart = make_uart()[0]
    waiting, holds = uart.input_buffer()
    typed = bytes(i % 251 for i in range(holds - waiting))
    uart.host_input(typed)

    uart.write(Reg.MCR, bytes([Mcr.LOOP | Mcr.OUT2 | Mcr.DTR | Mcr.RTS]))
    for fcr in (Fcr.ENABLE_FIFO, Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT):
        uart.write(Reg.IIR_FCR, bytes([fcr]))
    transmit(uart, bytes(RX_FIFO_LEN + 1))  # the 17th overruns: a 16-byte FIFO
    uart.write(Reg.MCR, bytes([Mcr.OUT2 | Mcr.DTR | Mcr.RTS]))
    uart.write(Reg.IIR_FCR, bytes([Fcr.ENABLE_FIFO | Fcr.CLEAR_RCVR | Fcr.CLEAR_XMIT]))
    got = drain_rx(uart)

    assert len(typed) - len(got) <= 1, f"{len(typed) - len(got)} bytes dropped"
    assert typed.endswith(got)
