/* A polled virtio 1.x driver over PCI, written from the Virtual I/O Device (VIRTIO) Version 1.2
 * specification: 2.1 device status, 2.2 feature bits, 2.7 split virtqueues, 3.1 device
 * initialization, 4.1 virtio over PCI bus.  No interrupts: the driver polls the used ring, and
 * asks the device not to interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT, MSI-X vectors NO_VECTOR, INTx
 * disabled in the PCI command register).  Runs at CPL0 or CPL3 (ports through the TSS I/O
 * bitmap, BARs through user pages). */
#pragma once

#include "pci_bus.h"
#include "types.h"

#define VIRTIO_VENDOR_ID 0x1af4
#define VIRTIO_PCI_MODERN_DEVICE_BASE 0x1040 /* 4.1.2.1: 0x1040 + virtio device id */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_ENTROPY 4

/* 2.1 device status field */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* 6 reserved feature bits */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* 4.1.4 virtio_pci_cap cfg_type */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_TYPES 5 /* 1..4 used, index 0 unused */
#define PCI_CAP_ID_VNDR 0x09

/* 2.7.5 descriptor flags */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

#define VQ_MAX_SIZE 256

/* 2.7.5-2.7.8: every field naturally aligned, so no packing is needed. */

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[]; /* then u16 used_event (VIRTIO_F_EVENT_IDX) */
};

struct virtq_used_elem {
	u32 id;
	u32 len;
};

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[]; /* then u16 avail_event (VIRTIO_F_EVENT_IDX) */
};

/* A virtio structure found through a vendor-specific capability (4.1.4). */
struct virtio_region {
	bool found;
	u8 cap;     /* its offset in configuration space */
	u8 bar;
	u32 offset; /* within the BAR */
	u32 length;
	uintptr_t addr; /* BAR base + offset, once the BARs are known */
};

struct virtio_dev {
	struct pci_func pci;
	struct virtio_region r[VIRTIO_PCI_CAP_TYPES]; /* indexed by cfg_type */
	u32 notify_off_multiplier;
	u64 device_features;
	u64 features; /* negotiated */
};

/* One buffer of a chain: device-readable unless `write`. */
struct vq_buf {
	u64 addr;
	u32 len;
	bool write;
};

struct virtq {
	struct virtio_dev *dev;
	u16 index;
	u16 size;
	struct virtq_desc *desc;
	struct virtq_avail *avail;
	struct virtq_used *used;
	uintptr_t notify;    /* where this queue's notifications go */
	bool event_idx;      /* VIRTIO_F_EVENT_IDX negotiated */
	u16 free_head;       /* free descriptors, chained through desc[].next */
	u16 num_free;
	u16 avail_shadow;    /* avail->idx as it will be after the next kick */
	u16 avail_kicked;    /* avail->idx at the last kick */
	u16 last_used;       /* used->idx already consumed */
	u32 token[VQ_MAX_SIZE]; /* the caller's token, by chain head */
	u32 notifies;        /* notifications written (for the report lines) */
};

/* Capability walk order: list order (the first instance of each type wins, 4.1.4.1), or the
 * positions gathered first and the capabilities then read from the last to the first, with byte
 * reads (the same result, a different sequence of configuration accesses). */
enum virtio_cap_walk { CAPS_IN_ORDER, CAPS_REVERSE };

/* Looks up each virtio structure (common, notify, ISR, device) and its BAR; f's BARs must have
 * been sized.  Prints why and returns false when one is missing or does not fit in its BAR. */
bool virtio_find_caps(struct virtio_dev *d, enum virtio_cap_walk walk);

/* Recomputes each structure's address from the (possibly moved) BARs. */
void virtio_map(struct virtio_dev *d);

/* 3.1.1 steps 1-6: reset (and wait for status 0), ACKNOWLEDGE, DRIVER, read the device's
 * features, write `wanted` & offered (VERSION_1 must be offered: it is always wanted),
 * FEATURES_OK, and re-read the status to see the device accepted.  Also enables memory decode
 * and bus mastering and disables INTx.  Prints why and returns false on failure. */
bool virtio_negotiate(struct virtio_dev *d, u64 wanted);

/* 3.1.1 step 7 for one queue (4.1.5.1.3): select, read the maximum size, write a power of two
 * no larger than max_size, the three ring addresses, MSI-X NO_VECTOR, enable.  Ring memory comes
 * from a static pool.  Prints why and returns false on failure. */
bool virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 max_size);

/* 3.1.1 step 8. */
void virtio_driver_ok(struct virtio_dev *d);
u8 virtio_status(const struct virtio_dev *d);
/* Sets FAILED (3.1.1: "if any of these steps go irrecoverably wrong"). */
void virtio_fail(struct virtio_dev *d);
/* Reads (and so clears, 4.1.4.5) the ISR status byte. */
u8 virtio_isr(const struct virtio_dev *d);

/* Device configuration: reads of `n` bytes at `offset`, retried until config_generation is the
 * same before and after (2.5.1).  n is 1, 2, 4 or 8 (8 as two 4-byte reads). */
u64 virtio_config_read(const struct virtio_dev *d, u32 offset, unsigned n);

/* Places a chain of n buffers in the descriptor table (direct), or in `indirect_table` (n
 * entries, 16-byte aligned) referenced by one descriptor with VIRTQ_DESC_F_INDIRECT, and adds
 * its head to the available ring without publishing it.  Returns false when there are not
 * enough free descriptors. */
bool virtq_add(struct virtq *q, const struct vq_buf *bufs, unsigned n,
	       struct virtq_desc *indirect_table, u32 token);

/* Publishes the chains added since the last kick (one write of avail->idx) and notifies the
 * device unless it asked not to be (VIRTQ_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). */
void virtq_kick(struct virtq *q);

/* Takes one used element if there is one: sets *token and *len, frees its descriptors. */
bool virtq_poll(struct virtq *q, u32 *token, u32 *len);

/* virtq_poll until one arrives or `timeout_us` (at least) passes; false on timeout. */
bool virtq_wait(struct virtq *q, u32 *token, u32 *len, u64 timeout_us);

/* Finds the first function on bus 0 with vendor 0x1af4 and device id `modern_id`, or, when
 * there is none, a transitional one with `transitional_id` (reported, and refused by the
 * caller).  Sizes its BARs.  Returns false when neither exists. */
bool virtio_find_function(u16 modern_id, u16 transitional_id, struct pci_func *f);

/* Moves every memory BAR that the virtio structures use to a new base inside
 * [low, PCI_HOLE_END), clear of every other BAR on bus 0 and of the `busy` ranges (ECAM, e820),
 * and checks the BAR reads the new base back.  Prints "<tag>: BARn 0x... -> 0x..." lines.
 * Returns false when there is no room or the BAR does not read back. */
bool virtio_move_bars(struct virtio_dev *d, struct pci_busy *busy, u64 low, const char *tag);

/* The number of 4 KiB pages the ring pool has left (for the report). */
unsigned virtio_pool_left(void);
