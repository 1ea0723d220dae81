/* Local APIC in xAPIC (MMIO) mode: the ID register and sending IPIs through the ICR.
 * Intel SDM Vol. 3A, chapter 11 "Advanced Programmable Interrupt Controller (APIC)";
 * names as in Linux arch/x86/include/asm/apicdef.h. */
#pragma once

#include "types.h"

#define APIC_ID 0x020       /* local APIC ID register; ID in bits 31:24 */
#define APIC_SPIV 0x0f0     /* spurious-interrupt vector register */
#define APIC_ICR 0x300      /* interrupt command register, bits 31:0 (writing sends) */
#define APIC_ICR2 0x310     /* interrupt command register, bits 63:32 (destination) */

#define APIC_SPIV_APIC_ENABLED 0x100
#define APIC_SPIV_VECTOR 0xff
#define APIC_DEST_SHIFT 24        /* in ICR2: physical destination APIC ID */
#define APIC_ICR_BUSY 0x1000      /* delivery status: 1 = send pending */
#define APIC_INT_ASSERT 0x4000    /* level: assert */
#define APIC_DM_NMI 0x400         /* delivery mode NMI (the vector field is ignored) */
#define APIC_DM_INIT 0x500        /* delivery mode INIT */
#define APIC_DM_STARTUP 0x600     /* delivery mode start-up; vector = start page number */

u8 lapic_id(uintptr_t base);
/* Sets the APIC software-enable bit in the SVR (SDM 11.4.3, "Enabling or Disabling the Local
 * APIC"). */
void lapic_enable(uintptr_t base);
/* Sends one IPI to physical APIC ID `dest` and waits (bounded) for delivery status to clear.
 * Returns false if it stayed "send pending". */
bool lapic_send_ipi(uintptr_t base, u8 dest, u32 icr_low);
