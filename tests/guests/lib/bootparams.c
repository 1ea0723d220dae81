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

bool bp_e820_ram_covers(const void *bp, u64 start, u64 end)
{
	unsigned n = bp_e820_count(bp);
	for (unsigned i = 0; i < n; i++) {
		struct e820_entry e = bp_e820_entry(bp, i);
		if (e.type == E820_RAM && e.addr <= start && end - e.addr <= e.size)
			return true;
	}
	return false;
}

u64 bp_e820_low_ram_end(const void *bp)
{
	unsigned n = bp_e820_count(bp);
	u64 top = 0;
	for (unsigned i = 0; i < n; i++) {
		struct e820_entry e = bp_e820_entry(bp, i);
		u64 end = e.addr + e.size;
		if (e.type == E820_RAM && e.addr < FOUR_GIB && end > top)
			top = end < FOUR_GIB ? end : FOUR_GIB;
	}
	return top;
}
