#include "pci_bus.h"

#include "io.h"
#include "print.h"
#include "string.h"

#define CONFIG_ADDRESS 0xCF8
#define CONFIG_DATA 0xCFC
#define CONFIG_ENABLE 0x80000000u
#define BIOS_AREA_START 0xE0000ul
#define BIOS_AREA_END 0x100000ul
#define IO_ASSIGN_START 0xc000u /* above the legacy ISA ports, as PC firmware does */
#define IO_ASSIGN_END 0x10000u

static u64 ecam_base;

void pci_use_ecam(u64 base)
{
	ecam_base = base;
}

u32 pci_cf8_read32(u8 devfn, u16 reg)
{
	outl(CONFIG_ADDRESS, CONFIG_ENABLE | (u32)devfn << 8 | (reg & 0xFC));
	return inl(CONFIG_DATA);
}

u32 pci_ecam_read32(u64 ecam, u8 devfn, u16 reg)
{
	return mmio_read32(ecam + ((u64)devfn << 12 | reg));
}

/* Mechanism #1: select the dword, then the byte lanes of 0xCFC that hold the register. */
static void cf8_select(u8 devfn, u16 reg)
{
	outl(CONFIG_ADDRESS, CONFIG_ENABLE | (u32)devfn << 8 | (reg & 0xFC));
}

static uintptr_t ecam_addr(u8 devfn, u16 reg)
{
	return ecam_base + ((u64)devfn << 12 | reg);
}

u8 pci_read8(u8 devfn, u16 reg)
{
	if (ecam_base)
		return mmio_read8(ecam_addr(devfn, reg));
	cf8_select(devfn, reg);
	return inb(CONFIG_DATA + (reg & 3));
}

u16 pci_read16(u8 devfn, u16 reg)
{
	if (ecam_base)
		return mmio_read16(ecam_addr(devfn, reg));
	cf8_select(devfn, reg);
	return inw(CONFIG_DATA + (reg & 2));
}

u32 pci_read32(u8 devfn, u16 reg)
{
	if (ecam_base)
		return mmio_read32(ecam_addr(devfn, reg));
	return pci_cf8_read32(devfn, reg);
}

void pci_write16(u8 devfn, u16 reg, u16 value)
{
	if (ecam_base) {
		mmio_write16(ecam_addr(devfn, reg), value);
		return;
	}
	cf8_select(devfn, reg);
	outw(CONFIG_DATA + (reg & 2), value);
}

void pci_write32(u8 devfn, u16 reg, u32 value)
{
	if (ecam_base) {
		mmio_write32(ecam_addr(devfn, reg), value);
		return;
	}
	cf8_select(devfn, reg);
	outl(CONFIG_DATA, value);
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

u64 acpi_find_ecam(unsigned *buses)
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
			if (buses)
				*buses = (unsigned)t[55] + 1;
			return rd64(t + 44);
		}
	}
	print("acpi: no MCFG in the XSDT\n");
	return 0;
}

unsigned pci_scan(struct pci_func *out, unsigned max)
{
	unsigned n = 0;
	for (unsigned dev = 0; dev < 32; dev++) {
		for (unsigned fn = 0; fn < 8; fn++) {
			u8 devfn = (u8)(dev << 3 | fn);
			u32 id = pci_read32(devfn, PCI_VENDOR_ID);
			if ((id & 0xFFFF) == 0xFFFF) {
				if (fn == 0)
					break;
				continue;
			}
			u8 header = pci_read8(devfn, PCI_HEADER_TYPE);
			if (n < max)
				out[n++] = (struct pci_func){
					.devfn = devfn,
					.vendor = id & 0xFFFF,
					.device = id >> 16,
					.class = pci_read32(devfn, PCI_CLASS_REVISION) >> 8,
					.header = header,
				};
			if (fn == 0 && !(header & PCI_HEADER_MULTI_FUNCTION))
				break;
		}
	}
	return n;
}

struct pci_func *pci_functions(unsigned *n)
{
	static struct pci_func funcs[PCI_MAX_FUNCTIONS];
	*n = pci_scan(funcs, PCI_MAX_FUNCTIONS);
	return funcs;
}

static u16 bar_reg(unsigned index)
{
	return (u16)(PCI_BASE_ADDRESS_0 + 4 * index);
}

/* Sizes one BAR; returns how many slots it takes (2 for a 64-bit memory BAR). */
static unsigned size_bar(struct pci_func *f, unsigned i)
{
	u16 reg = bar_reg(i);
	u32 orig = pci_read32(f->devfn, reg), mask, orig_hi = 0, mask_hi = 0;
	struct pci_bar *b = &f->bar[i];

	*b = (struct pci_bar){ 0 };
	pci_write32(f->devfn, reg, 0xffffffffu);
	mask = pci_read32(f->devfn, reg);
	pci_write32(f->devfn, reg, orig);
	if (orig & PCI_BASE_ADDRESS_SPACE_IO) {
		b->io = true;
		b->base = orig & ~3u;
		mask &= ~3u;
		/* The upper 16 bits of an I/O BAR may read back as 0: size from the low 16. */
		b->size = mask ? ((~mask & 0xffff) + 1) : 0;
		return 1;
	}
	b->prefetch = orig & PCI_BASE_ADDRESS_MEM_PREFETCH;
	b->is64 = (orig & 0x6) == PCI_BASE_ADDRESS_MEM_TYPE_64;
	if (b->is64 && i + 1 < PCI_NUM_BARS) {
		orig_hi = pci_read32(f->devfn, reg + 4);
		pci_write32(f->devfn, reg + 4, 0xffffffffu);
		mask_hi = pci_read32(f->devfn, reg + 4);
		pci_write32(f->devfn, reg + 4, orig_hi);
	} else {
		b->is64 = false;
		mask_hi = 0xffffffffu; /* a 32-bit BAR: the bits above 31 are not there */
	}
	u64 m = (u64)mask_hi << 32 | (mask & ~0xfu);
	b->base = (u64)orig_hi << 32 | (orig & ~0xfu);
	/* A 64-bit BAR of 4 GiB or more has no writable bit in its low dword (PCI 3.0 6.2.5.1):
	 * it is there when either dword has one. */
	bool present = (mask & ~0xfu) || (b->is64 && mask_hi);
	b->size = present ? ~m + 1 : 0;
	return b->is64 ? 2 : 1;
}

void pci_size_bars(struct pci_func *f)
{
	u16 cmd = pci_read16(f->devfn, PCI_COMMAND);

	memset(f->bar, 0, sizeof(f->bar));
	if ((f->header & PCI_HEADER_TYPE_MASK) != 0)
		return; /* bridges: not needed by the guests */
	/* Decode off while a BAR holds all ones, so it never claims an address it does not own
	 * (Linux's __pci_read_base does the same). */
	pci_write16(f->devfn, PCI_COMMAND, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
	for (unsigned i = 0; i < PCI_NUM_BARS;)
		i += size_bar(f, i);
	pci_write16(f->devfn, PCI_COMMAND, cmd);
}

void pci_set_bar(struct pci_func *f, unsigned index, u64 base)
{
	struct pci_bar *b = &f->bar[index];
	u16 cmd = pci_read16(f->devfn, PCI_COMMAND);
	u16 reg = bar_reg(index);
	u32 low_flags = pci_read32(f->devfn, reg) & (b->io ? 3u : 0xfu);

	pci_write16(f->devfn, PCI_COMMAND,
		    cmd & ~(b->io ? PCI_COMMAND_IO : PCI_COMMAND_MEMORY));
	pci_write32(f->devfn, reg, (u32)base | low_flags);
	if (b->is64)
		pci_write32(f->devfn, reg + 4, (u32)(base >> 32));
	pci_write16(f->devfn, PCI_COMMAND, cmd);
	b->base = base;
}

void pci_busy_add(struct pci_busy *b, u64 start, u64 end)
{
	if (b->n < PCI_MAX_BUSY && end > start)
		b->r[b->n++] = (struct pci_range){ start, end };
}

void pci_busy_add_bars(struct pci_busy *b, const struct pci_func *f)
{
	for (unsigned i = 0; i < PCI_NUM_BARS; i++) {
		const struct pci_bar *bar = &f->bar[i];
		if (!bar->io && bar->size && bar->base)
			pci_busy_add(b, bar->base, bar->base + bar->size);
	}
}

static const struct pci_range *overlap(const struct pci_busy *b, u64 start, u64 end)
{
	for (unsigned i = 0; i < b->n; i++) {
		if (start < b->r[i].end && b->r[i].start < end)
			return &b->r[i];
	}
	return NULL;
}

u64 pci_pick_mem(const struct pci_busy *b, u64 size, u64 low, u64 high)
{
	if (size == 0 || high < size)
		return 0;
	u64 base = (high - size) & ~(size - 1);
	while (base >= low && base != 0) {
		const struct pci_range *r = overlap(b, base, base + size);
		if (!r)
			return base;
		/* Below the busy range that is in the way, aligned down. */
		if (r->start < size)
			return 0;
		base = (r->start - size) & ~(size - 1);
	}
	return 0;
}

/* I/O BARs, upward from IO_ASSIGN_START, each aligned to its size. */
static u32 io_next = IO_ASSIGN_START;

static bool assign_io(struct pci_func *f, unsigned i)
{
	u64 size = f->bar[i].size;
	u64 base = (io_next + size - 1) & ~(size - 1);
	if (base + size > IO_ASSIGN_END)
		return false;
	pci_set_bar(f, i, base);
	io_next = (u32)(base + size);
	return true;
}

unsigned pci_assign_unassigned(u64 low)
{
	static struct pci_busy busy;
	unsigned n, assigned = 0;
	struct pci_func *funcs = pci_functions(&n);

	busy.n = 0;
	for (unsigned k = 0; k < n; k++) {
		pci_size_bars(&funcs[k]);
		pci_busy_add_bars(&busy, &funcs[k]);
	}
	for (unsigned k = 0; k < n; k++) {
		struct pci_func *f = &funcs[k];
		u16 enable = 0;
		for (unsigned i = 0; i < PCI_NUM_BARS; i++) {
			struct pci_bar *b = &f->bar[i];
			if (!b->size)
				continue;
			enable |= b->io ? PCI_COMMAND_IO : PCI_COMMAND_MEMORY;
			if (b->base)
				continue;
			u64 base = 0;
			if (b->io) {
				if (assign_io(f, i))
					base = b->base;
			} else {
				base = pci_pick_mem(&busy, b->size, low, PCI_HOLE_END);
				if (base) {
					pci_set_bar(f, i, base);
					pci_busy_add(&busy, base, base + b->size);
				}
			}
			if (!base) {
				print("pci: 00:%02x.%u BAR%u: no room for %#lx bytes\n", f->devfn >> 3,
				      f->devfn & 7, i, b->size);
				continue;
			}
			print("pci: 00:%02x.%u BAR%u <- %#lx (%s, %#lx bytes)\n", f->devfn >> 3,
			      f->devfn & 7, i, base, b->io ? "io" : "mem", b->size);
			assigned++;
		}
		if (enable)
			pci_write16(f->devfn, PCI_COMMAND,
				    pci_read16(f->devfn, PCI_COMMAND) | enable);
	}
	return assigned;
}
