#include "virtio_pci.h"

#include "io.h"
#include "print.h"
#include "string.h"
#include "tsc.h"

/* 4.1.4.3 struct virtio_pci_common_cfg */
#define COMMON_DEVICE_FEATURE_SELECT 0x00
#define COMMON_DEVICE_FEATURE 0x04
#define COMMON_DRIVER_FEATURE_SELECT 0x08
#define COMMON_DRIVER_FEATURE 0x0c
#define COMMON_CONFIG_MSIX_VECTOR 0x10
#define COMMON_NUM_QUEUES 0x12
#define COMMON_DEVICE_STATUS 0x14
#define COMMON_CONFIG_GENERATION 0x15
#define COMMON_QUEUE_SELECT 0x16
#define COMMON_QUEUE_SIZE 0x18
#define COMMON_QUEUE_MSIX_VECTOR 0x1a
#define COMMON_QUEUE_ENABLE 0x1c
#define COMMON_QUEUE_NOTIFY_OFF 0x1e
#define COMMON_QUEUE_DESC 0x20
#define COMMON_QUEUE_DRIVER 0x28
#define COMMON_QUEUE_DEVICE 0x30
#define COMMON_CFG_MIN_LEN 0x38 /* up to queue_notify_data, where 1.2 adds fields */
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* 4.1.4 struct virtio_pci_cap (and virtio_pci_notify_cap's extra field) */
#define CAP_VNDR 0
#define CAP_NEXT 1
#define CAP_LEN 2
#define CAP_CFG_TYPE 3
#define CAP_BAR 4
#define CAP_OFFSET 8
#define CAP_LENGTH 12
#define CAP_NOTIFY_OFF_MULTIPLIER 16
#define CAP_MIN_LEN 16
#define NOTIFY_CAP_MIN_LEN 20
#define MAX_CAPS 48 /* (256 - 64) / 4: a longer list loops */

#define RESET_TIMEOUT_US 1000000
#define PAGE 4096
#define POOL_PAGES 16

static u8 pool[POOL_PAGES * PAGE] ALIGNED(PAGE);
static unsigned pool_used;

static void *pool_alloc(size_t bytes)
{
	unsigned pages = (unsigned)((bytes + PAGE - 1) / PAGE);
	if (pool_used + pages > POOL_PAGES)
		return NULL;
	void *p = pool + pool_used * PAGE;
	pool_used += pages;
	memset(p, 0, pages * PAGE);
	return p;
}

unsigned virtio_pool_left(void)
{
	return POOL_PAGES - pool_used;
}

static const char *cap_name(unsigned type)
{
	static const char *const names[] = { "?", "common", "notify", "isr", "device" };
	return type < VIRTIO_PCI_CAP_TYPES ? names[type] : "?";
}

/* ---- common configuration ---- */

static uintptr_t common(const struct virtio_dev *d, u32 reg)
{
	return d->r[VIRTIO_PCI_CAP_COMMON_CFG].addr + reg;
}

u8 virtio_status(const struct virtio_dev *d)
{
	return mmio_read8(common(d, COMMON_DEVICE_STATUS));
}

static void set_status(struct virtio_dev *d, u8 bits)
{
	mmio_write8(common(d, COMMON_DEVICE_STATUS), virtio_status(d) | bits);
}

void virtio_fail(struct virtio_dev *d)
{
	set_status(d, VIRTIO_STATUS_FAILED);
}

void virtio_driver_ok(struct virtio_dev *d)
{
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

u8 virtio_isr(const struct virtio_dev *d)
{
	return mmio_read8(d->r[VIRTIO_PCI_CAP_ISR_CFG].addr);
}

/* 4.1.3.1: 64-bit fields as two 32-bit accesses, low half first. */
static void write64(uintptr_t addr, u64 v)
{
	mmio_write32(addr, (u32)v);
	mmio_write32(addr + 4, (u32)(v >> 32));
}

u64 virtio_config_read(const struct virtio_dev *d, u32 offset, unsigned n)
{
	uintptr_t a = d->r[VIRTIO_PCI_CAP_DEVICE_CFG].addr + offset;
	uintptr_t gen = common(d, COMMON_CONFIG_GENERATION);
	u8 before, after;
	u64 v;

	do {
		before = mmio_read8(gen);
		switch (n) {
		case 1: v = mmio_read8(a); break;
		case 2: v = mmio_read16(a); break;
		case 4: v = mmio_read32(a); break;
		default: v = mmio_read32(a) | (u64)mmio_read32(a + 4) << 32; break;
		}
		after = mmio_read8(gen);
	} while (before != after);
	return v;
}

/* ---- finding the function and its capabilities ---- */

bool virtio_find_function(u16 modern_id, u16 transitional_id, struct pci_func *f)
{
	unsigned n;
	const struct pci_func *funcs = pci_functions(&n);
	const struct pci_func *transitional = NULL;

	for (unsigned i = 0; i < n; i++) {
		if (funcs[i].vendor != VIRTIO_VENDOR_ID)
			continue;
		if (funcs[i].device == modern_id) {
			*f = funcs[i];
			pci_size_bars(f);
			return true;
		}
		if (funcs[i].device == transitional_id && !transitional)
			transitional = &funcs[i];
	}
	if (transitional) {
		*f = *transitional;
		return true;
	}
	return false;
}

/* The capability's fields, with dword reads or (bytewise) one byte at a time. */
static void read_cap(const struct pci_func *f, u8 pos, bool bytewise, u8 out[20])
{
	if (bytewise) {
		for (int i = 19; i >= 0; i--)
			out[i] = pci_read8(f->devfn, (u16)(pos + i));
		return;
	}
	for (unsigned i = 0; i < 20; i += 4) {
		u32 v = pci_read32(f->devfn, (u16)(pos + i));
		memcpy(out + i, &v, 4);
	}
}

static u32 le32(const u8 *p)
{
	u32 v;
	memcpy(&v, p, 4);
	return v;
}

/* Takes a virtio_pci_cap if it is one the driver can use and the first of its type seen so far
 * in list order (earlier wins: with `override` a later call replaces what an earlier one set,
 * which the reverse walk uses to let the list's first instance win). */
static void consider_cap(struct virtio_dev *d, u8 pos, const u8 *c, bool override)
{
	u8 type = c[CAP_CFG_TYPE], bar = c[CAP_BAR];

	if (c[CAP_VNDR] != PCI_CAP_ID_VNDR || type == 0 || type >= VIRTIO_PCI_CAP_TYPES)
		return;
	/* 4.1.4.1: ignore a capability with a reserved BAR value or one that is too short. */
	if (bar >= PCI_NUM_BARS || c[CAP_LEN] < CAP_MIN_LEN ||
	    (type == VIRTIO_PCI_CAP_NOTIFY_CFG && c[CAP_LEN] < NOTIFY_CAP_MIN_LEN))
		return;
	struct virtio_region *r = &d->r[type];
	if (r->found && !override)
		return;
	*r = (struct virtio_region){ .found = true, .cap = pos, .bar = bar,
				     .offset = le32(c + CAP_OFFSET),
				     .length = le32(c + CAP_LENGTH) };
	if (type == VIRTIO_PCI_CAP_NOTIFY_CFG)
		d->notify_off_multiplier = le32(c + CAP_NOTIFY_OFF_MULTIPLIER);
}

/* The capability positions in list order; 0 ends the list. */
static unsigned cap_positions(const struct pci_func *f, u8 *pos)
{
	unsigned n = 0;
	if (!(pci_read16(f->devfn, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	for (u8 p = pci_read8(f->devfn, PCI_CAPABILITY_LIST) & 0xfc; p && n < MAX_CAPS;
	     p = pci_read8(f->devfn, (u16)(p + PCI_CAP_LIST_NEXT)) & 0xfc)
		pos[n++] = p;
	return n;
}

static bool region_fits(const struct virtio_dev *d, unsigned type)
{
	const struct virtio_region *r = &d->r[type];
	const struct pci_bar *b = &d->pci.bar[r->bar];
	if (!r->found) {
		print("virtio: no %s capability\n", cap_name(type));
		return false;
	}
	if (b->io || b->size == 0 || (u64)r->offset + r->length > b->size) {
		print("virtio: %s structure (BAR%u offset %#x length %#x) not inside a memory BAR\n",
		      cap_name(type), r->bar, r->offset, r->length);
		return false;
	}
	return true;
}

bool virtio_find_caps(struct virtio_dev *d, enum virtio_cap_walk walk)
{
	u8 pos[MAX_CAPS], c[20];
	unsigned n = cap_positions(&d->pci, pos);

	memset(d->r, 0, sizeof(d->r));
	if (walk == CAPS_IN_ORDER) {
		for (unsigned i = 0; i < n; i++) {
			read_cap(&d->pci, pos[i], false, c);
			consider_cap(d, pos[i], c, false);
		}
	} else {
		for (unsigned i = n; i-- > 0;) {
			read_cap(&d->pci, pos[i], true, c);
			consider_cap(d, pos[i], c, true);
		}
	}
	for (unsigned t = VIRTIO_PCI_CAP_COMMON_CFG; t < VIRTIO_PCI_CAP_TYPES; t++) {
		if (!region_fits(d, t))
			return false;
	}
	if (d->r[VIRTIO_PCI_CAP_COMMON_CFG].length < COMMON_CFG_MIN_LEN) {
		print("virtio: common structure is %#x bytes, want at least %#x\n",
		      d->r[VIRTIO_PCI_CAP_COMMON_CFG].length, COMMON_CFG_MIN_LEN);
		return false;
	}
	virtio_map(d);
	return true;
}

void virtio_map(struct virtio_dev *d)
{
	for (unsigned t = VIRTIO_PCI_CAP_COMMON_CFG; t < VIRTIO_PCI_CAP_TYPES; t++) {
		struct virtio_region *r = &d->r[t];
		r->addr = (uintptr_t)(d->pci.bar[r->bar].base + r->offset);
	}
}

bool virtio_move_bars(struct virtio_dev *d, struct pci_busy *busy, u64 low, const char *tag)
{
	bool used[PCI_NUM_BARS] = { false };

	for (unsigned t = VIRTIO_PCI_CAP_COMMON_CFG; t < VIRTIO_PCI_CAP_TYPES; t++)
		used[d->r[t].bar] = true;
	for (unsigned i = 0; i < PCI_NUM_BARS; i++) {
		struct pci_bar *b = &d->pci.bar[i];
		if (!used[i])
			continue;
		u64 old = b->base, base = pci_pick_mem(busy, b->size, low, PCI_HOLE_END);
		if (!base) {
			print("%s: no room in the PCI hole to move BAR%u (%#lx bytes)\n", tag, i,
			      b->size);
			return false;
		}
		pci_set_bar(&d->pci, i, base);
		pci_busy_add(busy, base, base + b->size);
		u64 back = pci_read32(d->pci.devfn, (u16)(PCI_BASE_ADDRESS_0 + 4 * i)) & ~0xfu;
		if (b->is64)
			back |= (u64)pci_read32(d->pci.devfn, (u16)(PCI_BASE_ADDRESS_0 + 4 * i + 4))
				<< 32;
		print("%s: BAR%u %#lx -> %#lx\n", tag, i, old, base);
		if (back != base) {
			print("%s: BAR%u reads back %#lx after the move to %#lx\n", tag, i, back,
			      base);
			return false;
		}
	}
	virtio_map(d);
	return true;
}

/* ---- initialization ---- */

static bool reset(struct virtio_dev *d)
{
	/* 4.1.4.3.2: after writing 0, wait until device_status reads 0 (reset complete). */
	mmio_write8(common(d, COMMON_DEVICE_STATUS), 0);
	u64 deadline = tsc_deadline(RESET_TIMEOUT_US);
	while (virtio_status(d) != 0) {
		if (tsc_passed(deadline)) {
			print("virtio: device_status stays %#x after reset\n", virtio_status(d));
			return false;
		}
	}
	return true;
}

static u64 read_features(struct virtio_dev *d)
{
	u64 f = 0;
	for (u32 sel = 0; sel < 2; sel++) {
		mmio_write32(common(d, COMMON_DEVICE_FEATURE_SELECT), sel);
		f |= (u64)mmio_read32(common(d, COMMON_DEVICE_FEATURE)) << (32 * sel);
	}
	return f;
}

static void write_features(struct virtio_dev *d, u64 f)
{
	for (u32 sel = 0; sel < 2; sel++) {
		mmio_write32(common(d, COMMON_DRIVER_FEATURE_SELECT), sel);
		mmio_write32(common(d, COMMON_DRIVER_FEATURE), (u32)(f >> (32 * sel)));
	}
}

bool virtio_negotiate(struct virtio_dev *d, u64 wanted)
{
	u8 devfn = d->pci.devfn;
	u16 cmd = pci_read16(devfn, PCI_COMMAND);

	/* The BARs must decode and the device must be allowed to reach RAM (its rings).  No INTx:
	 * nothing would deliver it (the driver polls). */
	pci_write16(devfn, PCI_COMMAND,
		    cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
	if (!reset(d))
		return false;
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);
	d->device_features = read_features(d);
	wanted |= 1ull << VIRTIO_F_VERSION_1;
	if (!(d->device_features & (1ull << VIRTIO_F_VERSION_1))) {
		print("virtio: device features %#lx lack VIRTIO_F_VERSION_1\n", d->device_features);
		virtio_fail(d);
		return false;
	}
	d->features = d->device_features & wanted;
	write_features(d, d->features);
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	u8 status = virtio_status(d);
	if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
		print("virtio: device refused features %#lx (status %#x)\n", d->features, status);
		virtio_fail(d);
		return false;
	}
	mmio_write16(common(d, COMMON_CONFIG_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
	return true;
}

static u16 pow2_floor(u16 v)
{
	u16 p = 1;
	while ((u16)(p << 1) && (u16)(p << 1) <= v)
		p = (u16)(p << 1);
	return p;
}

bool virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 max_size)
{
	mmio_write16(common(d, COMMON_QUEUE_SELECT), index);
	u16 dev_max = mmio_read16(common(d, COMMON_QUEUE_SIZE));
	if (dev_max == 0) {
		print("virtio: queue %u does not exist (queue_size 0)\n", index);
		return false;
	}
	if (mmio_read16(common(d, COMMON_QUEUE_ENABLE)) != 0) {
		print("virtio: queue %u is enabled before the driver set it up\n", index);
		return false;
	}
	u16 want = max_size < dev_max ? max_size : dev_max;
	if (want > VQ_MAX_SIZE)
		want = VQ_MAX_SIZE;
	u16 size = pow2_floor(want);

	*q = (struct virtq){ .dev = d, .index = index, .size = size };
	/* 2.7: descriptor table 16-byte aligned, available ring 2, used ring 4 (a page each). */
	q->desc = pool_alloc(16u * size);
	q->avail = pool_alloc(6u + 2u * size);
	q->used = pool_alloc(6u + 8u * size);
	if (!q->desc || !q->avail || !q->used) {
		print("virtio: out of ring memory for queue %u\n", index);
		return false;
	}
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->num_free = size;
	q->event_idx = d->features & (1ull << VIRTIO_F_EVENT_IDX);
	if (!q->event_idx)
		q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

	mmio_write16(common(d, COMMON_QUEUE_SIZE), size);
	write64(common(d, COMMON_QUEUE_DESC), (u64)(uintptr_t)q->desc);
	write64(common(d, COMMON_QUEUE_DRIVER), (u64)(uintptr_t)q->avail);
	write64(common(d, COMMON_QUEUE_DEVICE), (u64)(uintptr_t)q->used);
	mmio_write16(common(d, COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
	u64 notify_off = mmio_read16(common(d, COMMON_QUEUE_NOTIFY_OFF));
	const struct virtio_region *n = &d->r[VIRTIO_PCI_CAP_NOTIFY_CFG];
	u64 off = notify_off * d->notify_off_multiplier;
	/* 4.1.4.4: the notification address must lie inside the notify structure. */
	if (off + 2 > n->length) {
		print("virtio: queue %u notify offset %#lx is outside the notify structure "
		      "(%#x bytes)\n", index, off, n->length);
		return false;
	}
	q->notify = n->addr + off;
	mmio_write16(common(d, COMMON_QUEUE_ENABLE), 1);
	return true;
}

/* ---- the split virtqueue (2.7) ---- */

static u16 *used_event(struct virtq *q)
{
	return &q->avail->ring[q->size];
}

static volatile u16 *avail_event(struct virtq *q)
{
	return (volatile u16 *)&q->used->ring[q->size];
}

bool virtq_add(struct virtq *q, const struct vq_buf *bufs, unsigned n,
	       struct virtq_desc *indirect_table, u32 token)
{
	unsigned need = indirect_table ? 1 : n;
	if (n == 0 || need > q->num_free)
		return false;
	u16 head = q->free_head;

	if (indirect_table) {
		for (unsigned i = 0; i < n; i++) {
			indirect_table[i] = (struct virtq_desc){
				.addr = bufs[i].addr,
				.len = bufs[i].len,
				.flags = (u16)((bufs[i].write ? VIRTQ_DESC_F_WRITE : 0) |
					       (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0)),
				.next = (u16)(i + 1 < n ? i + 1 : 0),
			};
		}
		struct virtq_desc *d = &q->desc[head];
		q->free_head = d->next;
		d->addr = (u64)(uintptr_t)indirect_table;
		d->len = (u32)(n * sizeof(struct virtq_desc));
		d->flags = VIRTQ_DESC_F_INDIRECT;
	} else {
		u16 i = head, last = head;
		for (unsigned k = 0; k < n; k++) {
			struct virtq_desc *d = &q->desc[i];
			last = i;
			d->addr = bufs[k].addr;
			d->len = bufs[k].len;
			d->flags = (u16)((bufs[k].write ? VIRTQ_DESC_F_WRITE : 0) |
					 (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
			i = d->next; /* the free list's link doubles as the chain's */
		}
		q->free_head = q->desc[last].next;
	}
	q->num_free = (u16)(q->num_free - need);
	q->token[head] = token;
	q->avail->ring[q->avail_shadow % q->size] = head;
	q->avail_shadow++;
	return true;
}

/* 2.7.10: with EVENT_IDX, notify when avail_event lies in [old, new). */
static bool need_event(u16 event, u16 new_idx, u16 old)
{
	return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

void virtq_kick(struct virtq *q)
{
	u16 old = q->avail_kicked, new_idx = q->avail_shadow;
	if (old == new_idx)
		return;
	/* 2.7.13: ring entries before the index (x86 keeps stores in order; the compiler must
	 * too), and the index before reading the device's suppression field (store-load). */
	barrier();
	*(volatile u16 *)&q->avail->idx = new_idx;
	q->avail_kicked = new_idx;
	full_barrier();
	bool notify = q->event_idx ? need_event(*avail_event(q), new_idx, old)
				   : !(*(volatile u16 *)&q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	if (notify) {
		mmio_write16(q->notify, q->index); /* 4.1.5.2: the queue index, 16 bits */
		q->notifies++;
	}
}

static void free_chain(struct virtq *q, u16 head)
{
	u16 i = head, n = 1;
	while (q->desc[i].flags & VIRTQ_DESC_F_NEXT) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = head;
	q->num_free = (u16)(q->num_free + n);
}

bool virtq_poll(struct virtq *q, u32 *token, u32 *len)
{
	if (*(volatile u16 *)&q->used->idx == q->last_used)
		return false;
	barrier(); /* read the element only after seeing the index (x86 keeps loads in order) */
	struct virtq_used_elem e = q->used->ring[q->last_used % q->size];
	q->last_used++;
	if (q->event_idx)
		*(volatile u16 *)used_event(q) = q->last_used;
	if (e.id >= q->size) {
		print("virtio: queue %u used element id %u >= size %u\n", q->index, e.id, q->size);
		*token = UINT32_MAX;
		*len = 0;
		return true;
	}
	*token = q->token[e.id];
	*len = e.len;
	free_chain(q, (u16)e.id);
	return true;
}

bool virtq_wait(struct virtq *q, u32 *token, u32 *len, u64 timeout_us)
{
	u64 deadline = tsc_deadline(timeout_us);
	unsigned spins = 0;
	while (!virtq_poll(q, token, len)) {
		/* Check the clock now and then only: rdtsc costs more than a ring read. */
		if (++spins % 1024 == 0 && tsc_passed(deadline))
			return false;
		asm volatile("pause");
	}
	return true;
}
