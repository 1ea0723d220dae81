/* Ending the VM: QEMU isa-debug-exit semantics at port 0xf4, and the i8042 reset line. */
#pragma once

#include "types.h"

#define DEBUG_EXIT_PORT 0xf4
/* Written to the debug-exit port when a guest cannot end the way it meant to (host status 255). */
#define EXIT_STUCK 0x7f

/* Writing V ends the VM with host exit status (V << 1) | 1. */
NORETURN void debug_exit(u8 value);
NORETURN void debug_exit32(u32 value);
/* Pulses the CPU reset line through the keyboard controller: the VM ends with status 0. */
NORETURN void i8042_reset(void);
NORETURN void cf9_reset(void); /* through the reset control register at 0xCF9 */
/* Prints "<why>" and ends through the debug-exit port with EXIT_STUCK. */
NORETURN void guest_stuck(const char *why);
