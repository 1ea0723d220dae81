/* Fixed-width types and attributes shared by every test guest (freestanding: only the
 * compiler's own <stdint.h>, <stddef.h>, <stdbool.h>, <stdarg.h> are available). */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define NORETURN __attribute__((noreturn))
#define PACKED __attribute__((packed))
#define ALIGNED(n) __attribute__((aligned(n)))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* A pointer to guest-physical address `addr` (the guest runs identity-mapped).  The empty asm
 * hides the constant from the optimiser, which would otherwise treat low addresses such as
 * 0x40e as out-of-bounds or null dereferences. */
static inline void *phys_ptr(uintptr_t addr)
{
	asm("" : "+r"(addr));
	return (void *)addr;
}
