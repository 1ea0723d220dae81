/* The boot_params a firmware payload hands to guest_main, in place of a VMM's ELF loader:
 * the command line is "assign=1 " (nobody else assigns BARs under `qemu -bios`), then the
 * guest's fw_default_cmdline, then QEMU's fw_cfg file "opt/splitvmm/cmdline" if there is one
 * (`-fw_cfg name=opt/splitvmm/cmdline,string=...`; later words win).  The e820 map is
 * [0, 0x9fc00) and [1 MiB, RAM size) from fw_cfg's RAM size (capped at 3 GiB), or empty when
 * there is no fw_cfg.  fw_cfg: QEMU docs/specs/fw_cfg.rst, the I/O port interface (selector
 * 0x510, 16-bit write; data 0x511, byte reads). */
#include "bootparams.h"
#include "io.h"
#include "string.h"

#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_RAM_SIZE 0x0003
#define FW_CFG_FILE_DIR 0x0019
#define FW_CFG_NAME_LEN 56
#define FW_CFG_MAX_FILES 128
#define CMDLINE_FILE "opt/splitvmm/cmdline"
#define CMDLINE_BUF 1024
#define BASE_RAM_END 0x9fc00ull
#define HIGH_RAM_START 0x100000ull
#define RAM_CAP (3ull << 30) /* the PCI hole starts here (guests assume so) */

extern const char fw_default_cmdline[]; /* each guest's, e.g. "mode=bench" */
NORETURN void guest_main(const void *boot_params);
NORETURN void fw_main(void);

static void fw_cfg_read(void *dst, u32 n)
{
	u8 *p = dst;
	while (n--)
		*p++ = inb(FW_CFG_PORT_DATA);
}

static u32 be32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

static bool fw_cfg_present(void)
{
	char sig[4];
	outw(FW_CFG_PORT_SEL, FW_CFG_SIGNATURE);
	fw_cfg_read(sig, 4);
	return memcmp(sig, "QEMU", 4) == 0;
}

/* Appends the cmdline file's contents at `out` (at most `room` bytes). */
static size_t fw_cfg_cmdline(char *out, size_t room)
{
	u8 count[4], entry[8 + FW_CFG_NAME_LEN];
	outw(FW_CFG_PORT_SEL, FW_CFG_FILE_DIR);
	fw_cfg_read(count, 4);
	u32 n = be32(count);
	for (u32 i = 0; i < n && i < FW_CFG_MAX_FILES; i++) {
		fw_cfg_read(entry, sizeof(entry)); /* be32 size, be16 select, u16, name[56] */
		if (strnlen((const char *)entry + 8, FW_CFG_NAME_LEN) != strlen(CMDLINE_FILE) ||
		    memcmp(entry + 8, CMDLINE_FILE, strlen(CMDLINE_FILE)) != 0)
			continue;
		u32 size = be32(entry);
		if (size > room)
			size = (u32)room;
		outw(FW_CFG_PORT_SEL, (u16)(entry[4] << 8 | entry[5]));
		fw_cfg_read(out, size);
		return size;
	}
	return 0;
}

static void add_e820(u8 *bp, u64 addr, u64 size)
{
	struct e820_entry e = { .addr = addr, .size = size, .type = E820_RAM };
	u8 n = bp[BP_E820_ENTRIES];
	memcpy(bp + BP_E820_TABLE + n * sizeof(e), &e, sizeof(e));
	bp[BP_E820_ENTRIES] = (u8)(n + 1);
}

NORETURN void fw_main(void)
{
	static u8 bp[4096] ALIGNED(16);
	static char cmdline[CMDLINE_BUF];
	size_t len = 0;

	memcpy(cmdline, "assign=1 ", 9);
	len = 9;
	size_t d = strlen(fw_default_cmdline);
	memcpy(cmdline + len, fw_default_cmdline, d);
	len += d;
	cmdline[len++] = ' ';
	if (fw_cfg_present()) {
		len += fw_cfg_cmdline(cmdline + len, sizeof(cmdline) - 1 - len);
		u64 ram;
		outw(FW_CFG_PORT_SEL, FW_CFG_RAM_SIZE);
		fw_cfg_read(&ram, sizeof(ram));
		if (ram > RAM_CAP)
			ram = RAM_CAP;
		add_e820(bp, 0, BASE_RAM_END);
		if (ram > HIGH_RAM_START)
			add_e820(bp, HIGH_RAM_START, ram - HIGH_RAM_START);
	}
	cmdline[len] = 0;
	u32 ptr = (u32)(uintptr_t)cmdline;
	memcpy(bp + BP_CMD_LINE_PTR, &ptr, sizeof(ptr));
	guest_main(bp);
}
