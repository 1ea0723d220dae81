"""The MC146818A model against a fake host clock and a fake irq (no process, no channel).

Times below are datasheet facts: 1 s update cycles, UIP from 244.140625 us (8 ticks of the
32.768 kHz time base) before an update to the end of the 1984 us cycle, periodic rates
65536 >> RS Hz (RS 1 and 2: 256 and 128 Hz), and the first update half a second after the
divider chain leaves reset.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.devprocs import runtime
from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.rtc import (
    CMOS_SIZE,
    MAX_OFFSET_NS,
    NS,
    UPDATE_CYCLE_NS,
    Mc146818,
    Reg,
    RegA,
    RegB,
    RegC,
    RtcState,
)
from splitvmm.errors import ConfigError, StateError
from splitvmm.protocol import codec, wire
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.record import replace
from tests.fakes import FakeClock, FakeIrq

# Friday 14 March 2025, 15:09:26 UTC, half way through the second.
PI_DAY = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)
HALF = NS // 2
TIME = (Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH, Reg.MONTH)
TIME_AND_YEAR = (*TIME, Reg.YEAR, Reg.CENTURY)
PI_DAY_BCD = (0x26, 0x09, 0x15, 0x06, 0x14, 0x03, 0x25, 0x20)
GOLDENS = Path(__file__).resolve().parents[1] / "conformance" / "goldens" / "rtc"


def ns_of(when: datetime) -> int:
    return int(when.timestamp()) * NS


def make_rtc(
    when: datetime = PI_DAY, phase: int = HALF, **options: object
) -> tuple[Mc146818, FakeClock, FakeIrq]:
    clock, irq = FakeClock(ns_of(when) + phase, utc_offset=2 * 3600), FakeIrq()
    return Mc146818.from_options(DeviceContext(irq=irq), options, clock), clock, irq


def rd(rtc: Mc146818, reg: int) -> int:
    rtc.write(0, bytes([reg]))
    return rtc.read(1, 1)[0]


def wr(rtc: Mc146818, reg: int, value: int) -> None:
    rtc.write(0, bytes([reg]))
    rtc.write(1, bytes([value]))


def regs(rtc: Mc146818, which: tuple[int, ...] = TIME_AND_YEAR) -> tuple[int, ...]:
    return tuple(rd(rtc, r) for r in which)


def set_time(rtc: Mc146818, values: dict[int, int]) -> None:
    """The datasheet's way: SET, write the registers, clear SET."""
    control = rd(rtc, Reg.CONTROL)
    wr(rtc, Reg.CONTROL, control | RegB.SET)
    for reg, value in values.items():
        wr(rtc, reg, value)
    wr(rtc, Reg.CONTROL, control)


def run_to_deadline(rtc: Mc146818, clock: FakeClock) -> float:
    """Advance the clock to the model's next deadline and tick; the seconds waited."""
    deadline = rtc.next_deadline()
    assert deadline is not None
    waited = deadline - clock.mono
    clock.advance(round(waited * NS))
    rtc.tick(deadline)
    return waited


# -- power-on and reading the time -------------------------------------------------------
def test_rtc_power_on_status_registers_are_the_pc_defaults():
    rtc, _, _ = make_rtc()
    assert regs(rtc, (Reg.FREQ_SELECT, Reg.CONTROL, Reg.INTR_FLAGS, Reg.VALID)) == (
        0x26,
        RegB.H24,
        0,
        0x80,
    )


def nvram(below: int, above: int = 0, vcpus: int = 1) -> bytes:
    """CMOS bytes 0x00-0x7F of a clock told this machine, as the guest reads them."""
    machine = {"ram_below_4g": below, "ram_above_4g": above, "vcpus": vcpus}
    ctx = DeviceContext(irq=FakeIrq(), transport={"machine": machine})
    rtc = Mc146818.from_options(ctx, {}, FakeClock(ns_of(PI_DAY) + HALF))
    return bytes(rd(rtc, reg) for reg in range(0x80))


def test_rtc_nvram_tells_firmware_its_memory_and_cpus_as_a_pc_cmos_does():
    """64 MiB, 2 vCPUs: 640 KiB base; 63 MiB = 0xFC00 KiB above 1 MiB (0x17 and 0x30, as an AT
    BIOS copies it); 48 MiB = 0x300 chunks of 64 KiB above 16 MiB; none above 4 GiB; 1."""
    cmos = nvram(64 << 20, vcpus=2)
    assert cmos[0x15:0x19] == bytes([0x80, 0x02, 0x00, 0xFC])
    assert cmos[0x30:0x32] == bytes([0x00, 0xFC])
    assert cmos[0x34:0x36] == bytes([0x00, 0x03])
    assert cmos[0x5B:0x60] == bytes([0, 0, 0, 0, 1])
    assert int.from_bytes(cmos[0x2E:0x30], "big") == sum(cmos[0x10:0x2E])


def test_rtc_nvram_of_ram_past_the_pci_hole_caps_the_words_and_counts_high_memory():
    """3.5 GiB below the hole (0xDF00 chunks above 16 MiB), 4.5 GiB above 4 GiB (0x12000 chunks,
    24 bits); the KiB above 1 MiB stop at 0xFFFF."""
    cmos = nvram(0xE0000000, 0x120000000, vcpus=8)
    assert cmos[0x17:0x19] == cmos[0x30:0x32] == bytes([0xFF, 0xFF])
    assert cmos[0x34:0x36] == bytes([0x00, 0xDF])
    assert cmos[0x5B:0x5E] == bytes([0x00, 0x20, 0x01]) and cmos[0x5F] == 7


def test_rtc_nvram_is_state_a_restore_keeps():
    """A guest that rewrites the NVRAM reads back its own bytes after a restore, not the
    machine's: the bytes are the CMOS's, saved with it."""
    machine = {"ram_below_4g": 64 << 20, "ram_above_4g": 0, "vcpus": 1}
    clock = FakeClock(ns_of(PI_DAY) + HALF)
    rtc = Mc146818.from_options(
        DeviceContext(irq=FakeIrq(), transport={"machine": machine}), {}, clock
    )
    wr(rtc, 0x34, 0x12)

    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), rtc.save(), clock)

    assert (rd(restored, 0x34), rd(restored, 0x35)) == (0x12, 0x03)


def test_rtc_bcd_mode_reads_host_utc_time():
    rtc, _, _ = make_rtc()
    assert regs(rtc) == PI_DAY_BCD


def test_rtc_binary_mode_reads_the_same_time_in_binary():
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DM_BINARY)
    assert regs(rtc) == (26, 9, 15, 6, 14, 3, 25, 20)


@pytest.mark.parametrize(
    "hour,control,expected",
    [
        (15, 0, 0x83),  # 3 PM: BCD 3 with bit 7
        (0, 0, 0x12),  # midnight is 12 AM
        (12, 0, 0x92),  # noon is 12 PM
        (11, 0, 0x11),
        (23, RegB.DM_BINARY, 0x80 | 11),
        (23, RegB.DM_BINARY | RegB.H24, 23),
    ],
)
def test_rtc_hour_register_follows_12_or_24_hour_mode(hour, control, expected):
    rtc, _, _ = make_rtc(PI_DAY.replace(hour=hour))
    wr(rtc, Reg.CONTROL, control)
    assert rd(rtc, Reg.HOURS) == expected


def test_rtc_localtime_base_shows_the_host_zone():
    rtc, _, _ = make_rtc(base="localtime")  # the fake host is 2 hours ahead of UTC
    assert rd(rtc, Reg.HOURS) == 0x17


def test_rtc_unknown_base_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match="rtc: base must be one of utc, localtime"):
        make_rtc(base="mars")


def test_rtc_time_advances_with_the_host_clock_across_midnight_and_century():
    rtc, clock, _ = make_rtc(datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC))
    clock.advance(HALF)
    assert regs(rtc) == (0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21)  # a Friday


# -- setting the time ---------------------------------------------------------------------
def test_rtc_set_bit_holds_the_registers_while_the_guest_writes():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    wr(rtc, Reg.SECONDS, 0x42)
    clock.advance(5 * NS)
    assert regs(rtc) == (0x42, *PI_DAY_BCD[1:])


def test_rtc_guest_set_time_runs_from_the_written_value_with_century_rollover():
    rtc, clock, _ = make_rtc()
    values = {Reg.SECONDS: 0x58, Reg.MINUTES: 0x59, Reg.HOURS: 0x23, Reg.DAY_OF_MONTH: 0x31}
    set_time(rtc, {**values, Reg.MONTH: 0x12, Reg.YEAR: 0x99, Reg.CENTURY: 0x19})
    clock.advance(2 * NS)
    assert regs(rtc) == (0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20)  # Saturday


def test_rtc_year_0000_reads_back_and_is_a_leap_year():
    """A driver that cleared CMOS RAM (the century byte 0x32 with it) and set year 00: the
    clock shows 0000, which `date` cannot hold, and 0000 has a 29 February (a Tuesday, as
    2000's: 2000 years are whole 400-year cycles, whole weeks)."""
    rtc, clock, _ = make_rtc()
    set_time(rtc, {Reg.CENTURY: 0x00, Reg.YEAR: 0x00, Reg.MONTH: 0x02, Reg.DAY_OF_MONTH: 0x28,
                   Reg.HOURS: 0x23, Reg.MINUTES: 0x59, Reg.SECONDS: 0x59,
                   Reg.DAY_OF_WEEK: 0x02})  # fmt: skip
    assert (regs(rtc)[-2:], rtc.save().weekday_shift) == ((0x00, 0x00), 0)  # Monday's its own
    clock.advance(NS)
    assert regs(rtc) == (0x00, 0x00, 0x00, 0x03, 0x29, 0x02, 0x00, 0x00)


def test_rtc_clock_wraps_from_year_9999_to_0000_and_runs_on():
    """The century byte and the year wrap as two-digit counters; the clock does not stop."""
    rtc, clock, _ = make_rtc()
    set_time(rtc, {Reg.CENTURY: 0x99, Reg.YEAR: 0x99, Reg.MONTH: 0x12, Reg.DAY_OF_MONTH: 0x31,
                   Reg.HOURS: 0x23, Reg.MINUTES: 0x59, Reg.SECONDS: 0x59,
                   Reg.DAY_OF_WEEK: 0x06})  # fmt: skip
    assert rtc.save().weekday_shift == 0  # 9999-12-31 is a Friday
    clock.advance(NS)
    assert regs(rtc) == (0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x00)  # Saturday
    clock.advance(5 * NS)
    assert rd(rtc, Reg.SECONDS) == 0x05


@settings(max_examples=200, deadline=None)
@given(
    year=st.integers(0, 9999),
    month=st.integers(1, 12),
    day=st.integers(1, 28),
    clock_s=st.integers(0, 86399),
    binary=st.booleans(),
)
def test_rtc_any_date_the_guest_sets_reads_back_as_set(year, month, day, clock_s, binary):
    """Every date of the four-digit years the registers show, in either data mode; the day
    of the week set as the date's own is the clock's (no shift kept: year 0000's as 2000's,
    2000 years later)."""
    control = RegB.H24 | (RegB.DM_BINARY if binary else 0)
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, control)

    def enc(value: int) -> int:
        return value if binary else (value // 10) << 4 | value % 10

    weekday = datetime(year or 2000, month, day).isoweekday() % 7 + 1  # Sunday is 1
    fields = (clock_s % 60, clock_s // 60 % 60, clock_s // 3600, weekday, day, month)
    written = (*map(enc, fields), enc(year % 100), enc(year // 100))
    set_time(rtc, dict(zip(TIME_AND_YEAR, written, strict=True)))
    assert (regs(rtc), rtc.save().weekday_shift) == (written, 0)


def test_rtc_guest_set_time_is_an_offset_from_the_host_clock():
    rtc, _, _ = make_rtc()
    set_time(rtc, {Reg.YEAR: 0x24})  # one year back: 2024-03-14, after 29 February
    assert rtc.save().offset_ns == -365 * 86400 * NS


def test_rtc_clearing_set_keeps_the_sub_second_phase():
    rtc, clock, _ = make_rtc(phase=HALF)
    set_time(rtc, {Reg.SECONDS: 0x00})
    clock.advance(HALF - 1)
    before = rd(rtc, Reg.SECONDS)
    clock.advance(1)
    assert (before, rd(rtc, Reg.SECONDS)) == (0x00, 0x01)


def test_rtc_set_released_inside_the_tick_it_held_back_runs_no_update_then():
    """SET held across a tick inhibits that tick's update; released within what would have
    been its cycle (the first 1984 us), it shows no UIP and sets no UF with the registers
    unchanged: the next update is the next tick's, a second later."""
    rtc, clock, _ = make_rtc(phase=NS - 100_000)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    wr(rtc, Reg.SECONDS, 0x30)
    clock.advance(100_000 + 600_000)  # past the tick, 0.6 ms into its cycle
    wr(rtc, Reg.CONTROL, RegB.H24)
    uip = rd(rtc, Reg.FREQ_SELECT) & RegA.UIP
    clock.advance(1_500_000)  # past the end of that cycle
    at_cycle_end = (rd(rtc, Reg.INTR_FLAGS) & RegC.UF, rd(rtc, Reg.SECONDS))
    clock.advance(NS - 2_100_000 - 1)  # just before the next tick
    before_tick = (rd(rtc, Reg.FREQ_SELECT) & RegA.UIP, rd(rtc, Reg.SECONDS))
    clock.advance(1 + UPDATE_CYCLE_NS)

    assert (uip, at_cycle_end, before_tick) == (0, (0, 0x30), (RegA.UIP, 0x30))
    assert (rd(rtc, Reg.INTR_FLAGS) & RegC.UF, rd(rtc, Reg.SECONDS)) == (RegC.UF, 0x31)


def test_rtc_time_write_inside_the_aborted_cycle_keeps_it_aborted():
    """A field written (SET clear) in what is left of the aborted cycle: still no update."""
    rtc, clock, _ = make_rtc(phase=NS - 100_000)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    clock.advance(100_000 + 300_000)
    wr(rtc, Reg.CONTROL, RegB.H24)
    clock.advance(300_000)
    wr(rtc, Reg.MINUTES, 0x45)
    uip = rd(rtc, Reg.FREQ_SELECT) & RegA.UIP
    clock.advance(UPDATE_CYCLE_NS)

    assert (uip, rd(rtc, Reg.INTR_FLAGS) & RegC.UF, rd(rtc, Reg.MINUTES)) == (0, 0, 0x45)


def test_rtc_set_released_inside_the_tick_it_held_back_arms_the_next_update():
    """With UIE on, the interrupt that follows such a release is the next tick's."""
    rtc, clock, irq = make_rtc(phase=NS - 100_000)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    clock.advance(100_000 + 600_000)
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)

    waited = run_to_deadline(rtc, clock)

    assert waited == pytest.approx((NS - 600_000 + UPDATE_CYCLE_NS) / NS)
    assert (irq.count, rd(rtc, Reg.INTR_FLAGS) & ~RegC.PF) == (1, RegC.IRQF | RegC.UF)


@pytest.mark.parametrize("restart_after_ns", [1_500_000, 1_800_000])
def test_rtc_saved_inside_an_aborted_cycle_restores_without_its_update(restart_after_ns):
    """A snapshot (or a crash restart's checkpoint) taken in what is left of the aborted
    cycle carries it: the restored clock gives no UF at that cycle's end either; one
    taken after it carries nothing."""
    rtc, clock, _ = make_rtc(phase=NS - 100_000)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    clock.advance(100_000 + 300_000)
    wr(rtc, Reg.CONTROL, RegB.H24)
    clock.advance(restart_after_ns)
    state = rtc.save()
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    clock.advance(UPDATE_CYCLE_NS)

    assert (state.aborted_s is None) == (300_000 + restart_after_ns >= UPDATE_CYCLE_NS)
    assert rd(restored, Reg.INTR_FLAGS) & RegC.UF == 0


def test_rtc_set_released_after_the_cycle_of_its_tick_keeps_the_phase():
    """Past the first 1984 us nothing was aborted: the next update comes at the next tick."""
    rtc, clock, _ = make_rtc(phase=NS - 100_000)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    clock.advance(100_000 + UPDATE_CYCLE_NS)
    wr(rtc, Reg.CONTROL, RegB.H24)
    flags = rd(rtc, Reg.INTR_FLAGS) & RegC.UF
    clock.advance(NS - UPDATE_CYCLE_NS)

    assert (flags, rd(rtc, Reg.FREQ_SELECT) & RegA.UIP, rd(rtc, Reg.INTR_FLAGS) & RegC.UF) == (
        0,
        RegA.UIP,
        0,
    )
    clock.advance(UPDATE_CYCLE_NS)
    assert rd(rtc, Reg.INTR_FLAGS) & RegC.UF == RegC.UF


def test_rtc_set_bit_clears_uie():
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.UIE | RegB.H24)
    assert rd(rtc, Reg.CONTROL) == RegB.SET | RegB.H24


def test_rtc_time_register_write_while_running_sets_that_field_only():
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.MINUTES, 0x45)
    assert regs(rtc) == (0x26, 0x45, *PI_DAY_BCD[2:])


def test_rtc_divider_in_reset_sets_no_periodic_or_update_flag():
    """MC146818A register A: with the divider chain in reset (DV 11x) the time base does
    not reach the divider: no periodic (PF) and no update (UF) event, whatever RS says."""
    rtc, clock, _ = make_rtc(phase=0)
    wr(rtc, Reg.FREQ_SELECT, 0x70 | 0x06)  # divider chain in reset, RS 1024 Hz
    rd(rtc, Reg.INTR_FLAGS)  # whatever was pending before
    clock.advance(3 * NS)

    assert rd(rtc, Reg.INTR_FLAGS) & (RegC.PF | RegC.UF) == 0


@pytest.mark.parametrize(("written", "hour"), [(0x12, 0), (0x92, 12), (0x01, 1), (0x81, 13)])
def test_rtc_12_hour_value_the_guest_sets_is_that_hour(written, hour):
    """12-hour mode: 12 AM is midnight, 12 PM is noon (MC146818A table 3: hours 1-12 with
    bit 7 for PM); the clock then shows it again in 24-hour mode."""
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, 0)  # BCD, 12-hour
    set_time(rtc, {Reg.HOURS: written})
    wr(rtc, Reg.CONTROL, RegB.H24)

    assert rd(rtc, Reg.HOURS) == int(str(hour), 16)  # BCD


def test_rtc_divider_leaving_reset_updates_half_a_second_later():
    rtc, clock, _ = make_rtc(phase=123_456_789)
    wr(rtc, Reg.FREQ_SELECT, 0x70 | 0x06)  # divider chain in reset
    wr(rtc, Reg.SECONDS, 0x10)
    clock.advance(3 * NS)  # held: no updates
    wr(rtc, Reg.FREQ_SELECT, 0x26)
    clock.advance(HALF - 1)
    before = rd(rtc, Reg.SECONDS)
    clock.advance(1)
    assert (before, rd(rtc, Reg.SECONDS)) == (0x10, 0x11)


@pytest.mark.parametrize("time_base", [0x00, 0x10, 0x20])
def test_rtc_runs_at_each_time_base_and_stops_at_a_test_setting(time_base):
    """MC146818A register A: DV 000, 001 and 010 are the three time bases, each running the
    divider chain (a PC's crystal makes 010 the usual one; QEMU runs at all three); only 010
    ran here, so a driver written from the datasheet that chose 000 saw a stopped clock.
    011 to 101 are test settings, stopped as a reset (11x) is."""
    rtc, clock, _ = make_rtc(phase=0)
    wr(rtc, Reg.FREQ_SELECT, time_base | 0x06)
    first = rd(rtc, Reg.SECONDS)
    clock.advance(NS)
    running = rd(rtc, Reg.SECONDS)
    wr(rtc, Reg.FREQ_SELECT, 0x30 | 0x06)
    clock.advance(2 * NS)
    assert (running - first, rd(rtc, Reg.SECONDS)) == (1, running)


def test_rtc_day_of_week_the_guest_sets_is_kept_across_midnight():
    rtc, clock, _ = make_rtc(PI_DAY.replace(hour=23, minute=59, second=59), phase=0)
    set_time(rtc, {Reg.DAY_OF_WEEK: 0x02})  # not the date's own (Friday, 6)
    clock.advance(NS)
    assert rd(rtc, Reg.DAY_OF_WEEK) == 0x03


def test_rtc_out_of_range_date_carries_into_the_next_month():
    rtc, _, _ = make_rtc()
    set_time(rtc, {Reg.DAY_OF_MONTH: 0x30, Reg.MONTH: 0x02})  # 30 February 2025
    assert regs(rtc, (Reg.DAY_OF_MONTH, Reg.MONTH)) == (0x02, 0x03)


def test_rtc_mode_switch_while_set_keeps_the_raw_bytes_as_a_chip_does():
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24 | RegB.DM_BINARY)
    assert rd(rtc, Reg.SECONDS) == 0x26  # still the BCD byte, now read as binary 38


# -- update in progress ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "phase,uip",
    [
        (HALF, 0),
        (NS - 244_141, 0),
        (NS - 244_140, RegA.UIP),  # 244.140625 us before the update: UIP rises
        (NS - 1, RegA.UIP),
        (0, RegA.UIP),  # the update cycle itself
        (UPDATE_CYCLE_NS - 1, RegA.UIP),
        (UPDATE_CYCLE_NS, 0),
    ],
)
def test_rtc_uip_rises_244us_before_an_update_and_falls_after_the_cycle(phase, uip):
    rtc, _, _ = make_rtc(phase=phase)
    assert rd(rtc, Reg.FREQ_SELECT) == 0x26 | uip


@pytest.mark.parametrize("time_base", [0x00, 0x10], ids=["4.194304MHz", "1.048576MHz"])
def test_rtc_update_cycle_at_the_mhz_time_bases_lasts_248us(time_base):
    """MC146818A table 5 (update-cycle times): tUC is 248 us with the 4.194304 and 1.048576
    MHz time bases, 1984 us only with 32.768 kHz (tBUC is 244 us with all three). UIP falls,
    and UF is set, at the end of that cycle."""
    rtc, clock, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, time_base)  # RS 0: no periodic flag in the way
    rd(rtc, Reg.INTR_FLAGS)
    clock.advance(HALF + 248_000 - 1)
    during = (rd(rtc, Reg.FREQ_SELECT) & RegA.UIP, rd(rtc, Reg.INTR_FLAGS))
    clock.advance(1)
    assert (during, rd(rtc, Reg.FREQ_SELECT) & RegA.UIP, rd(rtc, Reg.INTR_FLAGS)) == (
        (RegA.UIP, 0),
        0,
        RegC.UF,
    )


def test_rtc_uip_is_clear_while_set():
    rtc, _, _ = make_rtc(phase=0)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    assert rd(rtc, Reg.FREQ_SELECT) == 0x26


def test_rtc_uip_is_read_only():
    rtc, _, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0xA6)
    assert rd(rtc, Reg.FREQ_SELECT) == 0x26


# -- interrupts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rate,period_s",
    [(1, 1 / 256), (2, 1 / 128), (3, 1 / 8192), (6, 1 / 1024), (15, 1 / 2)],
)
def test_rtc_periodic_interrupt_comes_at_the_register_a_rate(rate, period_s):
    rtc, clock, irq = make_rtc(phase=HALF)  # no update (UF) within half a second
    wr(rtc, Reg.FREQ_SELECT, 0x20 | rate)
    wr(rtc, Reg.CONTROL, RegB.PIE | RegB.H24)
    waited = run_to_deadline(rtc, clock)
    assert (waited, irq.count, rd(rtc, Reg.INTR_FLAGS)) == (
        pytest.approx(period_s, abs=1e-9),
        1,
        RegC.IRQF | RegC.PF,
    )


@pytest.mark.parametrize(
    "freq,period_s",
    [(0x01, 1 / 32768), (0x02, 2 / 32768), (0x11, 1 / 32768), (0x12, 2 / 32768),
     (0x21, 1 / 256), (0x22, 1 / 128), (0x03, 1 / 8192), (0x13, 1 / 8192)],
)  # fmt: skip
def test_rtc_periodic_rates_1_and_2_follow_the_time_base(freq, period_s):
    """MC146818A's periodic rate table: RS 0001 and 0010 are 3.90625 and 7.8125 ms with the
    32.768 kHz time base, 30.517 and 61.035 us with the 4.194304 and 1.048576 MHz ones (DV
    000, 001, which the model runs); RS 0011 up are the same in both columns."""
    rtc, clock, _ = make_rtc(phase=0)
    wr(rtc, Reg.FREQ_SELECT, freq)
    rd(rtc, Reg.INTR_FLAGS)
    wr(rtc, Reg.CONTROL, RegB.PIE | RegB.H24)
    run_to_deadline(rtc, clock)
    rd(rtc, Reg.INTR_FLAGS)
    assert run_to_deadline(rtc, clock) == pytest.approx(period_s, abs=2e-9)


def test_rtc_periodic_flag_is_set_without_pie_but_raises_no_irq():
    rtc, clock, irq = make_rtc(phase=0)
    clock.advance(NS // 1024 + 1)  # the first 1024 Hz edge: 976562.5 ns
    assert (rd(rtc, Reg.INTR_FLAGS), irq.count, rtc.next_deadline()) == (RegC.PF, 0, None)


def test_rtc_update_ended_interrupt_comes_after_the_update_cycle():
    rtc, clock, irq = make_rtc(phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0x20)  # no periodic flags in the way
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    waited = run_to_deadline(rtc, clock)
    assert (waited, irq.count, rd(rtc, Reg.INTR_FLAGS), rd(rtc, Reg.SECONDS)) == (
        pytest.approx(0.5 + UPDATE_CYCLE_NS / NS, abs=1e-9),
        1,
        RegC.IRQF | RegC.UF,
        0x27,
    )


def test_rtc_alarm_interrupt_comes_when_the_time_matches():
    rtc, clock, irq = make_rtc(phase=HALF)  # 15:09:26.5
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.SECONDS_ALARM, 0x30)
    wr(rtc, Reg.MINUTES_ALARM, 0x11)
    wr(rtc, Reg.HOURS_ALARM, 0x15)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    waited = run_to_deadline(rtc, clock)  # to 15:11:30 and the end of its update
    assert (waited, irq.count, rd(rtc, Reg.INTR_FLAGS)) == (
        pytest.approx(123.5 + UPDATE_CYCLE_NS / NS, abs=1e-9),
        1,
        RegC.IRQF | RegC.AF | RegC.UF,
    )


def test_rtc_alarm_with_dont_care_bytes_fires_every_second():
    rtc, clock, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    for reg in (Reg.SECONDS_ALARM, Reg.MINUTES_ALARM, Reg.HOURS_ALARM):
        wr(rtc, reg, 0xC0)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    first = run_to_deadline(rtc, clock)
    rd(rtc, Reg.INTR_FLAGS)
    assert (first, run_to_deadline(rtc, clock)) == (
        pytest.approx(0.5 + UPDATE_CYCLE_NS / NS, abs=1e-9),
        pytest.approx(1.0, abs=1e-9),
    )


def test_rtc_alarm_the_clock_never_shows_schedules_nothing():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.SECONDS_ALARM, 0x75)  # not a BCD second
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    clock.advance(86400 * NS)
    assert (rtc.next_deadline(), rd(rtc, Reg.INTR_FLAGS) & RegC.AF) == (None, 0)


def test_rtc_alarm_in_12_hour_mode_matches_the_pm_byte():
    rtc, clock, _ = make_rtc(phase=HALF)  # 3:09:26 PM
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.CONTROL, 0)
    wr(rtc, Reg.SECONDS_ALARM, 0x27)
    wr(rtc, Reg.MINUTES_ALARM, 0x09)
    wr(rtc, Reg.HOURS_ALARM, 0x83)
    wr(rtc, Reg.CONTROL, RegB.AIE)
    assert run_to_deadline(rtc, clock) == pytest.approx(0.5 + UPDATE_CYCLE_NS / NS, abs=1e-9)


def test_rtc_unacknowledged_interrupt_pulses_once_and_stops_scheduling():
    rtc, clock, irq = make_rtc(phase=0)
    wr(rtc, Reg.CONTROL, RegB.PIE | RegB.H24)
    run_to_deadline(rtc, clock)
    clock.advance(NS)
    rtc.tick(clock.mono)
    assert (irq.count, rtc.next_deadline()) == (1, None)


def test_rtc_enabling_an_interrupt_with_its_flag_pending_pulses_at_once():
    rtc, clock, irq = make_rtc()
    clock.advance(NS)  # PF and UF are set
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    assert (irq.count, rd(rtc, Reg.INTR_FLAGS)) == (1, RegC.IRQF | RegC.PF | RegC.UF)


def test_rtc_register_c_read_clears_every_flag():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    clock.advance(NS)
    assert (rd(rtc, Reg.INTR_FLAGS), rd(rtc, Reg.INTR_FLAGS)) == (
        RegC.IRQF | RegC.PF | RegC.UF,
        0,
    )


def test_rtc_no_update_flag_while_set():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    clock.advance(3 * NS)
    assert rd(rtc, Reg.INTR_FLAGS) == 0


def test_rtc_quiesced_device_schedules_nothing_until_resumed():
    rtc, _, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.PIE | RegB.H24)
    rtc.quiesce()
    quiesced = rtc.next_deadline()
    rtc.resume()
    assert (quiesced, rtc.next_deadline() is not None) == (None, True)


def test_rtc_saved_while_quiesced_raises_no_irq_and_the_event_comes_after():
    """A snapshot saves a device's state after it quiesced, while the irqchip's is taken:
    an update that came meanwhile raises IRQ 8 after the resume (the VM that runs on) and
    at the restored clock's first tick (the VM restored), once each, and not at the save.
    Synced at the save, its edge went out then, and a restored line high sent none."""
    rtc, clock, irq = make_rtc(phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    rtc.quiesce()
    clock.advance(HALF + 10_000_000)  # an update ends while quiesced
    state = rtc.save()
    at_save = irq.count
    restored_irq = FakeIrq()
    restored = Mc146818.restore(DeviceContext(irq=restored_irq), state, clock)
    deadline = restored.next_deadline()
    assert deadline is not None
    restored.tick(deadline)
    rtc.resume()
    deadline = rtc.next_deadline()
    assert deadline is not None
    rtc.tick(deadline)
    assert (at_save, irq.count, restored_irq.count) == (0, 1, 1)
    flags = rd(restored, Reg.INTR_FLAGS)
    assert (flags, flags & RegC.UF) == (rd(rtc, Reg.INTR_FLAGS), RegC.UF)


# -- the index port, NVRAM and status registers ---------------------------------------------
def test_rtc_nmi_bit_is_kept_and_does_not_select_the_register():
    rtc, _, _ = make_rtc()
    rtc.write(0, bytes([0x80 | 0x0E]))
    rtc.write(1, b"\x5a")
    assert (rtc.read(0, 1), rd(rtc, 0x0E)) == (b"\x8e", 0x5A)


@pytest.mark.parametrize("address", [0x0E, 0x0F, 0x31, 0x33, 0x7F])
def test_rtc_nvram_byte_round_trips(address):
    rtc, _, _ = make_rtc()
    wr(rtc, address, 0xA5)
    assert rd(rtc, address) == 0xA5


@pytest.mark.parametrize("reg,value", [(Reg.INTR_FLAGS, 0), (Reg.VALID, 0x80)])
def test_rtc_status_registers_c_and_d_ignore_writes(reg, value):
    rtc, _, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, reg, 0xFF)
    assert (rd(rtc, reg), rtc.ctx.counters.bad_access) == (value, 1)


def test_rtc_word_access_selects_then_reaches_the_register():
    """An ISA bus splits a word access into byte cycles at 0x70, then 0x71 (QEMU too): `outw
    0x70` with 0x5a0e selects NVRAM byte 0x0e and writes 0x5a to it, an idiom of some boot
    code. It was counted as bad and dropped."""
    rtc, _, _ = make_rtc()
    rtc.write(0, b"\x0e\x5a")
    assert (rtc.read(0, 2), rd(rtc, 0x0E), rtc.ctx.counters.bad_access) == (b"\x0e\x5a", 0x5A, 0)


# -- state --------------------------------------------------------------------------------------
def busy_rtc() -> tuple[Mc146818, FakeClock]:
    """An rtc with a guest-set time, a weekday of its own, NVRAM, pending flags and the NMI bit."""
    rtc, clock, _ = make_rtc()
    set_time(rtc, {Reg.YEAR: 0x30, Reg.DAY_OF_WEEK: 0x01})
    wr(rtc, 0x40, 0x99)
    clock.advance(NS)
    rtc.write(0, bytes([0x80 | Reg.MINUTES]))
    return rtc, clock


def test_rtc_state_round_trips_through_the_codec():
    rtc, clock = busy_rtc()
    state = rtc.save()
    decoded = codec.state_from_document("rtc", RtcState, codec.state_document("rtc", state))
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), decoded, clock)
    assert restored.save() == state


def test_rtc_restored_clock_keeps_the_guest_time_relative_to_the_host():
    rtc, clock = busy_rtc()
    state = rtc.save()
    clock.advance(3600 * NS)  # the VM was suspended for an hour
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    assert regs(restored) == (0x27, 0x09, 0x16, 0x01, 0x14, 0x03, 0x30, 0x20)


def test_rtc_restored_pending_flags_and_nvram_survive():
    rtc, clock = busy_rtc()
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), rtc.save(), clock)
    assert (restored.read(0, 1), rd(restored, 0x40), rd(restored, Reg.INTR_FLAGS)) == (
        bytes([0x80 | Reg.MINUTES]),
        0x99,
        RegC.PF | RegC.UF,
    )


def test_rtc_restored_held_registers_stay_held():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24)
    wr(rtc, Reg.HOURS, 0x07)
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), rtc.save(), clock)
    clock.advance(10 * NS)
    assert regs(restored) == (0x26, 0x09, 0x07, *PI_DAY_BCD[3:])


def _cmos_with(reg: int, value: int) -> bytes:
    cmos = bytearray(RtcState().cmos)
    cmos[reg] = value
    return bytes(cmos)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"offset_ns": MAX_OFFSET_NS + 1}, "offset_ns="),
        ({"offset_ns": True}, "offset_ns=True"),
        ({"index": 256}, "index=256"),
        ({"index": -1}, "index=-1"),
        ({"weekday_shift": 7}, "weekday_shift=7"),
        ({"cmos": bytes(CMOS_SIZE - 1)}, "cmos must be 128 bytes"),
        ({"cmos": _cmos_with(Reg.FREQ_SELECT, 0xA6)}, "UIP"),
        ({"cmos": _cmos_with(Reg.INTR_FLAGS, RegC.IRQF)}, "register C"),
        ({"cmos": _cmos_with(Reg.INTR_FLAGS, 0x01)}, "register C"),
        ({"cmos": _cmos_with(Reg.VALID, 0)}, "register D"),
        ({"aborted_s": 1 << 62}, "aborted_s="),
        ({"aborted_s": "1"}, "aborted_s='1'"),
        ({"synced_ns": 1 << 80}, "synced_ns="),
        ({"synced_ns": 1.5}, "synced_ns=1.5"),
    ],
)
def test_rtc_restore_rejects_bad_fields_naming_them(change, message):
    state = replace(RtcState(), **change)
    with pytest.raises(StateError, match=message):
        Mc146818.restore(DeviceContext(irq=FakeIrq()), state, FakeClock(0))


def test_rtc_golden_v1_state_restores_its_time_and_nvram():
    doc = json.loads((GOLDENS / "v1.json").read_text())  # busy_rtc(), saved by release 1
    state = codec.state_from_document("rtc", RtcState, doc)
    clock = FakeClock(ns_of(PI_DAY) + 3 * HALF)  # when it was saved
    rtc = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    assert (rtc.read(0, 1), regs(rtc), rd(rtc, 0x40)) == (
        bytes([0x80 | Reg.MINUTES]),  # the index port, read first: rd() selects registers
        (0x27, 0x09, 0x15, 0x01, 0x14, 0x03, 0x30, 0x20),
        0x99,
    )


def test_rtc_restored_checks_base_but_runs_on_from_its_offset():
    rtc, clock, _ = make_rtc()
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), rtc.save(), clock)

    restored.check_options({"base": "localtime"})  # what it shows at start only
    with pytest.raises(ConfigError, match="base must be one of utc, localtime, got 'mars'"):
        restored.check_options({"base": "mars"})


def test_rtc_v2_state_upgrades_to_flags_accounted_from_the_restore():
    rtc, clock = busy_rtc()
    doc = codec.state_document("rtc", rtc.save())
    fields = {k: v for k, v in doc["fields"].items() if k != "synced_ns"}
    state = codec.state_from_document("rtc", RtcState, {**doc, "version": 2, "fields": fields})
    assert state.synced_ns is None
    clock.advance(10 * NS)
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    assert rd(restored, Reg.INTR_FLAGS) == RegC.PF | RegC.UF  # those saved; none since


# -- a crash restart: checkpoint, then the journal re-applied (devprocs/runtime.py replay) ----
def restarted(
    state: RtcState, clock: FakeClock, journal: list[tuple[bytes, int]], posted: int = 0
) -> Mc146818:
    """A new process's rtc: restored from the checkpoint `state`, the journal re-applied
    (its first `posted` frames sent before the monitor had that checkpoint: slot.py)."""
    irq = FakeIrq()
    rtc = Mc146818.restore(DeviceContext(irq=irq), state, clock)
    runtime.replay(rtc, journal, runtime.Checkpoints(rtc), posted=posted)
    return rtc


def test_rtc_time_set_after_the_checkpoint_is_replayed_as_of_when_it_was_set():
    rtc, clock, _ = make_rtc()
    checkpoint = rtc.save()
    journal = []  # what the monitor's slot keeps: each frame with the wall clock it went at
    for reg, value in ((Reg.CONTROL, RegB.SET | RegB.H24), (Reg.HOURS, 0x07)):
        for frame in (wire.encode_write(0, bytes([reg])), wire.encode_write(1, bytes([value]))):
            journal.append((frame, clock.wall_ns()))
            rtc.write(wire.decode_access(frame, 2).offset, wire.decode_access(frame, 2).data)
    for frame in (wire.encode_write(0, bytes([Reg.CONTROL])), wire.encode_write(1, b"\x02")):
        journal.append((frame, clock.wall_ns()))
        rtc.write(wire.decode_access(frame, 2).offset, wire.decode_access(frame, 2).data)
    clock.advance(3600 * NS)  # an hour later, the device crashes and restarts
    live = regs(rtc)
    assert live[:3] == (0x26, 0x09, 0x08)  # 07:09:26 set an hour ago
    assert regs(restarted(checkpoint, clock, journal)) == live


def test_rtc_alarm_that_falls_in_a_restart_gap_still_goes_off():
    rtc, clock, _ = make_rtc(phase=HALF)  # 15:09:26.5
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.SECONDS_ALARM, 0x28)  # 15:09:28
    wr(rtc, Reg.MINUTES_ALARM, 0x09)
    wr(rtc, Reg.HOURS_ALARM, 0x15)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    checkpoint = rtc.save()
    clock.advance(2 * NS)  # the device died at 15:09:27.5; it is back at 15:09:28.5
    irq = FakeIrq()
    back = Mc146818.restore(DeviceContext(irq=irq), checkpoint, clock)
    deadline = back.next_deadline()
    assert deadline is not None and deadline <= clock.mono  # the alarm passed: tick at once
    back.tick(clock.mono)
    assert (irq.count, rd(back, Reg.INTR_FLAGS)) == (1, RegC.IRQF | RegC.AF | RegC.UF)


def test_rtc_replay_sends_no_edge_the_dead_process_sent_and_restart_sends_one_if_high():
    """Ten updates the guest acknowledged after the checkpoint, then one it had not read yet
    (a register A read saw it come): the replay rebuilds each flag and read and pulses IRQ 8
    for none (the guest had those edges); after_restart pulses once, the line being high
    then (the dead process may have died before that edge)."""
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    checkpoint = rtc.save()
    journal = []

    def applied(*frames: bytes) -> None:
        for frame in frames:
            journal.append((frame, clock.wall_ns()))
            access = wire.decode_access(frame, 2)
            if access.op == wire.Op.WRITE:
                rtc.write(access.offset, access.data)
            else:
                rtc.read(access.offset, 1)

    for _ in range(10):
        clock.advance(NS)
        applied(wire.encode_write(0, bytes([Reg.INTR_FLAGS])), wire.encode_read(0, 1, 1))
    clock.advance(NS)
    applied(wire.encode_write(0, bytes([Reg.FREQ_SELECT])), wire.encode_read(0, 1, 1))
    irq = FakeIrq()
    back = Mc146818.restore(DeviceContext(irq=irq, restarted=True), checkpoint, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back))
    replayed = irq.count
    back.after_restart()
    assert (replayed, irq.count) == (0, 1)
    assert rd(back, Reg.INTR_FLAGS) & (RegC.IRQF | RegC.UF) == RegC.IRQF | RegC.UF


def test_rtc_restarted_with_an_event_in_the_gap_pulses_once():
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    checkpoint = rtc.save()
    clock.advance(NS)  # an update while no process serves
    irq = FakeIrq()
    back = Mc146818.restore(DeviceContext(irq=irq, restarted=True), checkpoint, clock)
    back.after_restart()
    assert irq.count == 1


@pytest.mark.parametrize("control_write", [False, True], ids=["read-only", "control-first"])
def test_rtc_frame_sent_before_its_checkpoint_does_not_bring_an_alarm_back(control_write):
    """Posted frames: the dead process saved its checkpoint just after the alarm's update
    (AF set) and then applied frames sent before that save, the guest's read of register C
    (acknowledging the alarm) among them, a write of register B first in one case. Replayed
    as of their sending, before the instant the checkpoint accounts for, they took the
    clock back, and the alarm went off a second time after the restart."""
    us = 1000
    rtc, clock, _ = make_rtc(phase=HALF)  # 15:09:26.5; the alarm's update ends at E
    for reg, value in ((Reg.SECONDS_ALARM, 0x27), (Reg.MINUTES_ALARM, 0x09),
                       (Reg.HOURS_ALARM, 0x15)):  # fmt: skip
        wr(rtc, reg, value)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    clock.advance(HALF + UPDATE_CYCLE_NS - 40 * us)  # E - 40 us
    frames = [wire.encode_write(0, bytes([Reg.CONTROL])),
              wire.encode_write(1, bytes([RegB.AIE | RegB.H24]))] if control_write else []  # fmt: skip
    frames += [wire.encode_write(0, bytes([Reg.INTR_FLAGS])), wire.encode_read(0, 1, 1)]
    journal = [(frame, clock.wall_ns() + i * us) for i, frame in enumerate(frames)]
    clock.advance(50 * us)  # E + 10 us: the process saves its checkpoint (AF is set) ...
    checkpoint = rtc.save()
    assert checkpoint.cmos[Reg.INTR_FLAGS] & RegC.AF
    clock.advance(10 * us)  # ... then applies the frames, the guest's read acknowledging AF
    for frame in frames:
        access = wire.decode_access(frame, 2)
        if access.op == wire.Op.WRITE:
            rtc.write(access.offset, access.data)
        else:
            assert rtc.read(access.offset, 1)[0] & RegC.AF
    clock.advance(HALF - 100 * us)  # it dies; back before the next update
    irq = FakeIrq()
    back = Mc146818.restore(DeviceContext(irq=irq, restarted=True), checkpoint, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back), posted=len(journal))
    back.after_restart()
    assert (irq.count, rd(back, Reg.INTR_FLAGS)) == (0, rd(rtc, Reg.INTR_FLAGS))


def _reg(reg: int, value: int) -> list[bytes]:
    return [wire.encode_write(0, bytes([reg])), wire.encode_write(1, bytes([value]))]


@pytest.mark.parametrize(
    "frames,lead_us",
    [
        (_reg(Reg.MINUTES, 0x10), 40),
        (_reg(Reg.CONTROL, RegB.SET | RegB.UIE | RegB.H24) + _reg(Reg.MINUTES, 0x10)
         + _reg(Reg.CONTROL, RegB.UIE | RegB.H24), 2500),
    ],
    ids=["time-write-while-running", "set-then-cleared"],
)  # fmt: skip
def test_rtc_posted_write_that_moves_the_clock_does_not_bring_an_update_back(frames, lead_us):
    """As above, with frames that move the offset (a time write while the clock runs, SET
    cleared): each sets what the flags account for afresh, at the new offset, and served at
    their sending that was before the checkpoint's, the update the guest then acknowledged
    (the read of C, replayed next) came again with an IRQ edge after the restart."""
    us = 1000
    rtc, clock, _ = make_rtc(phase=HALF)  # an update ends at E
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    clock.advance(HALF + UPDATE_CYCLE_NS - lead_us * us)
    frames = [*frames, wire.encode_write(0, bytes([Reg.INTR_FLAGS])), wire.encode_read(0, 1, 1)]
    journal = [(frame, clock.wall_ns() + i * us) for i, frame in enumerate(frames)]
    clock.advance((lead_us + 10) * us)
    checkpoint = rtc.save()
    assert checkpoint.cmos[Reg.INTR_FLAGS] & RegC.UF
    clock.advance(10 * us)
    for frame in frames:  # applied after the checkpoint, as the live process did
        access = wire.decode_access(frame, 2)
        if access.op == wire.Op.WRITE:
            rtc.write(access.offset, access.data)
        else:
            rtc.read(access.offset, 1)
    clock.advance(HALF - 100 * us)
    irq = FakeIrq()
    back = Mc146818.restore(DeviceContext(irq=irq, restarted=True), checkpoint, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back), posted=len(journal))
    back.after_restart()
    assert (irq.count, rd(back, Reg.INTR_FLAGS)) == (0, rd(rtc, Reg.INTR_FLAGS))


def _applied_after(rtc: Mc146818, frames: list[bytes]) -> None:
    for frame in frames:
        access = wire.decode_access(frame, 2)
        if access.op == wire.Op.WRITE:
            rtc.write(access.offset, access.data)
        else:
            rtc.read(access.offset, 1)


@pytest.mark.parametrize("alarm_last", [False, True], ids=["alarm-then-unset", "unset-then-alarm"])
def test_rtc_posted_time_set_across_a_checkpoint_keeps_the_new_clocks_alarm(alarm_last):
    """SET, 07:00:00, an alarm at 07:00:01 and SET cleared, sent 0.5 ms before a second
    boundary and applied after the checkpoint that followed it: the live clock went through
    07:00:01 and its alarm went off; the restarted one must too. (Keeping the flags at the
    checkpoint's instant in the new clock's time, 52ad6bb lost it.)"""
    us = 1000
    rtc, clock, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    clock.advance(HALF + UPDATE_CYCLE_NS - 2500 * us)
    alarm = _reg(Reg.HOURS_ALARM, 0x07) + _reg(Reg.MINUTES_ALARM, 0) + _reg(Reg.SECONDS_ALARM, 1)
    unset = _reg(Reg.CONTROL, RegB.AIE | RegB.H24)
    frames = [*_reg(Reg.CONTROL, RegB.SET | RegB.AIE | RegB.H24), *_reg(Reg.HOURS, 0x07),
              *_reg(Reg.MINUTES, 0), *_reg(Reg.SECONDS, 0),
              *(unset + alarm if alarm_last else alarm + unset)]  # fmt: skip
    journal = [(frame, clock.wall_ns() + i * 10) for i, frame in enumerate(frames)]
    clock.advance(2510 * us)
    checkpoint = rtc.save()
    clock.advance(10 * us)
    _applied_after(rtc, frames)
    clock.advance(NS + HALF)
    back = restarted(checkpoint, clock, journal, posted=len(journal))
    back.after_restart()
    assert rd(rtc, Reg.INTR_FLAGS) & RegC.AF and rd(back, Reg.INTR_FLAGS) & RegC.AF


def test_rtc_host_clock_stepped_back_after_the_checkpoint_replays_the_updates_it_repeats():
    """The host's wall clock steps back 10 s after a checkpoint, and the guest reads C: the
    live clock then counts the updates of the repeated seconds again, and so must the
    restarted one (a frame sent that long before the checkpoint's instant is served at its
    sending, as the live device served it)."""
    rtc, clock, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    checkpoint = rtc.save()
    clock.wall -= 10 * NS
    frames = [wire.encode_write(0, bytes([Reg.INTR_FLAGS])), wire.encode_read(0, 1, 1)]
    journal = [(frame, clock.wall_ns()) for frame in frames]
    _applied_after(rtc, frames)
    clock.advance(3 * NS)
    back = restarted(checkpoint, clock, journal)
    back.after_restart()
    assert back.save() == rtc.save()


@pytest.mark.parametrize("step_ms", [600, 1100])
def test_rtc_time_set_sent_after_the_checkpoint_came_is_served_at_its_sending(step_ms):
    """The host's clock stepped back under a second after a checkpoint (ntpd steps from
    128 ms): a time set sent after the monitor had the checkpoint was served by the dead
    process at its sending, and must be again, though its time is before the checkpoint's
    instant. Moved to that instant (the 1 s window alone), the clock came back 1 s slow."""
    rtc, clock, _ = make_rtc(phase=HALF)
    checkpoint = rtc.save()
    clock.wall -= step_ms * 1_000_000
    frames = _time_set_frames(((Reg.HOURS, 0x07), (Reg.MINUTES, 0), (Reg.SECONDS, 0)))
    journal = [(frame, clock.wall_ns()) for frame in frames]
    _applied_after(rtc, frames)
    clock.advance(3 * NS)
    back = Mc146818.restore(DeviceContext(irq=FakeIrq(), restarted=True), checkpoint, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back), posted=0)
    assert regs(back) == regs(rtc)


def test_rtc_frames_posted_long_before_the_checkpoint_are_served_at_its_instant():
    """Writes a long restart journaled (RESTART_WAIT_MS) go out after the new process's
    checkpoint, sent over a second before its instant: the monitor says they were on their
    way (posted), so they are served at it, and the update the replayed read of C
    acknowledged does not come again."""
    rtc, clock, _ = make_rtc(phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    frames = [*_reg(Reg.MINUTES, 0x10), wire.encode_write(0, bytes([Reg.INTR_FLAGS])),
              wire.encode_read(0, 1, 1)]  # fmt: skip
    journal = [(frame, clock.wall_ns()) for frame in frames]
    clock.advance(1300 * 1_000_000)
    checkpoint = rtc.save()
    clock.advance(10_000)
    _applied_after(rtc, frames)
    clock.advance(50 * 1_000_000)
    back = Mc146818.restore(DeviceContext(irq=FakeIrq(), restarted=True), checkpoint, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back), posted=len(frames))
    back.after_restart()
    assert back.save() == rtc.save()


def _time_set_frames(values: tuple[tuple[int, int], ...]) -> list[bytes]:
    """The guest's SET, the registers, SET cleared: as frames on the ports."""
    frames = []
    for reg, value in ((Reg.CONTROL, RegB.SET | RegB.H24), *values, (Reg.CONTROL, RegB.H24)):
        frames += [wire.encode_write(0, bytes([reg])), wire.encode_write(1, bytes([value]))]
    return frames


def _applied(rtc: Mc146818, clock: FakeClock, frames: list[bytes]) -> list[tuple[bytes, int]]:
    """Each frame written, and journaled with the time it went at (the monitor's slot)."""
    journal = []
    for frame in frames:
        journal.append((frame, clock.wall_ns()))
        access = wire.decode_access(frame, 2)
        rtc.write(access.offset, access.data)
    return journal


def test_rtc_crash_before_its_first_checkpoint_replays_a_time_set_as_of_then():
    """No checkpoint yet (the slot restarts it from its options): what the flags account
    for starts at the restart, and the replayed time set must still be the hour-old one."""
    rtc, clock, _ = make_rtc()
    journal = _applied(rtc, clock, _time_set_frames(((Reg.HOURS, 0x07),)))
    clock.advance(3600 * NS)
    back = Mc146818.from_options(DeviceContext(irq=FakeIrq(), restarted=True), {}, clock)
    runtime.replay(back, journal, runtime.Checkpoints(back))
    assert regs(back) == regs(rtc)


def test_rtc_host_clock_stepped_back_after_the_checkpoint_replays_a_time_set_as_of_then():
    rtc, clock, _ = make_rtc()
    checkpoint = rtc.save()
    clock.wall -= 60 * NS  # NTP steps the host's wall clock back a minute
    values = ((Reg.SECONDS, 0x00), (Reg.MINUTES, 0x00), (Reg.HOURS, 0x07))
    journal = _applied(rtc, clock, _time_set_frames(values))
    clock.advance(10 * NS)
    back = restarted(checkpoint, clock, journal)
    assert regs(back) == regs(rtc)


def test_rtc_clock_run_past_year_9999_restores_without_flags_the_guest_read():
    """The guest clock runs on past 9999-12-31 (the registers wrap to 0000): its state
    restores, and the flags the guest acknowledged stay clear."""
    rtc, clock, _ = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.PIE | RegB.UIE | RegB.H24)
    set_time(rtc, {Reg.CENTURY: 0x99, Reg.YEAR: 0x99, Reg.MONTH: 0x12, Reg.DAY_OF_MONTH: 0x31,
                   Reg.HOURS: 0x23, Reg.MINUTES: 0x59, Reg.SECONDS: 0x59})  # fmt: skip
    clock.advance(5 * NS)
    rd(rtc, Reg.INTR_FLAGS)
    state = rtc.save()
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    assert (restored.save(), rd(restored, Reg.INTR_FLAGS)) == (state, 0)


@pytest.mark.parametrize("key", ["confirmed", "posted"])
@pytest.mark.parametrize("count", [-1, 2, "1", 1.0, True])
def test_resume_refuses_a_count_of_replayed_frames_that_is_none(key, count):
    frame = base64.b64encode(wire.encode_write(0, b"\x0b")).decode()
    resume = {"applied": 0, "emitted": 0, "skip": 0, "replay": [frame], "replay_wall_ns": [1],
              key: count}  # fmt: skip
    spec = DeviceSpec(name="rtc", model="rtc", channel="ipc:///x", resume=resume)
    with pytest.raises(StateError, match=f"resume: {key} must count frames of the replay"):
        runtime.prepare_resume(spec, DeviceContext())


@pytest.mark.parametrize(
    "times",
    [[], [1, 2], ["1"], [-1], [1 << 64], [1.0]],
    ids=["missing", "one-too-many", "text", "negative", "past-64-bits", "float"],
)
def test_resume_refuses_replay_times_that_do_not_give_one_time_per_frame(times):
    frame = base64.b64encode(wire.encode_write(0, b"\x0b")).decode()
    resume = {"applied": 0, "emitted": 0, "skip": 0, "replay": [frame], "replay_wall_ns": times}
    spec = DeviceSpec(name="rtc", model="rtc", channel="ipc:///x", resume=resume)
    with pytest.raises(StateError, match="resume: replay_wall_ns must"):
        runtime.prepare_resume(spec, DeviceContext())


def test_rtc_state_from_a_newer_version_is_refused():
    doc = {**codec.state_document("rtc", RtcState()), "version": 5}
    with pytest.raises(StateError, match="version 5 is newer than this splitvmm reads"):
        codec.state_from_document("rtc", RtcState, doc)


# -- a hostile guest ------------------------------------------------------------------------------
ACCESS = st.tuples(
    st.sampled_from(["read", "write", "advance"]),
    st.integers(0, 1),  # offset
    st.integers(0, 255),  # value (index or data)
    st.sampled_from([1, 1, 1, 2, 4, 8]),  # size
    st.integers(0, 3 * NS),  # host time that passes
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ACCESS, max_size=60),
    st.integers(-(10**20), 10**20),  # how far the host clock is from the epoch, in ns
)
def test_rtc_any_access_sequence_never_raises_and_saves_a_valid_state(steps, wall):
    clock, irq = FakeClock(abs(wall) % (300 * 365 * 86400 * NS)), FakeIrq()
    rtc = Mc146818(DeviceContext(irq=irq), clock=clock)
    for op, offset, value, size, passed in steps:
        if op == "read":
            assert len(rtc.read(offset, size)) == size
        elif op == "write":
            rtc.write(offset, bytes([value]) * size)
        else:
            clock.advance(passed)
            rtc.tick(clock.mono)
    state = rtc.save()
    assert Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock).save() == state


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0x7F), st.lists(st.integers(0, 255), min_size=1, max_size=12))
def test_rtc_any_value_in_any_register_reads_back_a_byte(reg, values):
    rtc, clock, _ = make_rtc()
    for value in values:
        wr(rtc, Reg.CONTROL, value)
        wr(rtc, reg, value)
        clock.advance(NS // 3)
    assert 0 <= rd(rtc, reg) <= 255


# -- a crash restart, whatever came before and after (hypothesis) ----------------------------
# The rtc is a function of its frames and of when they came (monitor/slot.py): a successor
# restored from the last checkpoint, the frames since re-applied as of when each was sent,
# must be the rtc that never crashed. Checked against such a twin, fed the same frames at
# the same host times, after every step.
RESTART_STEP = st.one_of(
    st.tuples(st.just("index"), st.integers(0, 0x7F) | st.integers(0, 255)),
    st.tuples(st.just("data"), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 1)),
    st.tuples(st.just("advance"), st.integers(0, 3 * NS) | st.sampled_from([NS // 1024, NS])),
    st.tuples(st.sampled_from(["checkpoint", "crash"]), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(RESTART_STEP, max_size=50),
    control=st.integers(0, 255),
    freq=st.integers(0, 255),
)
def test_rtc_crash_restart_is_the_rtc_that_never_crashed(steps, control, freq):
    clock = FakeClock(ns_of(PI_DAY) + HALF)
    rtc = Mc146818(DeviceContext(irq=FakeIrq()), clock=clock)
    twin = Mc146818(DeviceContext(irq=FakeIrq()), clock=clock)
    for device in (rtc, twin):  # interrupts on, as a guest that uses them sets them
        wr(device, Reg.FREQ_SELECT, freq)
        wr(device, Reg.CONTROL, control)
    checkpoint, journal = rtc.save(), []
    for kind, value in steps:
        if kind == "checkpoint":
            checkpoint, journal = rtc.save(), []
        elif kind == "crash":
            rtc = Mc146818.restore(DeviceContext(irq=FakeIrq(), restarted=True), checkpoint, clock)
            runtime.replay(rtc, journal, runtime.Checkpoints(rtc))
            rtc.after_restart()
        elif kind == "advance":
            clock.advance(value)
            for device in (rtc, twin):
                device.tick(clock.mono)
        else:
            if kind == "read":
                frame = wire.encode_read(0, value, 1)
            else:
                frame = wire.encode_write(0 if kind == "index" else 1, bytes([value]))
            journal.append((frame, clock.wall_ns()))
            access = wire.decode_access(frame, 2)
            replies = [runtime._apply(device, access) for device in (rtc, twin)]
            assert replies[0] == replies[1]
        assert rtc.save() == twin.save()


def test_rtc_restored_with_its_line_high_sends_its_edge():
    """IRQ 8's edge went out before the snapshot, but KVM injects an irqfd from a kernel
    worker, maybe after the coordinator read the irqchip. With no edge sent again, the
    interrupt was lost for good: no new edge comes until the driver reads register C, which
    it does from the interrupt handler it never ran."""
    rtc, clock, irq = make_rtc()
    wr(rtc, Reg.CONTROL, RegB.UIE | RegB.H24)
    rd(rtc, Reg.INTR_FLAGS)
    clock.advance(NS)
    rtc.tick(clock.mono)  # the update's edge: the guest has not read C yet
    assert irq.count == 1
    rtc.quiesce()
    state = rtc.save()

    restored_irq = FakeIrq()
    Mc146818.restore(DeviceContext(irq=restored_irq), state, clock)

    assert restored_irq.count == 1


# -- daylight saving (register B's DSE) -------------------------------------------------------
# MC146818A register B, DSE: "On the last Sunday in April the time increments from 1:59:59 AM
# to 3:00:00 AM. On the last Sunday in October when the time first reaches 1:59:59 AM it
# changes to 1:00:00 AM." In 2025 those Sundays are 27 April and 26 October.
SPRING = datetime(2025, 4, 27, 1, 59, 59, tzinfo=UTC)
FALL = datetime(2025, 10, 26, 1, 59, 59, tzinfo=UTC)
HMS_DATE = (Reg.HOURS, Reg.MINUTES, Reg.SECONDS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH)
DSE_MODE_IDS = ["bcd-24h", "binary-24h", "bcd-12h", "binary-12h"]


@pytest.mark.parametrize(
    "control,before,after",
    [
        (RegB.H24, (0x01, 0x59, 0x59, 0x01, 0x27), (0x03, 0x00, 0x00, 0x01, 0x27)),
        (RegB.H24 | RegB.DM_BINARY, (1, 59, 59, 1, 27), (3, 0, 0, 1, 27)),
        (0, (0x01, 0x59, 0x59, 0x01, 0x27), (0x03, 0x00, 0x00, 0x01, 0x27)),  # AM: no bit 7
        (RegB.DM_BINARY, (1, 59, 59, 1, 27), (3, 0, 0, 1, 27)),
    ],
    ids=DSE_MODE_IDS,
)
def test_rtc_dse_springs_from_1_59_59_am_to_3_00_00_on_the_last_sunday_of_april(
    control, before, after
):
    rtc, clock, _ = make_rtc(SPRING, phase=HALF)
    wr(rtc, Reg.CONTROL, control | RegB.DST_EN)
    first = regs(rtc, HMS_DATE)
    clock.advance(HALF)
    assert (first, regs(rtc, HMS_DATE)) == (before, after)


@pytest.mark.parametrize(
    "control,fell_back,second_pass",
    [
        (RegB.H24, (0x01, 0x00, 0x00, 0x01, 0x26), (0x02, 0x00, 0x00, 0x01, 0x26)),
        (RegB.H24 | RegB.DM_BINARY, (1, 0, 0, 1, 26), (2, 0, 0, 1, 26)),
        (0, (0x01, 0x00, 0x00, 0x01, 0x26), (0x02, 0x00, 0x00, 0x01, 0x26)),
        (RegB.DM_BINARY, (1, 0, 0, 1, 26), (2, 0, 0, 1, 26)),
    ],
    ids=DSE_MODE_IDS,
)
def test_rtc_dse_falls_back_to_1_00_00_am_once_on_the_last_sunday_of_october(
    control, fell_back, second_pass
):
    """The hour from 1:00:00 to 1:59:59 AM runs twice; the second time 1:59:59 reaches
    2:00:00, as on any other day."""
    rtc, clock, _ = make_rtc(FALL, phase=HALF)
    wr(rtc, Reg.CONTROL, control | RegB.DST_EN)
    clock.advance(HALF)
    first = regs(rtc, HMS_DATE)
    clock.advance(3600 * NS)
    assert (first, regs(rtc, HMS_DATE)) == (fell_back, second_pass)


@pytest.mark.parametrize("day", [SPRING, FALL], ids=["april", "october"])
@pytest.mark.parametrize(
    "control,after", [(RegB.H24, 0x14), (RegB.H24 | RegB.DM_BINARY, 14), (0, 0x82),
                      (RegB.DM_BINARY, 0x82)], ids=DSE_MODE_IDS,
)  # fmt: skip
def test_rtc_dse_leaves_1_59_59_pm_alone(day, control, after):
    """The jumps are at 1:59:59 AM: the same time in the afternoon (13:59:59, or 1:59:59
    PM with bit 7 in 12-hour mode) runs into 2 PM."""
    rtc, clock, _ = make_rtc(day.replace(hour=13), phase=HALF)
    wr(rtc, Reg.CONTROL, control | RegB.DST_EN)
    clock.advance(HALF)
    assert rd(rtc, Reg.HOURS) == after


@pytest.mark.parametrize(
    "day,control",
    [
        (SPRING.replace(day=20), RegB.H24 | RegB.DST_EN),  # a Sunday, not the last of April
        (FALL.replace(day=19), RegB.H24 | RegB.DST_EN),
        (SPRING.replace(day=30), RegB.H24 | RegB.DST_EN),  # the last day, a Wednesday
        (SPRING, RegB.H24),  # DSE clear: no jump ("these special updates do not occur")
        (FALL, RegB.H24),
    ],
    ids=["april-20", "october-19", "april-30", "april-dse-clear", "october-dse-clear"],
)
def test_rtc_dse_makes_no_jump_on_other_days_or_when_clear(day, control):
    rtc, clock, _ = make_rtc(day, phase=HALF)
    wr(rtc, Reg.CONTROL, control)
    clock.advance(HALF)
    assert regs(rtc, (Reg.HOURS, Reg.MINUTES, Reg.SECONDS)) == (0x02, 0x00, 0x00)


def test_rtc_dse_sunday_is_the_day_of_week_register_s():
    """The chip counts the day of the week in its own register (1 is Sunday) and knows no
    other: a guest that set Saturday 26 April 2025 as day 1 springs forward that night, and
    not on the 27th, which its register shows as day 2."""
    rtc, clock, _ = make_rtc(SPRING.replace(day=26), phase=HALF)
    set_time(rtc, {Reg.DAY_OF_WEEK: 0x01})
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    clock.advance(HALF)
    saturday = rd(rtc, Reg.HOURS)
    clock.advance(86400 * NS - 3600 * NS)  # 1:59:59.5 + 0.5 s on the 27th
    assert (saturday, regs(rtc, (Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH))) == (
        0x03,
        (0x02, 0x02, 0x27),
    )


def test_rtc_dse_alarm_after_the_spring_jump_comes_an_hour_sooner():
    """An alarm at 3:00:05 AM on that Sunday goes off 5.5 s after 1:59:59.5, not an hour
    and 5.5 s later."""
    rtc, clock, irq = make_rtc(SPRING, phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.SECONDS_ALARM, 0x05)
    wr(rtc, Reg.MINUTES_ALARM, 0x00)
    wr(rtc, Reg.HOURS_ALARM, 0x03)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24 | RegB.DST_EN)
    rd(rtc, Reg.INTR_FLAGS)
    waited = run_to_deadline(rtc, clock)  # the jump: the alarm is reckoned again from 3 AM
    waited += run_to_deadline(rtc, clock)
    assert (waited, irq.count, rd(rtc, Reg.INTR_FLAGS) & RegC.AF) == (
        pytest.approx(5.5 + UPDATE_CYCLE_NS / NS, abs=1e-9),
        1,
        RegC.AF,
    )


def test_rtc_dse_alarm_in_the_repeated_hour_goes_off_twice():
    """An alarm at 1:30:00 AM on the last Sunday of October matches in both passes of
    the hour, an hour apart."""
    rtc, clock, irq = make_rtc(FALL.replace(minute=29), phase=HALF)
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.SECONDS_ALARM, 0x00)
    wr(rtc, Reg.MINUTES_ALARM, 0x30)
    wr(rtc, Reg.HOURS_ALARM, 0x01)
    wr(rtc, Reg.CONTROL, RegB.AIE | RegB.H24 | RegB.DST_EN)
    rd(rtc, Reg.INTR_FLAGS)
    run_to_deadline(rtc, clock)  # 1:30:00, the first time
    rd(rtc, Reg.INTR_FLAGS)
    waited = run_to_deadline(rtc, clock)  # the fall back at what would be 2:00:00
    waited += run_to_deadline(rtc, clock)
    assert (waited, irq.count, regs(rtc, (Reg.HOURS, Reg.MINUTES, Reg.SECONDS))) == (
        pytest.approx(3600, abs=1e-9),
        2,
        (0x01, 0x30, 0x00),
    )


def test_rtc_dse_fall_back_into_a_cycle_set_had_aborted_is_an_update():
    """SET released 0.5 ms into the 1:00:00 AM update aborted it (no UIP, no UF); an hour
    later the clock falls back to that same second, by an update that runs: UIP is 1 in
    its 1984 us, and UF comes at its end."""
    rtc, clock, _ = make_rtc(FALL.replace(minute=0, second=0), phase=500_000)
    wr(rtc, Reg.FREQ_SELECT, 0x20)
    wr(rtc, Reg.CONTROL, RegB.SET | RegB.H24 | RegB.DST_EN)
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    clock.advance(3600 * NS)  # 1:00:00.0005, the second time
    rd(rtc, Reg.INTR_FLAGS)
    uip = rd(rtc, Reg.FREQ_SELECT) & RegA.UIP
    clock.advance(UPDATE_CYCLE_NS)
    assert (rd(rtc, Reg.HOURS), uip, rd(rtc, Reg.INTR_FLAGS) & RegC.UF) == (
        0x01,
        RegA.UIP,
        RegC.UF,
    )


def test_rtc_dse_time_set_in_the_repeated_hour_does_not_fall_back_again():
    """A driver that writes the time during the second pass (hwclock --systohc, SET held
    around it) leaves the fall back made: 1:59:59 AM runs into 2:00:00."""
    rtc, clock, _ = make_rtc(FALL, phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    clock.advance(HALF + 1800 * NS)  # 1:30:00, the second time
    set_time(rtc, {Reg.HOURS: 0x01, Reg.MINUTES: 0x30, Reg.SECONDS: 0x00})
    clock.advance(1800 * NS)
    assert regs(rtc, (Reg.HOURS, Reg.MINUTES, Reg.SECONDS)) == (0x02, 0x00, 0x00)


def test_rtc_dse_restored_in_the_repeated_hour_does_not_fall_back_again():
    """A snapshot (or a crash restart's checkpoint) taken after the fall back carries it:
    the restored clock runs through 2:00:00 AM."""
    rtc, clock, _ = make_rtc(FALL, phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    clock.advance(HALF + 1800 * NS)  # 1:30:00, the second time
    state = rtc.save()
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    clock.advance(1800 * NS)
    assert regs(restored, (Reg.HOURS, Reg.MINUTES, Reg.SECONDS)) == (0x02, 0x00, 0x00)


def test_rtc_dse_fall_back_in_a_restart_gap_is_made_once():
    """The device died before 1:59:59 AM and is back at what the guest's clock shows as
    2:29:59.5, an hour and a half later: the restored clock fell back once in the gap."""
    rtc, clock, _ = make_rtc(FALL, phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    checkpoint = rtc.save()
    clock.advance(5400 * NS)
    assert regs(restarted(checkpoint, clock, []), (Reg.HOURS, Reg.MINUTES, Reg.SECONDS)) == (
        0x02,
        0x29,
        0x59,
    )


def test_rtc_dse_clock_restored_a_year_later_made_every_jump_in_between():
    """From 1:59:59.5 AM on 26 October 2025 a year passes: the clock fell back that night,
    sprang forward on 26 April 2026 and fell back again on 25 October 2026, so it shows
    0:59:59.5 AM on Monday 26 October 2026."""
    rtc, clock, _ = make_rtc(FALL, phase=HALF)
    wr(rtc, Reg.CONTROL, RegB.H24 | RegB.DST_EN)
    state = rtc.save()
    clock.advance(365 * 86400 * NS)
    restored = Mc146818.restore(DeviceContext(irq=FakeIrq()), state, clock)
    assert regs(restored) == (0x59, 0x59, 0x00, 0x02, 0x26, 0x10, 0x26, 0x20)


def test_rtc_v3_state_upgrades_to_no_fall_back_made():
    rtc, _ = busy_rtc()
    doc = codec.state_document("rtc", rtc.save())
    fields = {k: v for k, v in doc["fields"].items() if k != "fell_back_s"}
    state = codec.state_from_document("rtc", RtcState, {**doc, "version": 3, "fields": fields})
    assert state.fell_back_s is None
