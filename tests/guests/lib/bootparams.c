#include "bootparams.h"

#include "string.h"

#define FOUR_GIB (1ull << 32)

static u32 read_u32(const void *bp, size_t offset)
{
	u32 v;
	memcpy(&v, (const u8 *)bp + offset, sizeof(v));
	return v;
}

const char *bp_cmdline(const void *bp)
{
	u64 addr = read_u32(bp, BP_CMD_LINE_PTR) | (u64)read_u32(bp, BP_EXT_CMD_LINE_PTR) << 32;

	if (addr == 0 || addr >= FOUR_GIB)
		return "";
	return phys_ptr(addr);
}

unsigned bp_e820_count(const void *bp)
{
	unsigned n = ((const u8 *)bp)[BP_E820_ENTRIES];
	return n < E820_MAX_ENTRIES_ZEROPAGE ? n : E820_MAX_ENTRIES_ZEROPAGE;
}

struct e820_entry bp_e820_entry(const void *bp, unsigned index)
{
	struct e820_entry e;
	memcpy(&e, (const u8 *)bp + BP_E820_TABLE + index * sizeof(e), sizeof(e));
	return e;
}
