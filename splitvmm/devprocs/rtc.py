"""MC146818A real-time clock and CMOS RAM at ports 0x70-0x71, as a PC has it.

Register and bit names follow Linux <linux/mc146818rtc.h> (RTC_FREQ_SELECT is register A,
RTC_CONTROL B, RTC_INTR_FLAGS C, RTC_VALID D); behaviour follows the MC146818A datasheet.

Port 0x70 takes the register index in bits 0-6; bit 7 is the PC's NMI-disable bit, kept
and read back with the index (nothing here raises an NMI), never part of the selection.

Time. Nothing ticks: the guest's clock is the host's wall clock plus an offset, which the
guest changes by setting the time. A time register read while the clock runs encodes the
current guest time in the data mode register B asks for (BCD or binary, 12 or 24 hours),
so a driver that switches modes reads the same time in the new encoding, as in QEMU's and
crosvm's models (a chip keeps its raw bytes, and a datasheet driver sets the time again
after a mode change, which works here too). While SET is 1 or the divider chain is not
running (register A's DV bits other than 32.768 kHz; 11x holds it in reset) the time
registers hold raw bytes: the guest reads back what it wrote, and when updates resume the
bytes become the new offset, keeping the sub-second phase after SET (the divider ran on),
or half a second before the next update when the divider leaves reset (datasheet: "the
first update cycle begins one-half second later"). Out-of-range fields carry over (31
February is 3 March; a month outside 1-12 is taken as the nearest one): a hostile value never
raises. The century byte and the year make a four-digit year that counts 9999 -> 0000 as the
two bytes wrap (a datasheet driver that uses 0x32 as RAM may leave 0x00 or 0x99 there; both run
on); 10000 years are a whole number of the Gregorian calendar's 400-year cycles (and weeks), so
the calendar and the day of the week run on across the wrap. Leap years are the Gregorian
calendar's, century byte included (2100 has no 29 February; 0000 and 2000 have one), as the
PC's firmware and Linux read the clock; the bare chip, which knows no century, takes every
fourth year.
DSE (register B bit 0) makes the datasheet's two special updates: on the last Sunday in April
1:59:59 AM goes to 3:00:00 AM; on the last Sunday in October, the first time 1:59:59 AM comes,
to 1:00:00 AM. Both move the offset by an hour at that update; the day of the week is the
register's (a chip knows no other), and which October update fell back is state, so that the
repeated hour runs into 2:00:00 AM after a restore too. (QEMU makes no jump; PC firmware and
Linux keep DSE at 0.)

Update cycle. Each second of guest time the registers advance; UIP (register A bit 7) is 1
from 244 us before that instant to the end of the update cycle (1984 us at 32.768 kHz, 248 us
at the MHz time bases), so a driver that waits for UIP to clear and then reads sees one
consistent time (or re-reads, as Linux's mc146818_get_time does when the seconds moved).

Interrupts. PF, AF and UF (register C) are set when their events pass whether or not they
are enabled, worked out from the time that passed whenever the guest looks; IRQF is a flag
whose enable bit (PIE, AIE, UIE in register B, the same bit positions) is set. The IRQ 8
line is pulsed when IRQF rises (ISA IRQs are edge-triggered, as the serial's IRQ 4), and
reading C clears the flags and lowers it. A timed event (next_deadline/tick) is scheduled
only while the line is low and an enabled interrupt could raise it: a guest that never
enables one, or never acknowledges one, costs no wake-ups.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Mapping
from datetime import date
from typing import Annotated, ClassVar, Protocol, Self

from splitvmm.devprocs.base import DeviceContext, DeviceState, RegisterDevice, register
from splitvmm.errors import ConfigError, StateError
from splitvmm.protocol import schema
from splitvmm.protocol.schema import Upgrade
from splitvmm.record import Struct

CMOS_SIZE = 128
INDEX_PORT, DATA_PORT = 0, 1  # offsets in the window: 0x70, 0x71
NMI_DISABLE = 0x80  # port 0x70 bit 7
INDEX_MASK = 0x7F

NS = 1_000_000_000
TIME_BASE_HZ = 32768  # the PC's crystal: DV = 010
UIP_LEAD_NS = 8 * NS // TIME_BASE_HZ  # UIP rises 244 us before an update (tBUC)
UPDATE_CYCLE_NS = 1_984_000  # and stays up for the update cycle (tUC at 32.768 kHz)
UPDATE_CYCLE_MHZ_NS = 248_000  # tUC at 4.194304 and 1.048576 MHz (DV 000, 001)
HALF_SECOND_NS = NS // 2
DAY_S = 86400
EPOCH = date(1970, 1, 1).toordinal()
# The Gregorian calendar repeats every 400 years (146097 days, a whole number of weeks). Dates
# are worked out with `date` inside the cycle that starts in 2000, then moved by whole cycles:
# `date` knows no year 0000 and no year after 9999, and the registers show both.
CYCLE_YEARS, CYCLE_DAYS = 400, 146097
CYCLE_START = 2000
CYCLE_START_DAY = date(CYCLE_START, 1, 1).toordinal() - EPOCH
CALENDAR_YEARS = 10000  # what the century byte and the year show: 0000-9999, then 0000 again
PERIOD_S = CALENDAR_YEARS // CYCLE_YEARS * CYCLE_DAYS * DAY_S
# Any offset a set clock can have: the held registers decode to a time within a period of
# year 0000 (fields out of range carry a little past it), the host's clock is after 1970.
MAX_OFFSET_NS = PERIOD_S * NS
MAX_GUEST_NS = (1 << 63) + MAX_OFFSET_NS  # a guest time: CLOCK_REALTIME ns plus an offset
# DSE's special updates: the one that would show 2:00:00 AM on the last Sunday of April or
# October (its month, and that month's last day) moves the clock by that many seconds.
DSE_UPDATE_S = 2 * 3600
DSE_JUMPS = ((4, 30, 3600), (10, 31, -3600))
ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches any value
BASES = ("utc", "localtime")


class Reg(enum.IntEnum):
    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    FREQ_SELECT = 0x0A  # register A
    CONTROL = 0x0B  # register B
    INTR_FLAGS = 0x0C  # register C
    VALID = 0x0D  # register D
    CENTURY = 0x32  # not on the MC146818: the PC's (IBM AT, ACPI FADT) century byte


TIME_REGS = frozenset(
    {Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH, Reg.MONTH}
    | {Reg.YEAR, Reg.CENTURY}
)


class RegA(enum.IntFlag):
    UIP = 0x80  # update in progress (read-only)
    DIV_CTL = 0x70  # time base: 000 4.194304 MHz, 001 1.048576 MHz, 010 32.768 kHz, 11x reset
    RATE_SELECT = 0x0F  # periodic interrupt rate


REF_CLCK_32KHZ = 0x20
DIV_CTL = int(RegA.DIV_CTL)  # a plain int: masking with the IntFlag costs ~3 us an access
# register B's DM and 24/12 bits -> the bytes shown for hours 0-23 and for 0-59 (_shown_values)
_SHOWN_VALUES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}


class RegB(enum.IntFlag):
    SET = 0x80  # updates inhibited while the time is set
    PIE = 0x40  # periodic interrupt enable
    AIE = 0x20  # alarm interrupt enable
    UIE = 0x10  # update-ended interrupt enable
    SQWE = 0x08  # square wave (no pin here: kept only)
    DM_BINARY = 0x04  # binary, not BCD
    H24 = 0x02  # 24-hour mode
    DST_EN = 0x01  # daylight saving (DSE): the April and October jumps


class RegC(enum.IntFlag):
    IRQF = 0x80
    PF = 0x40
    AF = 0x20
    UF = 0x10


FLAGS = RegC.PF | RegC.AF | RegC.UF  # each at the bit of its enable in register B
RTC_VRT = 0x80  # register D: valid RAM and time (the battery is good)

# What PC firmware leaves: 32.768 kHz and 1024 Hz (A = 0x26), 24-hour BCD (B = 0x02).
POWER_ON = {Reg.FREQ_SELECT: 0x26, Reg.CONTROL: int(RegB.H24), Reg.VALID: RTC_VRT}


# The NVRAM bytes through which a PC's CMOS tells firmware how much RAM and how many CPUs it
# has (the IBM AT's layout, and the extensions SeaBIOS reads where it has no fw_cfg; QEMU's
# pc_cmos_init sets the same): base memory in KiB; memory above 1 MiB in KiB (at most
# 0xFFFF), twice, as an AT BIOS copies it at POST; memory from 16 MiB to the PCI hole and
# above 4 GiB in 64 KiB units; the CPUs less one. Words are little-endian.
NVRAM_BASE_KIB = 0x15  # and 0x16
NVRAM_EXT_KIB = (0x17, 0x30)  # and 0x18, 0x31
NVRAM_EXT_16M = 0x34  # and 0x35
NVRAM_HIGH = 0x5B  # 0x5B-0x5D: 24 bits
NVRAM_CPUS = 0x5F
NVRAM_CHECKSUM = 0x2E  # big-endian sum of 0x10-0x2D (the AT's checksummed range)
BASE_MEMORY_KIB = 640


class Machine(Struct, frozen=True):
    """The machine the monitor says the clock sits in (DeviceSpec.transport["machine"])."""

    ram_below_4g: Annotated[int, schema.Range(0, 1 << 32)]
    ram_above_4g: Annotated[int, schema.Range(0, 1 << 52)]
    vcpus: Annotated[int, schema.Range(1, 1024)]


def _power_on_cmos(machine: Machine | None = None) -> bytes:
    cmos = bytearray(CMOS_SIZE)
    for reg, value in POWER_ON.items():
        cmos[reg] = value
    if machine is not None:
        _write_nvram(cmos, machine)
    return bytes(cmos)


def _write_nvram(cmos: bytearray, m: Machine) -> None:
    kib, chunk = 1 << 10, 64 << 10
    extended = min(0xFFFF, max(0, (m.ram_below_4g + m.ram_above_4g) // kib - 1024))
    above_16m = min(0xFFFF, max(0, (m.ram_below_4g - (16 << 20)) // chunk))
    cmos[NVRAM_BASE_KIB : NVRAM_BASE_KIB + 2] = BASE_MEMORY_KIB.to_bytes(2, "little")
    for at in NVRAM_EXT_KIB:
        cmos[at : at + 2] = extended.to_bytes(2, "little")
    cmos[NVRAM_EXT_16M : NVRAM_EXT_16M + 2] = above_16m.to_bytes(2, "little")
    high = min(0xFFFFFF, m.ram_above_4g // chunk)
    cmos[NVRAM_HIGH : NVRAM_HIGH + 3] = high.to_bytes(3, "little")
    cmos[NVRAM_CPUS] = min(0xFF, m.vcpus - 1)
    checksum = sum(cmos[0x10:NVRAM_CHECKSUM])
    cmos[NVRAM_CHECKSUM : NVRAM_CHECKSUM + 2] = checksum.to_bytes(2, "big")


def _machine(ctx: DeviceContext) -> Machine | None:
    """What the monitor says of the machine (it always does for this model; None where a
    test's context says nothing)."""
    given = ctx.transport.get("machine")
    if given is None:
        return None
    return schema.decode(Machine, given, where="rtc transport", error=ConfigError)


class Clock(Protocol):
    def wall_ns(self) -> int:
        """The host's wall clock (CLOCK_REALTIME), ns since the epoch."""
        ...

    def monotonic(self) -> float:
        """The clock the runtime's deadlines use (time.monotonic)."""
        ...

    def utc_offset(self, wall_s: int) -> int:
        """The host's local time minus UTC at wall_s, in seconds."""
        ...


class HostClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()

    def utc_offset(self, wall_s: int) -> int:
        # glibc read the zone when `time` was imported, before the sandbox: no file opened.
        return time.localtime(wall_s).tm_gmtoff


class RtcState(DeviceState, frozen=True, kw_only=True):
    """cmos: the 128 bytes as the guest would read them, with register A's UIP clear and
    register C's IRQF left out (both derived); the time registers are restored from it
    only while they are held (SET, or the divider not running), else from offset_ns.
    v2 added aborted_s, v3 synced_ns, v4 fell_back_s. Releases before DV 000 and 001 ran
    the clock held them as a reset does: such a v3 state restores running from offset_ns,
    the time the clock would show had it run all along."""

    VERSION: ClassVar[int] = 4
    offset_ns: int = 0  # guest clock minus the host's wall clock: survives a restore
    index: int = 0  # the last byte written to port 0x70 (bit 7: NMI disabled)
    cmos: bytes = _power_on_cmos()
    weekday_shift: int = 0  # the day of the week the guest set, less the date's own (mod 7)
    # The guest second whose update SET aborted, while the time base is still inside its
    # cycle (Mc146818._unset); None at any other time
    aborted_s: int | None = None
    # The guest time (ns) up to which register C's flags account for the events: a restored
    # clock sets those that came since (a restart's gap: an alarm in it still goes off). None
    # (states before v3): from the restore on.
    synced_ns: int | None = None
    # The guest second of the update DSE turned from 2:00:00 back to 1:00:00 AM (the last one
    # it did): when the clock reaches it again, it runs on. None: no fall back made (or v3).
    fell_back_s: int | None = None
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {
        1: lambda f: {**f, "aborted_s": None},
        2: lambda f: {**f, "synced_ns": None},
        3: lambda f: {**f, "fell_back_s": None},
    }


@register
class Mc146818(RegisterDevice):
    NAME = "rtc"
    WINDOW = 2
    State = RtcState

    def __init__(
        self, ctx: DeviceContext, state: RtcState | None = None, clock: Clock | None = None
    ) -> None:
        super().__init__(ctx)
        s = state or RtcState()
        self._clock = clock or HostClock()
        self._now = self._clock.wall_ns()  # the host instant of the access being served
        self._offset_ns = s.offset_ns
        self._index = s.index
        self._cmos = bytearray(s.cmos)
        self._weekday_shift = s.weekday_shift
        # flags in C account for the events up to this guest time
        self._synced_ns = self._guest_ns() if s.synced_ns is None else s.synced_ns
        self._aborted_s = s.aborted_s  # the second whose update SET aborted (_unset)
        self._fell_back_s = s.fell_back_s  # the October update DSE turned back (_daylight_saving)
        self._line = self._irqf()  # the IRQ line as last driven (an edge was sent if high)
        self._quiesced = False
        # The host instant a restart's checkpoint accounts for (its last sync): _begin
        self._checkpoint_ns = None if s.synced_ns is None else s.synced_ns - s.offset_ns
        self._deadline: float | None = None
        self._schedule()

    @classmethod
    def from_options(
        cls, ctx: DeviceContext, options: Mapping[str, object], clock: Clock | None = None
    ) -> Self:
        """`base = "utc"` (a PC's usual) or `"localtime"`: what the clock shows at start."""
        base = _base_option(options)
        clock = clock or HostClock()
        offset = clock.utc_offset(clock.wall_ns() // NS) * NS if base == "localtime" else 0
        return cls(ctx, RtcState(offset_ns=offset, cmos=_power_on_cmos(_machine(ctx))), clock)

    def check_options(self, options: Mapping[str, object]) -> None:
        """`base` says what the clock shows at start only: a restored clock runs on from its
        saved offset, whatever it says, but a value a boot would refuse is refused."""
        _base_option(options)

    # -- guest accesses -------------------------------------------------------------
    # A wider access is byte cycles at consecutive ports, as an ISA bus splits it for an
    # 8-bit device (QEMU's CMOS does the same): `outw 0x70` with 0x5a0e selects register
    # 0x0e, then writes 0x5a to it, an idiom of some boot code.
    def read(self, offset: int, size: int) -> bytes:
        self._begin()
        values = bytearray()
        for at in range(offset, offset + size):
            index = self._index
            values.append(index if at == INDEX_PORT else self._read_reg(index & INDEX_MASK))
        self._end()
        return bytes(values)

    def write(self, offset: int, data: bytes) -> None:
        self._begin()
        for at, value in enumerate(data, offset):
            if at == INDEX_PORT:
                self._index = value
            else:
                self._write_reg(self._index & INDEX_MASK, value)
        self._end()

    # -- timed events (runtime.serve) ---------------------------------------------------
    def next_deadline(self) -> float | None:
        return None if self._quiesced else self._deadline

    def tick(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return  # woken early (a frame came first): nothing is due yet
        self._begin()
        self._end()

    def quiesce(self) -> None:
        self._quiesced = True  # no interrupt while the VM's irqchip state is being saved

    def resume(self) -> None:
        self._quiesced = False

    def _begin(self) -> None:
        """Every entry point: read the clock once, account for the time that passed. A frame
        a restart re-applies is served as of when it was first sent (runtime.replay), or
        of the checkpoint's instant for one sent before it that was on its way as the dead
        process saved its checkpoint, and applied after: the monitor sent it before it had
        that checkpoint (ctx.replay_posted). Served at its sending, it took the clock back
        behind the checkpoint's flags: the events in between (in register C already, read
        and cleared by the next replayed frame) came again, or, after a write that moved
        the clock, an alarm of the new clock in between never came. A frame sent after the
        monitor had the checkpoint, though its time is before the checkpoint's instant (the
        host's clock stepped back since), was served at its sending by the live device, and
        is again."""
        replayed, checkpoint = self.ctx.replay_wall_ns, self._checkpoint_ns
        if replayed is None:
            replayed = self._clock.wall_ns()
        elif self.ctx.replay_posted and checkpoint is not None and replayed < checkpoint:
            replayed = checkpoint
        self._now = replayed
        self._sync()
        self._update_irq()

    def _end(self) -> None:
        self._update_irq()
        self._schedule()

    # -- registers --------------------------------------------------------------------
    def _read_reg(self, reg: int) -> int:
        if reg in TIME_REGS and not self._held():
            return self._encoded(self._guest_ns() // NS)[reg]
        if reg == Reg.FREQ_SELECT:
            return self._cmos[reg] | (int(RegA.UIP) if self._uip() else 0)
        if reg == Reg.INTR_FLAGS:
            value = self._cmos[reg] | (int(RegC.IRQF) if self._irqf() else 0)
            self._cmos[reg] = 0  # reading C acknowledges everything and lowers the line
            self._line = False
            return value
        return self._cmos[reg]

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in TIME_REGS:
            self._write_time(reg, value)
        elif reg == Reg.FREQ_SELECT:
            self._write_control(reg, value & ~RegA.UIP)
        elif reg == Reg.CONTROL:
            # The datasheet: SET going to 1 clears UIE (no update ends while it is set).
            self._write_control(reg, value & ~RegB.UIE if value & RegB.SET else value)
        elif reg in (Reg.INTR_FLAGS, Reg.VALID):
            self.ctx.counters.bad_access += 1  # read-only status registers
        else:
            self._cmos[reg] = value  # alarms and NVRAM

    def _write_time(self, reg: int, value: int) -> None:
        if self._held():
            self._cmos[reg] = value
            return
        # A write while the clock runs sets that field, the others and the phase unchanged;
        # inside a cycle SET aborted (_unset), that update stays aborted.
        phase, aborted = self._guest_ns() % NS, self._in_aborted_cycle()
        self._latch()
        self._cmos[reg] = value
        self._unlatch(phase)
        if aborted:
            self._aborted_s = self._guest_ns() // NS

    def _write_control(self, reg: int, value: int) -> None:
        """Register A or B: holding or releasing the time registers as SET and DV change."""
        was_held, was_running = self._held(), self._running()
        a, b = self._cmos[Reg.FREQ_SELECT], self._cmos[Reg.CONTROL]
        a, b = (value, b) if reg == Reg.FREQ_SELECT else (a, value)
        if not was_held and _holds(a, b):
            self._latch()  # in the mode the registers were in, as a chip keeps its bytes
        self._cmos[reg] = value
        if self._running() and not was_running:
            # Out of reset, the first update comes half a second later.
            self._offset_ns = self._latched_s() * NS + HALF_SECOND_NS - self._now
        if was_held and not self._held():
            self._unset(self._guest_ns() % NS)
        self._synced_ns = self._guest_ns()

    # -- the clock ----------------------------------------------------------------------
    def _guest_ns(self) -> int:
        return self._now + self._offset_ns

    def _running(self) -> bool:
        return _divider_runs(self._cmos[Reg.FREQ_SELECT])

    def _held(self) -> bool:
        return _holds(self._cmos[Reg.FREQ_SELECT], self._cmos[Reg.CONTROL])

    def _uip(self) -> bool:
        if self._held():
            return False  # SET clears UIP; a divider in reset makes no update
        phase = self._guest_ns() % NS
        if phase >= NS - UIP_LEAD_NS:
            return True
        return phase < self._cycle_ns() and not self._in_aborted_cycle()

    def _cycle_ns(self) -> int:
        """tUC, how long an update cycle lasts: the datasheet's table of update-cycle times
        gives 1984 us with the 32.768 kHz time base, 248 us with the two MHz ones."""
        if self._cmos[Reg.FREQ_SELECT] & DIV_CTL < REF_CLCK_32KHZ:
            return UPDATE_CYCLE_MHZ_NS
        return UPDATE_CYCLE_NS

    def _in_aborted_cycle(self) -> bool:
        g = self._guest_ns()
        return g // NS == self._aborted_s and g % NS < self._cycle_ns()

    def _latch(self) -> None:
        """The time registers take the current time: from now on they hold raw bytes."""
        for reg, value in self._encoded(self._guest_ns() // NS).items():
            self._cmos[reg] = value

    def _unlatch(self, phase_ns: int) -> None:
        """The held registers become the running clock, at that sub-second phase."""
        seconds = self._latched_s()
        self._offset_ns = seconds * NS + phase_ns - self._now
        weekday = self._decode(self._cmos[Reg.DAY_OF_WEEK]) - 1
        self._weekday_shift = (weekday - _weekday(seconds)) % 7
        self._synced_ns = self._guest_ns()
        self._aborted_s = None

    def _unset(self, phase_ns: int) -> None:
        """The held registers run again (SET cleared, or the divider out of reset with SET
        clear): "when the SET bit is written to a one, any update cycle in progress is
        aborted", and none runs while it is one. So where the time base is still inside
        the cycle of the tick that came while SET was one, that update is not under way:
        UIP stays low and no UF (nor AF) comes at its end; the next update is a second
        after that tick, with the divider's phase kept."""
        self._unlatch(phase_ns)
        if phase_ns < self._cycle_ns():
            self._aborted_s = self._guest_ns() // NS

    def _latched_s(self) -> int:
        """The held time registers as seconds since the epoch; fields out of range carry."""
        cmos, dec = self._cmos, self._decode
        year = (dec(cmos[Reg.CENTURY]) % 100) * 100 + dec(cmos[Reg.YEAR])
        month = min(max(dec(cmos[Reg.MONTH]), 1), 12)
        cycles, year_in_cycle = divmod(year, CYCLE_YEARS)
        first = date(CYCLE_START + year_in_cycle, month, 1).toordinal() - EPOCH
        days = first + (cycles - CYCLE_START // CYCLE_YEARS) * CYCLE_DAYS
        days += dec(cmos[Reg.DAY_OF_MONTH]) - 1
        clock = self._decode_hour(cmos[Reg.HOURS]) * 3600 + dec(cmos[Reg.MINUTES]) * 60
        return days * DAY_S + clock + dec(cmos[Reg.SECONDS])

    def _encoded(self, seconds: int) -> dict[int, int]:
        """The time registers for a second of guest time, in the mode register B says."""
        days, clock = divmod(seconds, DAY_S)
        cycles, day = _calendar(days)
        year = (day.year + cycles * CYCLE_YEARS) % CALENDAR_YEARS
        enc = self._encode
        return {
            Reg.SECONDS: enc(clock % 60),
            Reg.MINUTES: enc(clock // 60 % 60),
            Reg.HOURS: self._encode_hour(clock // 3600),
            Reg.DAY_OF_WEEK: enc((_weekday(seconds) + self._weekday_shift) % 7 + 1),
            Reg.DAY_OF_MONTH: enc(day.day),
            Reg.MONTH: enc(day.month),
            Reg.YEAR: enc(year % 100),
            Reg.CENTURY: enc(year // 100),
        }

    def _binary(self) -> bool:
        return bool(self._cmos[Reg.CONTROL] & RegB.DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else (value // 10) << 4 | value % 10

    def _decode(self, raw: int) -> int:
        return raw if self._binary() else (raw >> 4) * 10 + (raw & 0x0F)

    def _encode_hour(self, hour: int) -> int:
        if self._cmos[Reg.CONTROL] & RegB.H24:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)  # bit 7: PM

    def _decode_hour(self, raw: int) -> int:
        if self._cmos[Reg.CONTROL] & RegB.H24:
            return self._decode(raw)
        return self._decode(raw & 0x7F) % 12 + (12 if raw & 0x80 else 0)

    # -- events and the interrupt line ------------------------------------------------------
    def _sync(self) -> None:
        """Set the flags of every event between the last sync and now (making DSE's jumps)."""
        g0, g = self._synced_ns, self._guest_ns()
        self._synced_ns = g
        if g <= g0 or not self._running():
            return
        period = self._period_ticks()  # a jump is whole periods: PF is the same either side
        if period and _ticks(g) // period > _ticks(g0) // period:
            self._cmos[Reg.INTR_FLAGS] |= RegC.PF
        if self._cmos[Reg.CONTROL] & RegB.SET:
            return  # no update cycles while the time is being set
        first, last = self._updates_from(g0), (g - self._cycle_ns()) // NS
        runs = [(first, last)]  # the seconds the updates showed (none where last < first)
        if self._cmos[Reg.CONTROL] & RegB.DST_EN:
            runs = self._daylight_saving(g0, first)  # before, between and after its jumps
            self._synced_ns = self._guest_ns()
        for first, last in runs:
            if first > last:
                continue
            self._cmos[Reg.INTR_FLAGS] |= RegC.UF
            alarm = self._next_alarm(first)
            if alarm is None:
                break  # a value the clock never shows: no run matches it
            if alarm <= last:
                self._cmos[Reg.INTR_FLAGS] |= RegC.AF
                break

    def _daylight_saving(self, g0: int, first: int) -> list[tuple[int, int]]:
        """Make DSE's jumps whose updates began after guest ns `g0` and by now; the runs of
        updates (first to last second) before, between and after them. A jump's update
        starts the run after it: its UF and its alarm match are those of the time it shows."""
        runs = []
        for update, shift in self._dse_jumps(g0 // NS + 1):
            if update * NS > self._guest_ns():
                break
            runs.append((first, update - 1))
            self._offset_ns += shift * NS
            self._aborted_s = None  # a fall back may come to the second of an aborted cycle
            if shift < 0:
                self._fell_back_s = update
            first = update + shift
        return [*runs, (first, (self._guest_ns() - self._cycle_ns()) // NS)]

    def _dse_jumps(self, start: int) -> Iterator[tuple[int, int]]:
        """DSE's special updates from guest second `start` on, in order, each as the second
        it would show without DSE (2:00:00 AM) and the seconds it moves the clock by. The last
        Sunday of a month is the last day of it whose day of the week register shows 1; an
        October update that fell back already is not one again."""
        cycles, day = _calendar(-((DSE_UPDATE_S - start) // DAY_S))  # first 2 AM from start
        year = day.year
        while True:
            for month, last, shift in DSE_JUMPS:
                end = date(year, month, last).toordinal() - EPOCH + cycles * CYCLE_DAYS
                sunday = end - (_weekday(end * DAY_S) + self._weekday_shift) % 7
                update = sunday * DAY_S + DSE_UPDATE_S
                if update >= start and not (shift < 0 and update == self._fell_back_s):
                    yield update, shift
            year += 1
            if year == CYCLE_START + CYCLE_YEARS:  # `date` holds one cycle: on to the next
                year, cycles = CYCLE_START, cycles + 1

    def _updates_from(self, g: int) -> int:
        """The first second whose update cycle ends after guest ns `g` (not the aborted one)."""
        first = (g - self._cycle_ns()) // NS + 1
        return first + 1 if first == self._aborted_s else first

    def _period_ticks(self) -> int:
        """The periodic interrupt's period in time-base ticks; 0 when off (RS = 0)."""
        rate = self._cmos[Reg.FREQ_SELECT] & RegA.RATE_SELECT
        if rate == 0:
            return 0
        if rate <= 2 and self._cmos[Reg.FREQ_SELECT] & DIV_CTL == REF_CLCK_32KHZ:
            return 1 << (rate + 6)  # 1, 2: 256 and 128 Hz with the 32.768 kHz time base
        return 1 << (rate - 1)  # 1, 2: 32768 and 16384 Hz at 4.194304 and 1.048576 MHz

    def _next_alarm(self, start: int) -> int | None:
        """The first second from `start` on whose update matches the alarm registers."""
        cmos = self._cmos
        shown_hours, shown_sixty = self._shown_values()
        hours = _matching(cmos[Reg.HOURS_ALARM], shown_hours)
        minutes = _matching(cmos[Reg.MINUTES_ALARM], shown_sixty)
        seconds = _matching(cmos[Reg.SECONDS_ALARM], shown_sixty)
        if not (hours and minutes and seconds):
            return None  # a value the clock never shows: the alarm never goes off
        midnight, clock = divmod(start, DAY_S)
        today = _first_in_day(clock, hours, minutes, seconds)
        if today is not None:
            return midnight * DAY_S + today
        return (midnight + 1) * DAY_S + (_first_in_day(0, hours, minutes, seconds) or 0)

    def _shown_values(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The bytes the clock shows for hours 0-23 and for 0-59 in the mode register B says,
        made once per mode: with AIE on, every access checks the alarm against them (~100 us
        an access when they were encoded each time)."""
        mode = int(self._cmos[Reg.CONTROL] & (RegB.DM_BINARY | RegB.H24))
        shown = _SHOWN_VALUES.get(mode)
        if shown is None:
            hours = tuple(self._encode_hour(h) for h in range(24))
            shown = _SHOWN_VALUES[mode] = hours, tuple(self._encode(v) for v in range(60))
        return shown

    def _irqf(self) -> bool:
        return bool(self._cmos[Reg.INTR_FLAGS] & self._cmos[Reg.CONTROL] & FLAGS)

    def _update_irq(self) -> None:
        irqf = self._irqf()
        if irqf and not self._line and not self.ctx.replaying:
            self.ctx.irq.trigger()  # a replayed frame's edge went out from the dead process
        self._line = irqf

    def after_restart(self) -> None:
        """The journal replayed (registers only: no edge went out for it): one edge if the
        line is high now, for the one the dead process may have died before sending (a
        spurious one finds register C's flags, or none, as after any edge)."""
        was_high = self._line
        self._begin()  # an event in the gap raises the line now, with its edge
        if was_high and self._line:
            self.ctx.irq.trigger()
        self._end()

    def _schedule(self) -> None:
        """The next instant an enabled interrupt could raise the line, on the runtime's clock."""
        event = self._next_event()
        if event is None:
            self._deadline = None
            return
        # From the clock as it reads now, not from self._now: a replayed frame's is past.
        now = self._clock.wall_ns() + self._offset_ns
        self._deadline = self._clock.monotonic() + (event - now) / NS

    def _next_event(self) -> int | None:
        """Guest ns of the next event whose enable bit is set, while the line is low; from
        the last sync on, so that a restored clock ticks at once for an event in the gap."""
        control, g = self._cmos[Reg.CONTROL], min(self._synced_ns, self._guest_ns())
        if self._line or not self._running() or not control & FLAGS:
            return None
        events = []
        period = self._period_ticks()
        if control & RegB.PIE and period:
            events.append(_tick_ns((_ticks(g) // period + 1) * period))
        if not control & RegB.SET:
            next_update = self._updates_from(g)
            if control & RegB.UIE:
                events.append(next_update * NS + self._cycle_ns())
            alarm = self._next_alarm(next_update) if control & RegB.AIE else None
            if alarm is not None:
                events.append(alarm * NS + self._cycle_ns())
            if alarm is not None and control & RegB.DST_EN:
                # The next jump moves the alarm's instant: it is reckoned again from there.
                events.append(next(self._dse_jumps(g // NS + 1))[0] * NS)
        return min(events, default=None)

    # -- state ----------------------------------------------------------------------------------
    def save(self) -> RtcState:
        # Quiesced (a snapshot's step 3), the state is as of the last access: syncing now
        # would raise IRQ 8 while the irqchip's state is being saved, and a state saved
        # with the line high gives a restored VM no edge for it. What came since lies
        # after synced_ns: the first tick after resume(), or after a restore, raises it.
        if not self._quiesced:
            self._begin()
        cmos = bytearray(self._cmos)
        if not self._held():
            for reg, value in self._encoded(self._guest_ns() // NS).items():
                cmos[reg] = value  # what the guest would read (restore takes offset_ns)
        return RtcState(
            offset_ns=self._offset_ns,
            index=self._index,
            cmos=bytes(cmos),
            weekday_shift=self._weekday_shift,
            aborted_s=self._aborted_s if self._in_aborted_cycle() else None,
            synced_ns=self._synced_ns,
            fell_back_s=self._fell_back_s,
        )

    @classmethod
    def restore(cls, ctx: DeviceContext, state: RtcState, clock: Clock | None = None) -> Self:
        _check_int("offset_ns", state.offset_ns, -MAX_OFFSET_NS, MAX_OFFSET_NS)
        _check_int("index", state.index, 0, 0xFF)
        _check_int("weekday_shift", state.weekday_shift, 0, 6)
        if not isinstance(state.cmos, bytes) or len(state.cmos) != CMOS_SIZE:
            raise StateError(f"rtc: cmos must be {CMOS_SIZE} bytes")
        if state.cmos[Reg.FREQ_SELECT] & RegA.UIP:
            raise StateError("rtc: register A has UIP set (it is derived, never saved)")
        if state.cmos[Reg.INTR_FLAGS] & ~FLAGS:
            raise StateError("rtc: register C holds bits other than PF, AF and UF")
        if state.cmos[Reg.VALID] != RTC_VRT:
            raise StateError(f"rtc: register D is {state.cmos[Reg.VALID]:#04x}, not VRT")
        # Guest times: the host's wall clock plus an offset (they run on past year 9999, where
        # the registers wrap to 0000).
        if state.aborted_s is not None:
            _check_int("aborted_s", state.aborted_s, -MAX_OFFSET_NS // NS, MAX_GUEST_NS // NS)
        if state.synced_ns is not None:
            _check_int("synced_ns", state.synced_ns, -MAX_OFFSET_NS, MAX_GUEST_NS)
        if state.fell_back_s is not None:
            _check_int("fell_back_s", state.fell_back_s, -MAX_OFFSET_NS // NS, MAX_GUEST_NS // NS)
        rtc = cls(ctx, state, clock)
        if rtc._line and not ctx.restarted:
            # Its edge went out before the save, but KVM injects it from a worker, maybe
            # after the snapshot read the irqchip: sent again (a restart's: after_restart)
            ctx.irq.trigger()
        return rtc


def _divider_runs(a: int) -> bool:
    """Whether register A's DV bits name one of the three time bases (000, 001, 010): each
    runs the divider chain. A PC's crystal is 32.768 kHz, and the clock keeps the host's time
    whichever a driver names, as QEMU's does (a driver written from the datasheet may write
    000). 011 to 101 are test settings: stopped, as 11x (reset) is."""
    return a & DIV_CTL <= REF_CLCK_32KHZ


def _holds(a: int, b: int) -> bool:
    """Whether registers A and B hold the time registers still (SET, or no running divider)."""
    return bool(b & RegB.SET) or not _divider_runs(a)


def _calendar(day: int) -> tuple[int, date]:
    """A day since the epoch as its date in the 400-year cycle from 2000, and how many whole
    cycles that date is from its own."""
    cycles, day_in_cycle = divmod(day - CYCLE_START_DAY, CYCLE_DAYS)
    return cycles, date.fromordinal(EPOCH + CYCLE_START_DAY + day_in_cycle)


def _weekday(seconds: int) -> int:
    """0 for Sunday .. 6 for Saturday (1 January 1970 was a Thursday)."""
    return (seconds // DAY_S + 4) % 7


def _ticks(ns: int) -> int:
    return ns * TIME_BASE_HZ // NS


def _tick_ns(ticks: int) -> int:
    return -(-ticks * NS // TIME_BASE_HZ)  # the first ns at or after that tick


def _matching(alarm: int, encoded: tuple[int, ...]) -> list[int]:
    """The field values (indices of `encoded`) an alarm byte matches, in order."""
    if alarm & ALARM_DONT_CARE == ALARM_DONT_CARE:
        return list(range(len(encoded)))
    return [value for value, raw in enumerate(encoded) if raw == alarm]


def _first_in_day(
    clock: int, hours: list[int], minutes: list[int], seconds: list[int]
) -> int | None:
    """The first second of the day at or after `clock` whose hour, minute and second are in
    those (sorted) lists; None if the day has none left."""
    now = (clock // 3600, clock // 60 % 60, clock % 60)
    for h in (h for h in hours if h >= now[0]):
        for m in (m for m in minutes if (h, m) >= now[:2]):
            s = next((s for s in seconds if (h, m, s) >= now), None)
            if s is not None:
                return h * 3600 + m * 60 + s
    return None


def _base_option(options: Mapping[str, object]) -> object:
    base = options.get("base", "utc")
    if base not in BASES:
        raise ConfigError(f"rtc: base must be one of {', '.join(BASES)}, got {base!r}")
    return base


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise StateError(f"rtc: {name}={value!r} is outside {low}..{high}")
