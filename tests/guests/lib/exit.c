#include "exit.h"

#include "io.h"
#include "print.h"

/* 8042 keyboard controller (IBM PC/AT Technical Reference; Linux arch/x86/kernel/reboot.c). */
#define I8042_STATUS_PORT 0x64  /* read: status register */
#define I8042_COMMAND_PORT 0x64 /* write: controller command */
#define I8042_STR_IBF 0x02      /* input buffer full: the controller has not taken the last byte */
#define I8042_CMD_PULSE_RESET 0xfe /* pulse output line 0 (the CPU reset line) low */
#define I8042_IBF_POLL_LIMIT 4096
/* The chipset's reset control register (Intel ICH RST_CNT, PIIX RCR; Linux reboot=pci). */
#define RST_CNT_PORT 0xcf9
#define RST_CNT_SYS_RST 0x02 /* a hard reset, once RST_CPU asks for one */
#define RST_CNT_RST_CPU 0x04 /* writing 1 starts the reset */

/* If the VM is still running after it should have ended, halt for good.  At CPL0 this parks
 * the vCPU; at CPL3 `hlt` faults, which (with no usable IDT) shuts the VM down. */
static NORETURN void halt_forever(void)
{
	for (;;)
		asm volatile("hlt");
}

NORETURN void guest_stuck(const char *why)
{
	print("%s\n", why);
	outb(DEBUG_EXIT_PORT, EXIT_STUCK);
	halt_forever();
}

NORETURN void debug_exit(u8 value)
{
	outb(DEBUG_EXIT_PORT, value);
	guest_stuck("guest: still running after the debug-exit write");
}

NORETURN void debug_exit32(u32 value)
{
	outl(DEBUG_EXIT_PORT, value);
	guest_stuck("guest: still running after the debug-exit write");
}

NORETURN void i8042_reset(void)
{
	/* Wait (bounded, as Linux's kb_wait) until the controller can take a command. */
	for (int i = 0; i < I8042_IBF_POLL_LIMIT; i++) {
		if (!(inb(I8042_STATUS_PORT) & I8042_STR_IBF))
			break;
	}
	outb(I8042_COMMAND_PORT, I8042_CMD_PULSE_RESET);
	guest_stuck("guest: still running after the i8042 reset command");
}

NORETURN void cf9_reset(void)
{
	/* As the datasheets say to: choose the reset's kind first, then start it. */
	u8 rst = inb(RST_CNT_PORT) & ~(RST_CNT_SYS_RST | RST_CNT_RST_CPU);
	outb(RST_CNT_PORT, rst | RST_CNT_SYS_RST);
	outb(RST_CNT_PORT, rst | RST_CNT_SYS_RST | RST_CNT_RST_CPU);
	guest_stuck("guest: still running after the reset control register's RST_CPU");
}
