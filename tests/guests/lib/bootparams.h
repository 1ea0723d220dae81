/* Reading `struct boot_params` (the "zero page") handed over in RSI by the 64-bit entry.
 * Offsets from Linux Documentation/arch/x86/zero-page.rst and boot.rst. */
#pragma once

#include "types.h"

#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: bits 63:32 of the command line address */
#define BP_E820_ENTRIES 0x1e8     /* u8: number of entries in e820_table */
#define BP_CMD_LINE_PTR 0x228     /* u32: hdr.cmd_line_ptr, bits 31:0 */
#define BP_E820_TABLE 0x2d0       /* struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE] */
#define E820_MAX_ENTRIES_ZEROPAGE 128

/* The command line may be up to this long (Linux's default COMMAND_LINE_SIZE). */
#define CMDLINE_MAX 4096

/* struct boot_e820_entry: 20 bytes, packed. */
struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} PACKED;

/* The NUL-terminated command line, or "" when there is none (or it lies outside the first
 * 4 GiB, the only memory the entry contract maps). */
const char *bp_cmdline(const void *bp);
/* e820_entries, clamped to the table's capacity. */
unsigned bp_e820_count(const void *bp);
struct e820_entry bp_e820_entry(const void *bp, unsigned index);

#define E820_RAM 1
/* True if [start, end) lies inside one e820 RAM entry. */
bool bp_e820_ram_covers(const void *bp, u64 start, u64 end);
/* The end of the highest e820 RAM entry that starts below 4 GiB (capped at 4 GiB); 0 if none. */
u64 bp_e820_low_ram_end(const void *bp);
