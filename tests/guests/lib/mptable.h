/* Finding the processors through the Intel MultiProcessor Specification 1.4 tables. */
#pragma once

#include "types.h"

#define MP_MAX_CPUS 64

struct mp_cpu {
	u8 apic_id;
	bool bsp;
};

struct mp_info {
	uintptr_t floating_pointer; /* where "_MP_" was found */
	u32 lapic_addr;             /* MMIO base of the local APICs */
	unsigned ncpus;             /* enabled processors, BSP included */
	struct mp_cpu cpus[MP_MAX_CPUS];
};

/* Searches for the MP floating pointer and reads the processor entries of its configuration
 * table.  On failure prints why ("mptable: ...") and returns false. */
bool mp_find_cpus(struct mp_info *info);
