/* Intel MultiProcessor Specification, version 1.4 (May 1997).  Section numbers below are
 * that document's. */
#include "mptable.h"

#include "print.h"
#include "string.h"

#define BDA_EBDA_SEGMENT 0x40e   /* BIOS data area: EBDA segment (u16) */
#define BDA_BASE_MEM_KIB 0x413   /* BIOS data area: base memory size in KiB (u16) */
#define DEFAULT_BASE_MEM_KIB 640
#define BIOS_ROM_START 0xf0000
#define BIOS_ROM_END 0x100000

#define MPC_DEFAULT_LAPIC 0xfee00000 /* 3.6.1: local APICs of the default configurations */

/* 4.1 MP Floating Pointer Structure. */
struct mpf {
	char signature[4]; /* "_MP_" */
	u32 config_table;  /* physical address of the MP configuration table, 0 if none */
	u8 length;         /* in 16-byte paragraphs: 1 */
	u8 spec_rev;
	u8 checksum;       /* all bytes of the structure sum to 0 */
	u8 feature1;       /* nonzero: a default configuration (chapter 5), no table */
	u8 feature2;
	u8 reserved[3];
} PACKED;

/* 4.2 MP Configuration Table Header. */
struct mpc_header {
	char signature[4]; /* "PCMP" */
	u16 base_length;   /* bytes of header + base entries */
	u8 spec_rev;
	u8 checksum; /* the base table sums to 0 */
	char oem_id[8];
	char product_id[12];
	u32 oem_table;
	u16 oem_table_size;
	u16 entry_count;
	u32 lapic_addr;
	u16 ext_length;
	u8 ext_checksum;
	u8 reserved;
} PACKED;

/* 4.3 Base MP Configuration Table Entries. */
enum { MPC_PROCESSOR = 0, MPC_BUS, MPC_IOAPIC, MPC_IOINTR, MPC_LINTR };
#define MPC_PROCESSOR_SIZE 20
#define MPC_OTHER_SIZE 8

/* 4.3.1 Processor Entries. */
struct mpc_processor {
	u8 type;
	u8 apic_id;
	u8 apic_version;
	u8 flags; /* bit 0 EN: usable; bit 1 BP: the bootstrap processor */
	u32 signature;
	u32 features;
	u32 reserved[2];
} PACKED;
#define CPU_FLAG_EN 0x01
#define CPU_FLAG_BP 0x02

static u8 checksum(const u8 *p, size_t len)
{
	u8 sum = 0;
	while (len--)
		sum += *p++;
	return sum;
}

/* 4: the structure lies on a 16-byte boundary; its signature and checksum identify it. */
static const struct mpf *scan(uintptr_t start, size_t len)
{
	for (uintptr_t a = start; a + sizeof(struct mpf) <= start + len; a += 16) {
		const struct mpf *mpf = phys_ptr(a);
		if (memcmp(mpf->signature, "_MP_", 4) == 0 && mpf->length == 1 &&
		    checksum((const u8 *)mpf, sizeof(*mpf)) == 0)
			return mpf;
	}
	return NULL;
}

/* 4: a) first KiB of the EBDA, b) last KiB of base memory, c) the BIOS ROM F0000h-FFFFFh. */
static const struct mpf *find_floating_pointer(void)
{
	uintptr_t ebda = (uintptr_t)*(const u16 *)phys_ptr(BDA_EBDA_SEGMENT) << 4;
	unsigned base_kib = *(const u16 *)phys_ptr(BDA_BASE_MEM_KIB);
	const struct mpf *mpf = NULL;

	if (base_kib == 0 || base_kib > DEFAULT_BASE_MEM_KIB)
		base_kib = DEFAULT_BASE_MEM_KIB; /* BDA not filled in: assume a 640 KiB PC */
	if (ebda)
		mpf = scan(ebda, 1024);
	if (!mpf)
		mpf = scan((uintptr_t)(base_kib - 1) * 1024, 1024);
	if (!mpf)
		mpf = scan(BIOS_ROM_START, BIOS_ROM_END - BIOS_ROM_START);
	return mpf;
}

static bool add_cpu(struct mp_info *info, u8 apic_id, bool bsp)
{
	if (info->ncpus == MP_MAX_CPUS) {
		print("mptable: more than %d processors\n", MP_MAX_CPUS);
		return false;
	}
	info->cpus[info->ncpus++] = (struct mp_cpu){ .apic_id = apic_id, .bsp = bsp };
	return true;
}

/* Walks the base entries (4.3); stops at the first type it does not know the size of. */
static bool read_entries(const struct mpc_header *mpc, struct mp_info *info)
{
	const u8 *p = (const u8 *)(mpc + 1), *end = (const u8 *)mpc + mpc->base_length;

	for (unsigned i = 0; i < mpc->entry_count; i++) {
		size_t size = *p == MPC_PROCESSOR ? MPC_PROCESSOR_SIZE : MPC_OTHER_SIZE;
		if (*p > MPC_LINTR || p + size > end) {
			print("mptable: bad entry %u (type %u)\n", i, *p);
			return false;
		}
		const struct mpc_processor *cpu = (const void *)p;
		if (*p == MPC_PROCESSOR && (cpu->flags & CPU_FLAG_EN) &&
		    !add_cpu(info, cpu->apic_id, cpu->flags & CPU_FLAG_BP))
			return false;
		p += size;
	}
	return true;
}

static bool read_config_table(uintptr_t addr, struct mp_info *info)
{
	const struct mpc_header *mpc = phys_ptr(addr);

	if (memcmp(mpc->signature, "PCMP", 4) != 0) {
		print("mptable: no PCMP signature at %#x\n", (u32)addr);
		return false;
	}
	if (mpc->base_length < sizeof(*mpc) ||
	    checksum((const u8 *)mpc, mpc->base_length) != 0) {
		print("mptable: bad configuration table checksum or length\n");
		return false;
	}
	info->lapic_addr = mpc->lapic_addr;
	return read_entries(mpc, info);
}

bool mp_find_cpus(struct mp_info *info)
{
	const struct mpf *mpf = find_floating_pointer();

	*info = (struct mp_info){ 0 };
	if (!mpf) {
		print("mptable: no MP floating pointer structure found\n");
		return false;
	}
	info->floating_pointer = (uintptr_t)mpf;
	if (mpf->feature1 != 0) {
		/* 5: a default configuration has two processors, local APIC IDs 0 and 1. */
		info->lapic_addr = MPC_DEFAULT_LAPIC;
		return add_cpu(info, 0, true) && add_cpu(info, 1, false);
	}
	if (!read_config_table(mpf->config_table, info))
		return false;
	if (info->ncpus == 0) {
		print("mptable: no enabled processor entries\n");
		return false;
	}
	return true;
}
