/* PCI bus 0: configuration space access, enumeration, BAR sizing and placement.
 *
 * Written from the PCI Local Bus 3.0 specification (3.2.2.3.2 configuration mechanism #1,
 * 6.1 the type 0 header, 6.2.5 base address registers, 6.7 capabilities list), PCI Express
 * Base 4.0 (7.2.2 ECAM) and ACPI 6.3 (5.2.5.1 finding the RSDP; the MCFG table from the PCI
 * Firmware specification 3.2, 4.1.2).  Names as Linux's <uapi/linux/pci_regs.h>. */
#pragma once

#include "types.h"

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x0001
#define PCI_COMMAND_MEMORY 0x0002
#define PCI_COMMAND_MASTER 0x0004
#define PCI_COMMAND_INTX_DISABLE 0x0400
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x0010
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_TYPE 0x0e
#define PCI_HEADER_TYPE_MASK 0x7f
#define PCI_HEADER_MULTI_FUNCTION 0x80
#define PCI_BASE_ADDRESS_0 0x10
#define PCI_BASE_ADDRESS_SPACE_IO 0x01
#define PCI_BASE_ADDRESS_MEM_TYPE_64 0x04
#define PCI_BASE_ADDRESS_MEM_PREFETCH 0x08
#define PCI_CAPABILITY_LIST 0x34
#define PCI_CAP_LIST_ID 0
#define PCI_CAP_LIST_NEXT 1

#define PCI_NUM_BARS 6
#define PCI_MAX_FUNCTIONS 256 /* 32 devices x 8 functions */

/* The first address above the PCI hole that a guest may use for BARs: the IOAPIC, HPET, LAPIC
 * and the firmware ROM live from here up to 4 GiB on a PC. */
#define PCI_HOLE_END 0xfec00000ull

struct pci_bar {
	u64 base;  /* bus address (I/O port for an I/O BAR), flag bits cleared */
	u64 size;  /* 0: not implemented */
	bool io;
	bool is64; /* takes this slot and the next */
	bool prefetch;
};

struct pci_func {
	u8 devfn; /* device << 3 | function, bus 0 */
	u16 vendor, device;
	u32 class; /* class code << 16 | subclass << 8 | prog-if */
	u8 header;
	struct pci_bar bar[PCI_NUM_BARS]; /* filled in by pci_size_bars */
};

/* Configuration access on bus 0 goes through ECAM at `base` from now on; 0 means mechanism #1
 * (0xCF8/0xCFC), the default.  Sub-dword accesses use the byte lanes of the dword (0xCFC + 1,
 * 2, 3 under mechanism #1). */
void pci_use_ecam(u64 base);
u8 pci_read8(u8 devfn, u16 reg);
u16 pci_read16(u8 devfn, u16 reg);
u32 pci_read32(u8 devfn, u16 reg);
void pci_write16(u8 devfn, u16 reg, u16 value);
void pci_write32(u8 devfn, u16 reg, u32 value);

/* Raw dword reads for a walk that compares both mechanisms (the pci guest). */
u32 pci_cf8_read32(u8 devfn, u16 reg);
u32 pci_ecam_read32(u64 ecam, u8 devfn, u16 reg);

/* Finds the RSDP, the XSDT and the MCFG table (checksums checked) and returns bus 0's ECAM base
 * (and *buses = the number of buses it covers), printing "acpi: ..." lines; 0 when not found. */
u64 acpi_find_ecam(unsigned *buses);

/* Every function on bus 0 (function 0 of each device, functions 1-7 when it is multi-function),
 * identity only (no BARs); returns how many, at most `max`. */
unsigned pci_scan(struct pci_func *out, unsigned max);

/* pci_scan into one static array shared by its callers (each call rescans); *n = how many. */
struct pci_func *pci_functions(unsigned *n);

/* Sizes f's BARs (type 0 headers): for each, memory and I/O decode off in the command register,
 * write all ones, read the mask back, restore the BAR, decode back as it was. */
void pci_size_bars(struct pci_func *f);

/* Moves BAR `index` (memory or I/O) to `base`, with decode of that kind turned off around the
 * writes (both halves of a 64-bit BAR), then restores the command register. */
void pci_set_bar(struct pci_func *f, unsigned index, u64 base);

/* Memory ranges new BARs must not overlap: other BARs, ECAM, e820 entries, ... */
struct pci_range {
	u64 start, end; /* [start, end) */
};

#define PCI_MAX_BUSY 96

struct pci_busy {
	unsigned n;
	struct pci_range r[PCI_MAX_BUSY];
};

void pci_busy_add(struct pci_busy *b, u64 start, u64 end);
/* Adds every memory BAR of f that has a non-zero base. */
void pci_busy_add_bars(struct pci_busy *b, const struct pci_func *f);
/* The highest base, aligned to `size` (a power of two), with [base, base + size) inside
 * [low, high) and clear of every busy range; 0 when there is none. */
u64 pci_pick_mem(const struct pci_busy *b, u64 size, u64 low, u64 high);

/* Firmware duty (nobody else does it under `qemu -bios`): gives every BAR of every function on
 * bus 0 that reads 0 an address, memory BARs top-down in [low, PCI_HOLE_END), I/O BARs upward
 * from 0xc000, and turns on memory/I/O decode for the functions that have such BARs.  Prints one
 * "pci: 00:DD.F BARn <- 0x..." line per assignment.  Returns how many were assigned. */
unsigned pci_assign_unassigned(u64 low);
