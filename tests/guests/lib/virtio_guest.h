/* The start every virtio test guest shares, driven by its command line:
 *
 *   assign=1       give unassigned BARs on bus 0 an address first (firmware duty; the
 *                  firmware flavours turn it on)
 *   ecam=1         configuration access through ECAM (from the ACPI MCFG table), not 0xCF8
 *   caps=reverse   look the virtio capabilities up in reverse order, with byte reads
 *   move=1         move the device's BARs to a new base in the PCI hole before using them
 *                  (memory decode off around each move)
 *   indirect=1     negotiate VIRTIO_F_INDIRECT_DESC (if offered) and use indirect tables
 *   event_idx=1    negotiate VIRTIO_F_EVENT_IDX (if offered)
 *   qsize=N        largest queue size to use (default 128; a power of two no larger is used)
 */
#pragma once

#include "virtio_pci.h"

/* debug-exit values shared by the virtio guests (host status (V << 1) | 1). */
#define VEXIT_OK 0x10       /* 33 */
#define VEXIT_ARGS 2        /* 5: bad command line, or not enough RAM */
#define VEXIT_SETUP 3       /* 7: no device, transitional device, caps, features, queue */
#define VEXIT_IO 4          /* 9: a request completed with an unexpected status */
#define VEXIT_TIMEOUT 5     /* 11: a request did not complete in time */
#define VEXIT_DATA 6        /* 13: data read back is wrong / entropy checks failed */
#define VEXIT_READONLY 7    /* 15: a read-only device accepted a write */
#define VEXIT_MOVE 8        /* 17: a BAR did not follow a move */

/* Opens the device with PCI id 1af4:`modern_id`; prints "<tag>: ..." lines; ends the guest
 * with one of the VEXIT values on failure.  `wanted` are device-specific feature bits; the
 * flags above add INDIRECT_DESC / EVENT_IDX. */
void virtio_guest_open(const void *bp, const char *cmdline, const char *tag, u16 modern_id,
		       u16 transitional_id, u64 wanted, struct virtio_dev *d);

/* The queue size the command line asks for (qsize=, default 128). */
u16 virtio_guest_qsize(const char *cmdline);

/* Checks that [start, end) is RAM per the e820 map (when there is one); ends the guest with
 * VEXIT_ARGS if not. */
void virtio_guest_need_ram(const void *bp, const char *tag, u64 start, u64 end);

/* Prints "<tag>: features device=0x... driver=0x..." */
void virtio_guest_print_features(const struct virtio_dev *d, const char *tag);

/* Driver-owned buffer slots of a queue (a transmit queue, say): slot i's chain is added with
 * token i, and the slot is free again once the device returns that token. */
struct vq_slots {
	unsigned total, nfree;
	unsigned free[VQ_MAX_SIZE];
};

void vq_slots_init(struct vq_slots *s, unsigned total);
/* A free slot: takes back what the device returned; when none is free, kicks and waits up to
 * timeout_us.  Ends the guest (VEXIT_TIMEOUT, or VEXIT_IO for a token never handed out),
 * printing "<tag>: ..." and setting FAILED, when that goes wrong. */
unsigned vq_slots_get(struct virtq *q, struct vq_slots *s, const char *tag, u64 timeout_us);
/* Kicks, then waits up to timeout_us until every slot is back. */
void vq_slots_drain(struct virtq *q, struct vq_slots *s, const char *tag, u64 timeout_us);
