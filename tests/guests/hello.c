/* hello: the first guest to boot.  Prints a greeting, the command line and the e820 map from
 * struct boot_params, then ends through the i8042 reset (host exit status 0), or with
 * reset=cf9 through the reset control register at 0xCF9.  With rep=N it first moves N bytes
 * with string I/O (Intel SDM Vol. 2, INS/OUTS with the REP prefix): `rep insb` from port 0x80,
 * which no device claims (all-ones), printing how many bytes read 0xff, then N bytes of 'r' to
 * COM1's THR, a `rep outsb` of a FIFO's worth (16) each time THRE says the transmit FIFO is
 * empty, as a 16550 driver may (datasheet: with FIFOs on, THRE = the FIFO is empty). */
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
	u64 rep = cmdline_u64(cmdline, "rep", 0);
	if (rep) {
		static u8 buf[4096];
		u64 n = rep < sizeof(buf) ? rep : sizeof(buf), ones = 0;
		void *dst = buf;
		u64 left = n;
		asm volatile("rep insb" : "+D"(dst), "+c"(left) : "d"((u16)0x80) : "memory");
		for (u64 i = 0; i < n; i++)
			ones += buf[i] == 0xff;
		print("rep ins: %lu of %lu bytes read 0xff\n", ones, n);
		memset(buf, 'r', n);
		for (u64 sent = 0; sent < n; sent += UART_FIFO_SIZE) {
			const void *src = buf + sent;
			left = n - sent < UART_FIFO_SIZE ? n - sent : UART_FIFO_SIZE;
			serial_wait_thre();
			asm volatile("rep outsb"
				     : "+S"(src), "+c"(left)
				     : "d"((u16)COM1_PORT)
				     : "memory");
		}
		print("\nrep outs: done\n");
	}
	if (cmdline_is(cmdline, "reset", "cf9"))
		cf9_reset();
	i8042_reset();
}
