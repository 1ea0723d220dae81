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
#include "print.h"
#include "serial.h"
#include "string.h"

#define CONFIG_ADDRESS 0xCF8
#define CONFIG_DATA 0xCFC
#define CONFIG_ENABLE 0x80000000u
#define BIOS_AREA_START 0xE0000ul
#define BIOS_AREA_END 0x100000ul
#define MAX_FOUND 256
#define HEADER_MULTI_FUNCTION 0x80

typedef u32 (*config_read32)(u64 ecam, unsigned dev, unsigned fn, unsigned reg);

static u32 cf8_read32(u64 ecam, unsigned dev, unsigned fn, unsigned reg)
{
	(void)ecam;
	outl(CONFIG_ADDRESS, CONFIG_ENABLE | dev << 11 | fn << 8 | (reg & 0xFC));
	return inl(CONFIG_DATA);
}

static u32 ecam_read32(u64 ecam, unsigned dev, unsigned fn, unsigned reg)
{
	return mmio_read32(ecam + ((u64)dev << 15 | (u64)fn << 12 | reg));
}

static u8 sum(const u8 *p, u32 len)
{
	u8 s = 0;
	for (u32 i = 0; i < len; i++)
		s += p[i];
	return s;
}

static u32 rd32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }

static const u8 *find_rsdp(void)
{
	for (uintptr_t a = BIOS_AREA_START; a < BIOS_AREA_END; a += 16) {
		const u8 *p = phys_ptr(a);
		if (memcmp(p, "RSD PTR ", 8) == 0 && sum(p, 20) == 0)
			return p;
	}
	return 0;
}

/* The ECAM base of bus 0 from the MCFG table, or 0. */
static u64 find_ecam(void)
{
	const u8 *rsdp = find_rsdp();
	if (!rsdp || rsdp[15] < 2 || sum(rsdp, rd32(rsdp + 20)) != 0) {
		print("acpi: no RSDP (revision 2) in the BIOS area\n");
		return 0;
	}
	print("acpi: RSDP at %#lx\n", (u64)(uintptr_t)rsdp);
	const u8 *xsdt = phys_ptr(rd64(rsdp + 24));
	if (memcmp(xsdt, "XSDT", 4) != 0 || sum(xsdt, rd32(xsdt + 4)) != 0) {
		print("acpi: bad XSDT\n");
		return 0;
	}
	for (u32 off = 36; off + 8 <= rd32(xsdt + 4); off += 8) {
		const u8 *t = phys_ptr(rd64(xsdt + off));
		if (memcmp(t, "MCFG", 4) == 0 && sum(t, rd32(t + 4)) == 0 && rd32(t + 4) >= 60) {
			print("acpi: MCFG segment %u buses %u-%u at %#lx\n", t[52] | t[53] << 8,
			      t[54], t[55], rd64(t + 44));
			return rd64(t + 44);
		}
	}
	print("acpi: no MCFG in the XSDT\n");
	return 0;
}

static unsigned enumerate(const char *how, config_read32 rd, u64 ecam, u64 *found)
{
	unsigned n = 0;
	for (unsigned dev = 0; dev < 32; dev++) {
		for (unsigned fn = 0; fn < 8; fn++) {
			u32 id = rd(ecam, dev, fn, 0x00);
			if ((id & 0xFFFF) == 0xFFFF) {
				if (fn == 0)
					break;
				continue;
			}
			u32 class = rd(ecam, dev, fn, 0x08) >> 8;
			u8 header = rd(ecam, dev, fn, 0x0C) >> 16;
			print("%s: 00:%02x.%u %04x:%04x class %06x header %02x\n", how, dev, fn,
			      id & 0xFFFF, id >> 16, class, header);
			if (n < MAX_FOUND)
				found[n++] = (u64)(dev << 3 | fn) << 32 | id;
			if (fn == 0 && !(header & HEADER_MULTI_FUNCTION))
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
	u64 ecam = find_ecam();
	if (!ecam)
		debug_exit(1);
	unsigned m = enumerate("ecam", ecam_read32, ecam, by_ecam);
	if (n != m || memcmp(by_cf8, by_ecam, n * sizeof(u64)) != 0) {
		print("pci: the two walks disagree (%u and %u functions)\n", n, m);
		debug_exit(1);
	}
	print("pci: %u functions, both walks agree\n", n);
	i8042_reset();
}
