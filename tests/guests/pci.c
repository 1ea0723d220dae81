/* pci: enumerates PCI bus 0 twice, as an OS does, and prints every function it finds.
 *
 * Once through configuration mechanism #1 (PCI Local Bus 3.0 3.2.2.3.2: a dword write of
 * enable | bus | device | function | register to 0xCF8, then the dword at 0xCFC), once through
 * ECAM (PCI Express Base 4.0 7.2.2), at the address the ACPI MCFG table gives: the RSDP is
 * found by its signature and checksum on a 16-byte boundary in 0xE0000-0xFFFFF (ACPI 6.3
 * 5.2.5.1), then RSDP -> XSDT -> MCFG.  A function exists when its vendor id is not 0xFFFF;
 * functions 1-7 are probed only when function 0's header type has bit 7 (multi-function).
 * Both walks must find the same functions.  Ends through the i8042 reset (host status 0),
 * or debug-exit 1 (host status 3) when a table is missing or the walks disagree. */
#include "exit.h"
#include "io.h"
#include "pci_bus.h"
#include "print.h"
#include "serial.h"
#include "string.h"

#define MAX_FOUND 256

typedef u32 (*config_read32)(u64 ecam, u8 devfn, u16 reg);

static u32 cf8_read32(u64 ecam, u8 devfn, u16 reg)
{
	(void)ecam;
	return pci_cf8_read32(devfn, reg);
}

static unsigned enumerate(const char *how, config_read32 rd, u64 ecam, u64 *found)
{
	unsigned n = 0;
	for (unsigned dev = 0; dev < 32; dev++) {
		for (unsigned fn = 0; fn < 8; fn++) {
			u8 devfn = (u8)(dev << 3 | fn);
			u32 id = rd(ecam, devfn, PCI_VENDOR_ID);
			if ((id & 0xFFFF) == 0xFFFF) {
				if (fn == 0)
					break;
				continue;
			}
			u32 class = rd(ecam, devfn, PCI_CLASS_REVISION) >> 8;
			u8 header = rd(ecam, devfn, PCI_HEADER_TYPE & ~3) >> 16;
			print("%s: 00:%02x.%u %04x:%04x class %06x header %02x\n", how, dev, fn,
			      id & 0xFFFF, id >> 16, class, header);
			if (n < MAX_FOUND)
				found[n++] = (u64)devfn << 32 | id;
			if (fn == 0 && !(header & PCI_HEADER_MULTI_FUNCTION))
				break;
		}
	}
	return n;
}

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	static u64 by_cf8[MAX_FOUND], by_ecam[MAX_FOUND];
	(void)boot_params;
	serial_init();
	unsigned n = enumerate("cf8", cf8_read32, 0, by_cf8);
	u64 ecam = acpi_find_ecam(NULL);
	if (!ecam)
		debug_exit(1);
	unsigned m = enumerate("ecam", pci_ecam_read32, ecam, by_ecam);
	if (n != m || memcmp(by_cf8, by_ecam, n * sizeof(u64)) != 0) {
		print("pci: the two walks disagree (%u and %u functions)\n", n, m);
		debug_exit(1);
	}
	print("pci: %u functions, both walks agree\n", n);
	i8042_reset();
}
