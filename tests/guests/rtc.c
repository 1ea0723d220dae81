/* rtc: reads the PC's MC146818A real-time clock (ports 0x70/0x71) the way the datasheet
 * says, polled (no interrupts), and prints what it read for the host to check.
 *
 *   1. Register D: VRT (bit 7) must be 1 and bits 6-0 zero.
 *   2. Register A: UIP must be seen set at least once in a bounded poll (at least 2.5 s, so
 *      at least two updates fall inside it, however slow each poll is).
 *   3. Register B = 24-hour BCD (0x02); the time, read consistently (below), printed.
 *   4. Register B = 24-hour binary (0x06); the time read again and printed.
 *   5. Still binary: the time read again once the seconds register has moved on (bounded:
 *      at least 2.5 s), printed; it must be 1 or 2 seconds after the one before.
 *   6. Register B back to 24-hour BCD, the PC's usual.
 *
 * A consistent read (datasheet, "Avoiding update cycles"): wait for UIP = 0, read the time
 * registers, then check that UIP is still 0 and the seconds did not move; otherwise again.
 * (UIP = 0 promises 244 us without an update; each port access here is an exit to the VMM,
 * which can take longer than that, hence the check after.)  Lines, one per read:
 *
 *   rtc: bcd YYYY-MM-DDTHH:MM:SSZ epoch=<seconds since 1970-01-01T00:00:00Z>
 *   rtc: binary ...
 *   rtc: later ...
 *
 * Exit statuses (debug-exit value -> host status):
 *   0x10 -> 33  all checks passed
 *   0x03 ->  7  register D does not read VRT alone
 *   0x04 ->  9  UIP never seen set
 *   0x05 -> 11  no consistent read of the time
 *   0x06 -> 13  the seconds did not move, or moved by more than 2 */
#include "exit.h"
#include "io.h"
#include "print.h"
#include "serial.h"
#include "tsc.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

/* MC146818A register map and bits (Linux <linux/mc146818rtc.h> names). */
#define RTC_SECONDS 0x00
#define RTC_MINUTES 0x02
#define RTC_HOURS 0x04
#define RTC_DAY_OF_MONTH 0x07
#define RTC_MONTH 0x08
#define RTC_YEAR 0x09
#define RTC_FREQ_SELECT 0x0a /* register A */
#define RTC_CONTROL 0x0b     /* register B */
#define RTC_VALID 0x0d       /* register D */
#define RTC_CENTURY 0x32     /* the PC's century byte (IBM AT; ACPI FADT "century") */
#define RTC_UIP 0x80
#define RTC_DM_BINARY 0x04
#define RTC_24H 0x02
#define RTC_VRT 0x80

#define EXIT_PASSED 0x10
#define EXIT_NOT_VALID 0x03
#define EXIT_NO_UIP 0x04
#define EXIT_NO_READ 0x05
#define EXIT_NO_TICK 0x06

#define UIP_POLL_US 2500000   /* longer than two update periods */
#define UIP_CLEAR_US 50000    /* UIP stays up for at most 2.228 ms */
#define READ_ATTEMPTS 20
#define TICK_WAIT_US 2500000

struct rtc_time {
	u32 year, month, day, hour, minute, second;
};

NORETURN void guest_main(const void *boot_params);

static u8 cmos_read(u8 reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

static void cmos_write(u8 reg, u8 value)
{
	outb(CMOS_INDEX, reg);
	outb(CMOS_DATA, value);
}

static u32 from_bcd(u8 value)
{
	return (value >> 4) * 10 + (value & 0x0f);
}

static bool uip(void)
{
	return cmos_read(RTC_FREQ_SELECT) & RTC_UIP;
}

/* Polls register A (the index stays selected: one exit a poll); true if UIP was seen set. */
static bool uip_seen(void)
{
	u64 deadline = tsc_deadline(UIP_POLL_US);
	u64 polls = 0;

	outb(CMOS_INDEX, RTC_FREQ_SELECT);
	while (!tsc_passed(deadline)) {
		polls++;
		if (inb(CMOS_DATA) & RTC_UIP) {
			print("rtc: UIP seen set after %lu polls of register A\n", polls);
			return true;
		}
	}
	print("rtc: UIP never set in %lu polls of register A\n", polls);
	return false;
}

static bool wait_uip_clear(void)
{
	u64 deadline = tsc_deadline(UIP_CLEAR_US);

	while (uip())
		if (tsc_passed(deadline))
			return false;
	return true;
}

/* The time registers, in the order they are read: seconds first, checked again after. */
static const u8 time_regs[] = {RTC_SECONDS,	 RTC_MINUTES, RTC_HOURS,  RTC_DAY_OF_MONTH,
			       RTC_MONTH,	 RTC_YEAR,    RTC_CENTURY};

/* The time registers in the data mode register B gives; false if no read was consistent. */
static bool read_time(bool binary, struct rtc_time *t)
{
	u32 v[ARRAY_SIZE(time_regs)];

	for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
		if (!wait_uip_clear())
			continue;
		u8 raw[ARRAY_SIZE(time_regs)];
		for (size_t i = 0; i < ARRAY_SIZE(time_regs); i++)
			raw[i] = cmos_read(time_regs[i]);
		if (uip() || cmos_read(RTC_SECONDS) != raw[0])
			continue; /* an update may have come in between: read again */
		for (size_t i = 0; i < ARRAY_SIZE(time_regs); i++)
			v[i] = binary ? raw[i] : from_bcd(raw[i]);
		*t = (struct rtc_time){.year = v[6] * 100 + v[5], .month = v[4], .day = v[3],
				       .hour = v[2], .minute = v[1], .second = v[0]};
		return true;
	}
	return false;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant, "chrono-Compatible
 * Low-Level Date Algorithms", days_from_civil). */
static int64_t days_from_civil(int64_t y, u32 m, u32 d)
{
	y -= m <= 2;
	int64_t era = (y >= 0 ? y : y - 399) / 400;
	u32 yoe = (u32)(y - era * 400);
	u32 doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	u32 doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t)doe - 719468;
}

static u64 epoch_seconds(const struct rtc_time *t)
{
	int64_t days = days_from_civil(t->year, t->month, t->day);
	return (u64)(days * 86400 + t->hour * 3600 + t->minute * 60 + t->second);
}

static u64 report(const char *what, const struct rtc_time *t)
{
	u64 epoch = epoch_seconds(t);

	print("rtc: %s %04u-%02u-%02uT%02u:%02u:%02uZ epoch=%lu\n", what, t->year, t->month,
	      t->day, t->hour, t->minute, t->second, epoch);
	return epoch;
}

/* Reads the time in one data mode and prints it; ends the VM if no read was consistent. */
static u64 read_and_report(const char *what, bool binary)
{
	struct rtc_time t;

	if (!read_time(binary, &t)) {
		print("rtc: no consistent %s read in %u attempts\n", what, READ_ATTEMPTS);
		debug_exit(EXIT_NO_READ);
	}
	return report(what, &t);
}

/* Waits (bounded) for the seconds register to move on from `second`. */
static bool wait_next_second(u8 second)
{
	u64 deadline = tsc_deadline(TICK_WAIT_US);

	while (!tsc_passed(deadline))
		if (!uip() && cmos_read(RTC_SECONDS) != second)
			return true;
	return false;
}

NORETURN void guest_main(const void *boot_params)
{
	(void)boot_params;
	serial_init();

	u8 valid = cmos_read(RTC_VALID);
	print("rtc: register D 0x%02x\n", valid);
	if (valid != RTC_VRT)
		debug_exit(EXIT_NOT_VALID);
	if (!uip_seen())
		debug_exit(EXIT_NO_UIP);

	cmos_write(RTC_CONTROL, RTC_24H);
	read_and_report("bcd", false);
	cmos_write(RTC_CONTROL, RTC_24H | RTC_DM_BINARY);
	u64 before = read_and_report("binary", true);

	if (!wait_next_second(cmos_read(RTC_SECONDS))) {
		print("rtc: the seconds did not move in %u us\n", TICK_WAIT_US);
		debug_exit(EXIT_NO_TICK);
	}
	u64 after = read_and_report("later", true);
	cmos_write(RTC_CONTROL, RTC_24H);
	if (after - before < 1 || after - before > 2) {
		print("rtc: the later read is %ld s after the one before\n", (long)(after - before));
		debug_exit(EXIT_NO_TICK);
	}
	print("rtc: done\n");
	debug_exit(EXIT_PASSED);
}
