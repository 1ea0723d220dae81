/* counter: the snapshot/restore test guest.  Switches to CPL3 once (native speed on a PVM host)
 * and counts for ever in `counter`, a 64-bit global in .bss, printing "count=<value>" every
 * `period` increments.  A VM snapshotted while it counts and restored elsewhere must go on from
 * the saved count.  Command line: period=N (default 200000, at least 1), limit=M (default 0 =
 * for ever; else print "counter: done" when the count reaches M and end with debug-exit value 0,
 * host status 1), check=1 (each line also carries a checksum of a 64 KiB buffer refilled every
 * period from the count, so that RAM contents, not only registers, are shown to come back).
 * A bad command line ends with value 2 (host status 5).  README.md defines the lines exactly. */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "print.h"
#include "serial.h"

#define DEFAULT_PERIOD 200000
#define DEFAULT_LIMIT 0 /* count for ever */
#define EXIT_DONE 0
#define EXIT_BAD_ARGS 2

/* The check buffer: CHECK_WORDS 64-bit words, CHECK_WORDS * 8 = 64 KiB. */
#define CHECK_WORDS 8192
#define PATTERN_MUL 0x9e3779b97f4a7c15ull /* 2^64 / golden ratio, odd */
#define FNV64_PRIME 0x100000001b3ull

/* The count.  Global and volatile: it lives in guest RAM (symbol `counter`, identity-mapped, so
 * `nm` gives its guest-physical address) and every increment is a load and a store. */
volatile u64 counter;
/* Filled by fill_check(v) at every line, summed at the next one (symbol `check_buf`). */
u64 check_buf[CHECK_WORDS] ALIGNED(4096);

NORETURN void guest_main(const void *boot_params);

/* Word i of the buffer for count v: x = (v * 8192 + i + 1) * PATTERN_MUL mod 2^64, then
 * x ^ (x >> 31).  Distinct (v, i) give distinct x (for v < 2^51), and x is never 0. */
static u64 pattern_word(u64 v, u64 i)
{
	u64 x = (v * CHECK_WORDS + i + 1) * PATTERN_MUL;
	return x ^ (x >> 31);
}

static void fill_check(u64 v)
{
	for (u64 i = 0; i < CHECK_WORDS; i++)
		check_buf[i] = pattern_word(v, i);
}

/* FNV-1a over 64-bit words (not bytes): h = 0; h = (h ^ word) * FNV64_PRIME mod 2^64. */
static u64 sum_check(void)
{
	u64 h = 0;
	for (u64 i = 0; i < CHECK_WORDS; i++)
		h = (h ^ check_buf[i]) * FNV64_PRIME;
	return h;
}

/* Appends v to *p in decimal (or as 16 zero-padded hex digits) and advances *p. */
static void put_dec(char **p, u64 v)
{
	char digits[20];
	unsigned n = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*(*p)++ = digits[--n];
}

static void put_hex16(char **p, u64 v)
{
	for (int shift = 60; shift >= 0; shift -= 4)
		*(*p)++ = "0123456789abcdef"[(v >> shift) & 0xf];
}

static void put_str(char **p, const char *s)
{
	while (*s)
		*(*p)++ = *s++;
}

/* One output line, formatted first and then written in one go: "count=<v>\n", or with check
 * "count=<v> sum=<16 hex digits>\n" where the sum covers the buffer as the previous line (or,
 * for the first line, the start) left it, i.e. filled from v - period; then refills it from v. */
static void report(u64 v, bool check)
{
	char line[64], *p = line;

	put_str(&p, "count=");
	put_dec(&p, v);
	if (check) {
		put_str(&p, " sum=");
		put_hex16(&p, sum_check());
		fill_check(v);
	}
	*p++ = '\n';
	serial_write(line, (size_t)(p - line));
}

/* Runs at CPL3. */
static NORETURN void count(void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);

	serial_init();
	u64 period = cmdline_u64(cmdline, "period", DEFAULT_PERIOD);
	u64 limit = cmdline_u64(cmdline, "limit", DEFAULT_LIMIT);
	bool check = cmdline_u64(cmdline, "check", 0) != 0;
	if (period == 0) {
		print("counter: need period >= 1\n");
		debug_exit(EXIT_BAD_ARGS);
	}
	print("counter: period=%lu limit=%lu check=%u\n", period, limit, check ? 1 : 0);
	if (check)
		fill_check(0);

	u64 left = period;
	for (;;) {
		u64 v = counter + 1;
		counter = v;
		if (--left == 0) {
			left = period;
			report(v, check);
		}
		if (v == limit) {
			print("counter: done\n");
			debug_exit(EXIT_DONE);
		}
	}
}

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(count, (void *)boot_params);
}
