/* pio-loop: the port-I/O exit benchmark.  Switches to CPL3 once (CPL3 code runs natively
 * here, CPL0 code is emulated) and times, with the TSC, `count` single-byte reads of `port`,
 * then `count` writes, then `count` empty rdtsc pairs (the floor).  Command line:
 * count=N (default 10000, at most MAX_COUNT), port=P (default 0x3ff, the 8250 scratch
 * register) and in_port=Q (the port the reads go to, default P: a VMM may answer reads of
 * one register itself and forward those of another).  Prints median and p99 in TSC ticks, then "pio-loop: done", and ends with
 * debug-exit value 0 (host status 1).  A bad command line ends with value 2 (host status 5). */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "print.h"
#include "serial.h"
#include "sort.h"

#define DEFAULT_COUNT 10000
#define MAX_COUNT 100000
#define DEFAULT_PORT 0x3ff /* COM1 + UART_SCR */
#define EXIT_DONE 0
#define EXIT_BAD_ARGS 2

enum probe { PROBE_IN, PROBE_OUT, PROBE_RDTSC };

static u64 samples[MAX_COUNT];

NORETURN void guest_main(const void *boot_params);

/* One timed access: rdtsc; <access>; rdtsc.  Only register moves sit between the access
 * and the two reads of the TSC.  The outputs are early-clobbered so that no input is put in a
 * register the first rdtsc overwrites. */
static u64 time_one(enum probe probe, u16 port, u8 value)
{
	u32 lo0, hi0, lo1, hi1;

	switch (probe) {
	case PROBE_IN:
		asm volatile("rdtsc\n\tmov %%eax, %0\n\tmov %%edx, %1\n\t"
			     "mov %w4, %%dx\n\tinb %%dx, %%al\n\trdtsc"
			     : "=&r"(lo0), "=&r"(hi0), "=&a"(lo1), "=&d"(hi1)
			     : "r"(port));
		break;
	case PROBE_OUT:
		asm volatile("rdtsc\n\tmov %%eax, %0\n\tmov %%edx, %1\n\t"
			     "mov %w4, %%dx\n\tmov %b5, %%al\n\toutb %%al, %%dx\n\trdtsc"
			     : "=&r"(lo0), "=&r"(hi0), "=&a"(lo1), "=&d"(hi1)
			     : "r"(port), "r"(value));
		break;
	default:
		asm volatile("rdtsc\n\tmov %%eax, %0\n\tmov %%edx, %1\n\trdtsc"
			     : "=&r"(lo0), "=&r"(hi0), "=&a"(lo1), "=&d"(hi1));
		break;
	}
	return ((u64)hi1 << 32 | lo1) - ((u64)hi0 << 32 | lo0);
}

static void measure(const char *name, enum probe probe, u16 port, size_t count)
{
	for (size_t i = 0; i < count; i++)
		samples[i] = time_one(probe, port, (u8)i);
	sort_u64(samples, count);
	print("pio-loop: %s median=%lu p99=%lu\n", name, percentile_u64(samples, count, 50),
	      percentile_u64(samples, count, 99));
}

/* Runs at CPL3. */
static NORETURN void bench(void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);

	serial_init();
	u64 count = cmdline_u64(cmdline, "count", DEFAULT_COUNT);
	u64 port = cmdline_u64(cmdline, "port", DEFAULT_PORT);
	u64 in_port = cmdline_u64(cmdline, "in_port", port);
	if (count == 0 || count > MAX_COUNT || port > 0xffff || in_port > 0xffff) {
		print("pio-loop: need 1 <= count <= %u and ports <= 0xffff\n", MAX_COUNT);
		debug_exit(EXIT_BAD_ARGS);
	}
	print("pio-loop: count=%lu port=%#lx in_port=%#lx\n", count, port, in_port);
	measure("in", PROBE_IN, (u16)in_port, count);
	measure("out", PROBE_OUT, (u16)port, count);
	measure("rdtsc", PROBE_RDTSC, (u16)port, count);
	print("pio-loop: done\n");
	debug_exit(EXIT_DONE);
}

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(bench, (void *)boot_params);
}
