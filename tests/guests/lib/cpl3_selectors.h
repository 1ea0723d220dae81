/* GDT layout used once the guest has switched to its own GDT (cpl3.c, cpl3_entry.S).
 * KERNEL_CS/KERNEL_DS keep the values of the boot protocol's __BOOT_CS/__BOOT_DS. */
#pragma once

#define KERNEL_CS 0x10
#define KERNEL_DS 0x18
#define USER_CS 0x20
#define USER_DS 0x28
#define TSS_SEL 0x30   /* 16-byte descriptor: slots 6 and 7 */
#define GDT_ENTRIES 8
#define RPL3 3

#define RFLAGS_FIXED 0x2      /* bit 1 is always 1 */
#define RFLAGS_IOPL3 0x3000   /* IOPL = 3: IN/OUT allowed at CPL3 */
