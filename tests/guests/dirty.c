/* dirty: the snapshot benchmark guest.  Switches to CPL3 once (native speed on a PVM host),
 * fills [start, start + mib MiB) of RAM with a non-zero pattern (every 8-byte word, so every
 * 4 KiB page is dirty and none is all zeros), prints "dirty: <N> MiB written", then spins for
 * ever on `pause` at CPL3, printing nothing more, for a host to snapshot it.  Command line:
 * mib=N (default 0), start=ADDR (default 16 MiB, above the image and the boot structures),
 * sweep=S (instead of spinning, prints "dirty: sweeping" and then, for g = 1, 2, 3, ... for
 * ever, stores g into the first word of the range's last page, then into the first word of each
 * page of its first S MiB, lowest first: a copy taken at one instant holds g in the last page,
 * g in the first pages and g - 1 in the rest; S below mib, 0 to spin), rate=R with tsc_khz=K
 * (instead, prints "dirty: streaming" and rewrites the range a MiB at a time, the first word of
 * each of its pages, at most R MiB a second by the TSC at K kHz, for ever: a guest whose
 * writes move across its memory, for a live snapshot's passes to chase).
 * The range must be 4 KiB-aligned, start at or above 4 MiB, end at or below 3 GiB (the PCI
 * hole; the CPL3 page tables map RAM below it with write-back caching), and lie inside one RAM
 * entry of the e820 map; else the guest ends with debug-exit value 2 (host status 5).
 * The word at guest-physical address a holds (a + 1) * 0x9e3779b97f4a7c15 mod 2^64. */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "io.h"
#include "print.h"
#include "serial.h"

#define MIB (1ull << 20)
#define GIB (1ull << 30)
#define PAGE_SIZE 4096
#define DEFAULT_START (16 * MIB)
#define MIN_START (4 * MIB)     /* the image ends below 3 MiB (guest.ld, README.md) */
#define MAX_END (3 * GIB)       /* the 32-bit PCI hole starts here */
#define PATTERN_MUL 0x9e3779b97f4a7c15ull
#define EXIT_BAD_ARGS 2

NORETURN void guest_main(const void *boot_params);

/* Word at address a = (a + 1) * PATTERN_MUL: odd multiplier, so never 0 for a < 2^64 - 1, and
 * no two words of the range alike (no page can be deduplicated or stored as zeros). */
static void fill(u64 start, u64 end)
{
	volatile u64 *p = phys_ptr(start);
	u64 v = (start + 1) * PATTERN_MUL;
	for (u64 a = start; a < end; a += 8) {
		*p++ = v;
		v += 8 * PATTERN_MUL;
	}
}

/* Runs at CPL3. */
static NORETURN void dirty(void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);

	serial_init();
	u64 mib = cmdline_u64(cmdline, "mib", 0);
	u64 start = cmdline_u64(cmdline, "start", DEFAULT_START);
	if (start % PAGE_SIZE || start < MIN_START || start > MAX_END ||
	    mib > (MAX_END - start) / MIB) {
		print("dirty: need start 4 KiB-aligned, start >= %#lx, start + mib MiB <= %#lx\n",
		      (u64)MIN_START, (u64)MAX_END);
		debug_exit(EXIT_BAD_ARGS);
	}
	u64 end = start + mib * MIB;
	if (mib && !bp_e820_ram_covers(boot_params, start, end)) {
		print("dirty: %#lx-%#lx is not inside one e820 RAM range\n", start, end);
		debug_exit(EXIT_BAD_ARGS);
	}
	print("dirty: start=%#lx mib=%lu\n", start, mib);
	u64 t0 = rdtsc();
	fill(start, end);
	u64 t1 = rdtsc();
	print("dirty: took %lu tsc ticks\n", t1 - t0);
	print("dirty: %lu MiB written\n", mib);
	u64 sweep = cmdline_u64(cmdline, "sweep", 0);
	if (sweep && sweep >= mib) {
		print("dirty: need sweep < mib\n");
		debug_exit(EXIT_BAD_ARGS);
	}
	u64 rate = cmdline_u64(cmdline, "rate", 0);
	u64 tsc_khz = cmdline_u64(cmdline, "tsc_khz", 0);
	if (rate && (sweep || !mib || !tsc_khz)) {
		print("dirty: rate needs mib, tsc_khz and no sweep\n");
		debug_exit(EXIT_BAD_ARGS);
	}
	if (rate) {
		u64 per_mib = tsc_khz * 1000 / rate; /* TSC ticks between two MiB */
		u64 next = rdtsc();
		print("dirty: streaming\n");
		for (u64 g = 1;; g++) {
			for (u64 a = start; a < end; a += MIB) {
				u64 now;
				while ((now = rdtsc()) < next)
					asm volatile("pause" ::: "memory");
				for (u64 p = a; p < a + MIB; p += PAGE_SIZE)
					*(volatile u64 *)phys_ptr(p) = g;
				next = now + per_mib; /* late: no catching up in a burst */
			}
		}
	}
	if (sweep) {
		volatile u64 *generation = phys_ptr(end - PAGE_SIZE);
		print("dirty: sweeping\n");
		for (u64 g = 1;; g++) {
			*generation = g;
			for (u64 a = start; a < start + sweep * MIB; a += PAGE_SIZE)
				*(volatile u64 *)phys_ptr(a) = g;
		}
	}
	for (;;)
		asm volatile("pause" ::: "memory");
}

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(dirty, (void *)boot_params);
}
