/* mmio-sweep: reads the whole 32-bit PCI hole, one 4-byte MMIO read every `stride` bytes, to
 * show that a guest touching many distinct unclaimed addresses cannot grow the VMM's memory.
 * Switches to CPL3 once (CPL3 code runs natively on a PVM host; each read still exits to the
 * VMM) and sweeps [end of the RAM below 4 GiB, 4 GiB).  Command line: stride=N (default
 * 0x8000, a multiple of 4 KiB).  Prints a line after each eighth of the sweep and one at the
 * end, then spins for ever at CPL3 on `pause`, printing nothing more, until the host ends the
 * VM.  A bad stride ends with debug-exit value 2 (host status 5). */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "io.h"
#include "print.h"
#include "serial.h"

#define PAGE_SIZE 4096ul
#define FOUR_GIB (1ul << 32)
#define DEFAULT_STRIDE 0x8000ul
#define E820_RAM 1
#define PARTS 8
#define ALL_ONES 0xffffffffu
#define EXIT_BAD_ARGS 2

NORETURN void guest_main(const void *boot_params);

/* The end of the highest RAM range that lies below 4 GiB: the PCI hole starts there. */
static u64 low_ram_end(const void *boot_params)
{
	unsigned n = bp_e820_count(boot_params);
	u64 end = 0;
	for (unsigned i = 0; i < n; i++) {
		struct e820_entry e = bp_e820_entry(boot_params, i);
		u64 top = e.addr + e.size;
		if (e.type == E820_RAM && top <= FOUR_GIB && top > end)
			end = top;
	}
	return end;
}

/* Reads [start, end) every `stride` bytes; returns how many reads gave all-ones. */
static u64 sweep(u64 start, u64 end, u64 stride, u64 *reads)
{
	u64 all_ones = 0, count = (end - start) / stride;
	unsigned parts_done = 0;
	for (u64 i = 0; i < count; i++) {
		if (mmio_read32(start + i * stride) == ALL_ONES)
			all_ones++;
		if ((i + 1) * PARTS >= count * (parts_done + 1))
			print("mmio-sweep: %u/%u\n", ++parts_done, PARTS);
	}
	*reads = count;
	return all_ones;
}

/* Runs at CPL3. */
static NORETURN void run(void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);

	serial_init();
	u64 stride = cmdline_u64(cmdline, "stride", DEFAULT_STRIDE);
	if (stride == 0 || stride % PAGE_SIZE || stride >= FOUR_GIB) {
		print("mmio-sweep: need stride a non-zero multiple of %#lx below 4 GiB\n",
		      PAGE_SIZE);
		debug_exit(EXIT_BAD_ARGS);
	}
	u64 start = (low_ram_end(boot_params) + stride - 1) / stride * stride, reads;
	print("mmio-sweep: start=%#lx end=%#lx stride=%#lx\n", start, FOUR_GIB, stride);
	u64 all_ones = sweep(start, FOUR_GIB, stride, &reads);
	print("mmio-sweep: done reads=%lu all-ones=%lu\n", reads, all_ones);
	for (;;)
		asm volatile("pause" ::: "memory");
}

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(run, (void *)boot_params);
}
