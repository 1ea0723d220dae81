/* Port I/O, MMIO, CPUID and TSC access.  Port I/O works at CPL0 and, with RFLAGS.IOPL = 3,
 * at CPL3 too (Intel SDM Vol. 1, 19.5.1 "I/O Privilege Level"). */
#pragma once

#include "types.h"

static inline void outb(u16 port, u8 value)
{
	asm volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(u16 port, u32 value)
{
	asm volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(u16 port, u16 value)
{
	asm volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline u16 inw(u16 port)
{
	u16 value;
	asm volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u32 inl(u16 port)
{
	u32 value;
	asm volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u8 inb(u16 port)
{
	u8 value;
	asm volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* Device registers are accessed with one plain `mov` of the register's width. */
static inline u32 mmio_read32(uintptr_t addr)
{
	return *(volatile u32 *)phys_ptr(addr);
}

static inline void mmio_write32(uintptr_t addr, u32 value)
{
	*(volatile u32 *)phys_ptr(addr) = value;
}

static inline u8 mmio_read8(uintptr_t addr)
{
	return *(volatile u8 *)phys_ptr(addr);
}

static inline u16 mmio_read16(uintptr_t addr)
{
	return *(volatile u16 *)phys_ptr(addr);
}

static inline void mmio_write8(uintptr_t addr, u8 value)
{
	*(volatile u8 *)phys_ptr(addr) = value;
}

static inline void mmio_write16(uintptr_t addr, u16 value)
{
	*(volatile u16 *)phys_ptr(addr) = value;
}

/* Time-stamp counter (SDM Vol. 2B, RDTSC).  Needs CR4.TSD = 0 at CPL3. */
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

struct cpuid_regs {
	u32 eax, ebx, ecx, edx;
};

static inline struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
	struct cpuid_regs r;
	asm volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
		     : "a"(leaf), "c"(subleaf));
	return r;
}

/* Stop the compiler from caching memory across a polling loop. */
static inline void barrier(void)
{
	asm volatile("" : : : "memory");
}

/* A full memory barrier (store-load ordering too), the way Linux's x86 smp_mb() does it: a
 * locked add to the stack, which every x86 CPU and KVM's emulator run (no SSE2 `mfence`). */
static inline void full_barrier(void)
{
	asm volatile("lock addl $0, -4(%%rsp)" : : : "memory", "cc");
}
