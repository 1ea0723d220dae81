#include "virtio_guest.h"

#include "bootparams.h"
#include "cmdline.h"
#include "exit.h"
#include "print.h"
#include "tsc.h"

#define DEFAULT_QSIZE 128
#define GIB (1ull << 30)
#define DEFAULT_HOLE_START (3 * GIB) /* when there is no e820 map (firmware) */

static u64 hole_start(const void *bp)
{
	u64 top = bp_e820_low_ram_end(bp);
	return top ? top : DEFAULT_HOLE_START;
}

/* Every range a moved BAR must stay clear of: the other functions' BARs, ECAM, e820 entries. */
static void collect_busy(const void *bp, const struct virtio_dev *d, u64 ecam, unsigned buses,
			 struct pci_busy *busy)
{
	unsigned n;
	struct pci_func *funcs = pci_functions(&n);

	busy->n = 0;
	for (unsigned i = 0; i < n; i++) {
		if (funcs[i].devfn == d->pci.devfn) {
			pci_busy_add_bars(busy, &d->pci); /* its own BARs: move to somewhere new */
			continue;
		}
		pci_size_bars(&funcs[i]);
		pci_busy_add_bars(busy, &funcs[i]);
	}
	if (ecam)
		pci_busy_add(busy, ecam, ecam + ((u64)buses << 20));
	for (unsigned i = 0; i < bp_e820_count(bp); i++) {
		struct e820_entry e = bp_e820_entry(bp, i);
		pci_busy_add(busy, e.addr, e.addr + e.size);
	}
}

void virtio_guest_open(const void *bp, const char *cmdline, const char *tag, u16 modern_id,
		       u16 transitional_id, u64 wanted, struct virtio_dev *d)
{
	u64 ecam = 0;
	unsigned buses = 0;
	bool move = cmdline_u64(cmdline, "move", 0);

	if (cmdline_u64(cmdline, "assign", 0))
		pci_assign_unassigned(hole_start(bp));
	if (cmdline_u64(cmdline, "ecam", 0) || move)
		ecam = acpi_find_ecam(&buses);
	if (cmdline_u64(cmdline, "ecam", 0)) {
		if (!ecam) {
			print("%s: ecam=1 but no MCFG table\n", tag);
			debug_exit(VEXIT_SETUP);
		}
		pci_use_ecam(ecam);
	}
	*d = (struct virtio_dev){ 0 };
	if (!virtio_find_function(modern_id, transitional_id, &d->pci)) {
		print("%s: no device %04x:%04x on bus 0\n", tag, VIRTIO_VENDOR_ID, modern_id);
		debug_exit(VEXIT_SETUP);
	}
	print("%s: 00:%02x.%u %04x:%04x via %s\n", tag, d->pci.devfn >> 3, d->pci.devfn & 7,
	      d->pci.vendor, d->pci.device, ecam && cmdline_u64(cmdline, "ecam", 0) ? "ecam" : "cf8");
	if (d->pci.device != modern_id) {
		print("%s: %04x:%04x is a transitional device; this driver wants a modern-only "
		      "one (%04x:%04x)\n", tag, d->pci.vendor, d->pci.device, VIRTIO_VENDOR_ID,
		      modern_id);
		debug_exit(VEXIT_SETUP);
	}
	bool reverse = cmdline_is(cmdline, "caps", "reverse");
	if (!virtio_find_caps(d, reverse ? CAPS_REVERSE : CAPS_IN_ORDER))
		debug_exit(VEXIT_SETUP);
	for (unsigned t = VIRTIO_PCI_CAP_COMMON_CFG; t < VIRTIO_PCI_CAP_TYPES; t++)
		print("%s: cap %#x type %u bar %u offset %#x length %#x\n", tag, d->r[t].cap, t,
		      d->r[t].bar, d->r[t].offset, d->r[t].length);
	if (move) {
		static struct pci_busy busy;
		collect_busy(bp, d, ecam, buses, &busy);
		if (!virtio_move_bars(d, &busy, hole_start(bp), tag))
			debug_exit(VEXIT_MOVE);
	}
	if (cmdline_u64(cmdline, "indirect", 0))
		wanted |= 1ull << VIRTIO_F_INDIRECT_DESC;
	if (cmdline_u64(cmdline, "event_idx", 0))
		wanted |= 1ull << VIRTIO_F_EVENT_IDX;
	if (!virtio_negotiate(d, wanted))
		debug_exit(move ? VEXIT_MOVE : VEXIT_SETUP);
}

u16 virtio_guest_qsize(const char *cmdline)
{
	u64 q = cmdline_u64(cmdline, "qsize", DEFAULT_QSIZE);
	return (u16)(q == 0 || q > VQ_MAX_SIZE ? VQ_MAX_SIZE : q);
}

void virtio_guest_need_ram(const void *bp, const char *tag, u64 start, u64 end)
{
	if (bp_e820_count(bp) && !bp_e820_ram_covers(bp, start, end)) {
		print("%s: needs RAM at %#lx-%#lx (a bigger VM)\n", tag, start, end);
		debug_exit(VEXIT_ARGS);
	}
}

void virtio_guest_print_features(const struct virtio_dev *d, const char *tag)
{
	print("%s: features device=%#lx driver=%#lx\n", tag, d->device_features, d->features);
}

void vq_slots_init(struct vq_slots *s, unsigned total)
{
	s->total = s->nfree = total;
	for (unsigned i = 0; i < total; i++)
		s->free[i] = total - 1 - i;
}

static void slot_back(struct virtq *q, struct vq_slots *s, const char *tag, u32 token)
{
	if (token >= s->total) {
		print("%s: queue %u returned token %u, not a slot\n", tag, q->index, token);
		virtio_fail(q->dev);
		debug_exit(VEXIT_IO);
	}
	s->free[s->nfree++] = token;
}

static void reclaim(struct virtq *q, struct vq_slots *s, const char *tag)
{
	u32 token, len;
	while (virtq_poll(q, &token, &len))
		slot_back(q, s, tag, token);
}

unsigned vq_slots_get(struct virtq *q, struct vq_slots *s, const char *tag, u64 timeout_us)
{
	reclaim(q, s, tag);
	if (!s->nfree) {
		u32 token, len;
		virtq_kick(q);
		if (!virtq_wait(q, &token, &len, timeout_us)) {
			print("%s: queue %u stuck (avail idx %u, used idx %u)\n", tag, q->index,
			      q->avail_shadow, *(volatile u16 *)&q->used->idx);
			virtio_fail(q->dev);
			debug_exit(VEXIT_TIMEOUT);
		}
		slot_back(q, s, tag, token);
	}
	return s->free[--s->nfree];
}

void vq_slots_drain(struct virtq *q, struct vq_slots *s, const char *tag, u64 timeout_us)
{
	virtq_kick(q);
	u64 deadline = tsc_deadline(timeout_us);
	for (reclaim(q, s, tag); s->nfree < s->total; reclaim(q, s, tag)) {
		if (tsc_passed(deadline)) {
			print("%s: %u buffers never came back from queue %u\n", tag,
			      s->total - s->nfree, q->index);
			virtio_fail(q->dev);
			debug_exit(VEXIT_TIMEOUT);
		}
	}
}
