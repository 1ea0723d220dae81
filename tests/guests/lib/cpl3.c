/* Segment descriptors: Intel SDM Vol. 3A, "Segment Descriptors" and "Segment Descriptor Tables"
 * (code segments in 64-bit mode: L = 1, D = 0).  TSS: "Task Management in 64-bit Mode".
 * Paging: "4-Level Paging", 2 MiB pages through PDEs with PS = 1. */
#include "cpl3.h"

#include "cpl3_selectors.h"
#include "exit.h"

/* Access byte: P | DPL | S | type.  Flags nibble: G, D/B, L. */
#define DESC_P 0x80
#define DESC_DPL3 0x60
#define DESC_S 0x10
#define DESC_CODE_XR 0x0a   /* execute/read */
#define DESC_DATA_RW 0x02   /* read/write */
#define DESC_TSS64_AVAIL 0x09
#define DESC_G 0x8          /* limit in 4 KiB units */
#define DESC_DB 0x4
#define DESC_L 0x2          /* 64-bit code */

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_US 0x004        /* user-accessible */
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080        /* in a PDE: maps a 2 MiB page */
#define PAGE_2M (1ull << 21)
#define GIB (1ull << 30)
#define MAPPED_GIB 4
/* The top GiB below 4 GiB holds the PC's MMIO (LAPIC, IOAPIC, PCI BARs): map it uncached. */
#define MMIO_GIB 3

#define CR4_TSD (1ul << 2)   /* RDTSC only at CPL0 */
#define CR4_SMEP (1ul << 20) /* no CPL0 execution from user pages */
#define CR4_SMAP (1ul << 21) /* no CPL0 data access to user pages */

#define KERNEL_STACK_SIZE 4096
#define USER_STACK_SIZE 16384

#define IO_PORTS 65536

/* 64-bit TSS followed by its I/O permission bitmap (SDM Vol. 1, "I/O Permission Bit Map"):
 * one bit per port, 0 = allowed, then a byte of all ones. */
struct tss64 {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	u8 iomap[IO_PORTS / 8];
	u8 iomap_end;
} PACKED;

struct table_ptr {
	u16 limit;
	u64 base;
} PACKED;

static u64 gdt[GDT_ENTRIES] ALIGNED(16);
static struct tss64 tss ALIGNED(16);
static u64 pml4[512] ALIGNED(4096);
static u64 pdpt[512] ALIGNED(4096);
static u64 pd[MAPPED_GIB][512] ALIGNED(4096);
static u8 kernel_stack[KERNEL_STACK_SIZE] ALIGNED(16);
static u8 user_stack[USER_STACK_SIZE] ALIGNED(16);

/* cpl3_entry.S */
NORETURN void cpl3_switch(const struct table_ptr *gdtr, u64 cr3, u64 user_rsp, cpl3_fn fn,
			  void *arg);

static u64 segment(u8 access, u8 flags)
{
	/* base 0, limit 0xfffff (ignored for code/data in 64-bit mode) */
	return 0xffffull | (u64)access << 40 | 0xfull << 48 | (u64)flags << 52;
}

static void build_gdt(void)
{
	u64 base = (u64)(uintptr_t)&tss, limit = sizeof(tss) - 1;

	gdt[KERNEL_CS >> 3] = segment(DESC_P | DESC_S | DESC_CODE_XR, DESC_G | DESC_L);
	gdt[KERNEL_DS >> 3] = segment(DESC_P | DESC_S | DESC_DATA_RW, DESC_G | DESC_DB);
	gdt[USER_CS >> 3] = segment(DESC_P | DESC_DPL3 | DESC_S | DESC_CODE_XR, DESC_G | DESC_L);
	gdt[USER_DS >> 3] = segment(DESC_P | DESC_DPL3 | DESC_S | DESC_DATA_RW, DESC_G | DESC_DB);
	/* A 64-bit TSS descriptor takes two slots; the second holds base bits 63:32. */
	gdt[TSS_SEL >> 3] = (limit & 0xffff) | (base & 0xffffff) << 16 |
			    (u64)(DESC_P | DESC_TSS64_AVAIL) << 40 | ((limit >> 16) & 0xf) << 48 |
			    ((base >> 24) & 0xff) << 56;
	gdt[(TSS_SEL >> 3) + 1] = base >> 32;

	tss.rsp[0] = (u64)(uintptr_t)(kernel_stack + sizeof(kernel_stack));
	tss.iomap_base = offsetof(struct tss64, iomap);
	tss.iomap_end = 0xff; /* iomap[] is .bss: all ports allowed */
}

static void build_page_tables(void)
{
	pml4[0] = (u64)(uintptr_t)pdpt | PTE_P | PTE_RW | PTE_US;
	for (u64 g = 0; g < MAPPED_GIB; g++) {
		u64 cache = g == MMIO_GIB ? PTE_PCD | PTE_PWT : 0;
		pdpt[g] = (u64)(uintptr_t)pd[g] | PTE_P | PTE_RW | PTE_US;
		for (u64 i = 0; i < 512; i++)
			pd[g][i] = (g * GIB + i * PAGE_2M) | PTE_P | PTE_RW | PTE_US | PTE_PS | cache;
	}
}

static void clear_cr4_bits(u64 bits)
{
	u64 cr4;
	asm volatile("mov %%cr4, %0" : "=r"(cr4));
	if (cr4 & bits)
		asm volatile("mov %0, %%cr4" : : "r"(cr4 & ~bits) : "memory");
}

NORETURN void cpl3_enter(cpl3_fn fn, void *arg)
{
	struct table_ptr gdtr;

	build_gdt();
	build_page_tables();
	/* Code and stack are on user pages from now on: CPL0 must be allowed to touch them. */
	clear_cr4_bits(CR4_TSD | CR4_SMEP | CR4_SMAP);
	gdtr = (struct table_ptr){ .limit = sizeof(gdt) - 1, .base = (u64)(uintptr_t)gdt };
	cpl3_switch(&gdtr, (u64)(uintptr_t)pml4, (u64)(uintptr_t)(user_stack + sizeof(user_stack)),
		    fn, arg);
}

/* Called (at CPL3) if the CPL3 function returns. */
NORETURN void cpl3_returned(void);
NORETURN void cpl3_returned(void)
{
	guest_stuck("cpl3: the user-mode function returned");
}
