/* hello: the first guest to boot.  Prints a greeting, the command line and the e820 map from
 * struct boot_params, then ends through the i8042 reset (host exit status 0), or with
 * reset=cf9 through the reset control register at 0xCF9. */
#include "bootparams.h"
#include "cmdline.h"
#include "exit.h"
#include "print.h"
#include "serial.h"
#include "string.h"

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	const char *cmdline = bp_cmdline(boot_params);
	unsigned entries = bp_e820_count(boot_params);

	serial_init();
	print("Hello from a splitvmm test guest!\n");
	print("cmdline: ");
	serial_write(cmdline, strnlen(cmdline, CMDLINE_MAX));
	print("\n");
	print("e820: %u entries\n", entries);
	for (unsigned i = 0; i < entries; i++) {
		struct e820_entry e = bp_e820_entry(boot_params, i);
		/* end is exclusive: addr + size */
		print("e820: %#018lx-%#018lx %u\n", e.addr, e.addr + e.size, e.type);
	}
	if (cmdline_is(cmdline, "reset", "cf9"))
		cf9_reset();
	i8042_reset();
}
