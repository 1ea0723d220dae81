/* Entering CPL3 (user mode) once, for code that must run natively: on a PVM host only CPL0 code
 * is emulated.  There is no way back to CPL0 (no interrupt or exception reaches the guest), so
 * the CPL3 code ends the VM itself, through the debug-exit port. */
#pragma once

#include "types.h"

typedef void (*cpl3_fn)(void *arg);

/* Loads a GDT with user segments and a 64-bit TSS, switches to page tables that identity-map
 * the first 4 GiB with the U/S bit set, clears CR4.TSD/SMEP/SMAP, and irets to fn(arg) at CPL3
 * with interrupts off, on a stack of its own.  If fn returns, the guest ends with EXIT_STUCK.
 *
 * Port I/O is allowed at CPL3 twice over: RFLAGS.IOPL = 3, and the TSS carries an I/O
 * permission bitmap that allows every port.  The bitmap is what counts on a PVM host, which
 * forces IOPL to 0 in user mode and checks the bitmap when it emulates the IN or OUT. */
NORETURN void cpl3_enter(cpl3_fn fn, void *arg);
