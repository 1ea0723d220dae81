#include "lapic.h"

#include "io.h"

#define ICR_BUSY_POLL_LIMIT 100000

u8 lapic_id(uintptr_t base)
{
	return (u8)(mmio_read32(base + APIC_ID) >> 24);
}

void lapic_enable(uintptr_t base)
{
	u32 svr = mmio_read32(base + APIC_SPIV);
	mmio_write32(base + APIC_SPIV, svr | APIC_SPIV_APIC_ENABLED | APIC_SPIV_VECTOR);
}

bool lapic_send_ipi(uintptr_t base, u8 dest, u32 icr_low)
{
	/* SDM 11.6.1: write the high half first; the write to the low half sends the IPI. */
	mmio_write32(base + APIC_ICR2, (u32)dest << APIC_DEST_SHIFT);
	mmio_write32(base + APIC_ICR, icr_low);
	for (int i = 0; i < ICR_BUSY_POLL_LIMIT; i++) {
		if (!(mmio_read32(base + APIC_ICR) & APIC_ICR_BUSY))
			return true;
	}
	return false;
}
