/* exit-status: ends through the debug-exit port with the status the command line asks for.
 * `status=N` (default 3) is written with outb, or with outl when `width=4` is given; the host
 * exits with (N << 1) | 1. */
#include "bootparams.h"
#include "cmdline.h"
#include "exit.h"
#include "print.h"
#include "serial.h"

#define DEFAULT_STATUS 3

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);

	serial_init();
	u64 status = cmdline_u64(cmdline, "status", DEFAULT_STATUS);
	u64 width = cmdline_u64(cmdline, "width", 1);
	if (width == 4) {
		print("exiting with %u\n", (u32)status);
		debug_exit32((u32)status);
	}
	print("exiting with %u\n", (u8)status); /* outb writes the low byte only */
	debug_exit((u8)status);
}
