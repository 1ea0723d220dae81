/* virtio-blk: drives a modern virtio block device (PCI 1af4:1042) as a polled driver written
 * from the virtio 1.2 specification, 5.2 "Block Device" (and lib/virtio_pci.c for 2.7, 3.1,
 * 4.1).  Everything after the switch runs at CPL3 (native on a PVM host): configuration-space
 * ports through the TSS I/O bitmap, BARs and rings through user pages.
 *
 * Command line (besides lib/virtio_guest.h's assign= ecam= caps= move= indirect= event_idx=
 * qsize=):
 *   mode=test|write|verify|loop|bench   (default test)
 *   seed=N     pattern seed (default 1)
 *   size=S     bytes of the disk to use from sector 0 (K/M/G suffixes; default 8M for test,
 *              64M otherwise; capped at the capacity)
 *   depth=N    requests in flight (1..16, default 8)
 *   seg=S      bytes per data descriptor (default 0: one descriptor per request)
 *   ro=1       the disk is expected to be read-only (mode=test only)
 *   every=S    loop: a progress line after every S bytes (default 16M); passes=N: stop after
 *              N passes (default 0: until a byte arrives on COM1; a digit N, 1-9: after
 *              N * S more bytes); rate=R with tsc_khz=K: at most R blocks a second
 *   ios=N      bench: random 4 KiB reads (default 4096); passes=N: each phase N times
 *              (default 1; the firmware flavour's default is 7)
 *   spread=S   request buffers over S bytes of RAM from DMA_BASE (a multiple of depth MiB;
 *              default depth MiB): each slot's requests take its own buffers in turn, as a
 *              guest's page cache fills, so that a device writes ever other pages
 * README.md describes each mode's output, the data pattern and the exit statuses. */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "io.h"
#include "print.h"
#include "serial.h"
#include "string.h"
#include "tsc.h"
#include "virtio_guest.h"

#define TAG "virtio-blk"
#define KIB (1ul << 10)
#define MIB (1ul << 20)
#define SECTOR 512u
#define WORDS_PER_SECTOR (SECTOR / 8)
#define MAX_DEPTH 16
#define MAX_REQ MIB
#define SMALL_REQ (4 * KIB)
#define MAX_SEGS (MAX_REQ / SMALL_REQ)
#define DMA_BASE (16 * MIB) /* request buffers: slot i's first at DMA_BASE + i MiB (next_buf) */
#define REQ_TIMEOUT_US 30000000ull
#define GET_ID_BYTES 20
#define MAX_MISMATCH_LINES 4

/* 5.2.3 feature bits */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
/* 5.2.4 struct virtio_blk_config */
#define BLK_CFG_CAPACITY 0
#define BLK_CFG_SIZE_MAX 8
#define BLK_CFG_SEG_MAX 12
#define BLK_CFG_BLK_SIZE 20
/* 5.2.6 requests */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define PATTERN_MUL 0x9e3779b97f4a7c15ull
#define SEED_MUL 0xbf58476d1ce4e5b9ull
#define FNV_PRIME 0x100000001b3ull
#define FNV_OFFSET 0xcbf29ce484222325ull

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
} PACKED;

struct slot {
	struct blk_req_hdr hdr;
	u8 status;
	bool busy;
	u64 sector;
	u32 bytes;
	u32 type;
	u8 *buf;    /* the request's data */
	u64 uses;   /* requests it has made (spread=: which of its buffers is next) */
};

static struct slot slots[MAX_DEPTH] ALIGNED(64);
static struct virtq_desc indirect[MAX_DEPTH][MAX_SEGS + 2] ALIGNED(16);
static struct virtio_dev dev;
static struct virtq vq;

static struct {
	u64 capacity; /* sectors */
	u32 seg_bytes;
	u32 seg_max;  /* 0: no limit given */
	u32 size_max;
	unsigned depth;
	bool indirect;
	u64 tsc_khz;
	u64 buffer_sets; /* spread=: each slot's buffers, slot i's k-th at buffer k * depth + i */
} cfg;

/* Checking results, for the read side of a stream. */
static struct {
	u64 seed_lo, seed_hi; /* a sector's seed must lie in [seed_lo, seed_hi] */
	u64 sum;              /* sum of per-sector FNV-1a hashes, mod 2^64 */
	u64 bad_sectors;
	u64 newer;            /* sectors that carry seed_hi when seed_lo < seed_hi */
	unsigned lines;
	bool check;           /* compare with the pattern */
	bool sum_reads;       /* sum what is read (implied by check) */
} chk;

static u8 *slot_buf(unsigned i)
{
	return phys_ptr(DMA_BASE + (u64)i * MAX_REQ);
}

/* Slot i's buffer for its next request: its own, in turn, so that no two requests in flight
 * share one however the device completes them. */
static u8 *next_buf(unsigned i)
{
	return slot_buf((unsigned)(slots[i].uses++ % cfg.buffer_sets) * cfg.depth + i);
}

/* ---- the pattern ---- */

/* Word i of sector s written with seed: word 0 = s, word 1 = seed, then a mix of the three. */
static u64 pattern_word(u64 seed, u64 s, unsigned i)
{
	if (i == 0)
		return s;
	if (i == 1)
		return seed;
	u64 x = (s << 6 | i) * PATTERN_MUL + seed * SEED_MUL;
	return x ^ (x >> 29);
}

static u64 sector_hash(const u64 *w)
{
	u64 h = FNV_OFFSET;
	for (unsigned i = 0; i < WORDS_PER_SECTOR; i++)
		h = (h ^ w[i]) * FNV_PRIME;
	return h;
}

static void fill(u64 seed, u64 sector, u8 *buf, u32 bytes)
{
	u64 *w = (u64 *)buf;
	for (u32 s = 0; s < bytes / SECTOR; s++, w += WORDS_PER_SECTOR) {
		for (unsigned i = 0; i < WORDS_PER_SECTOR; i++)
			w[i] = pattern_word(seed, sector + s, i);
		chk.sum += sector_hash(w);
	}
}

static void mismatch(u64 s, unsigned i, u64 got, u64 want, const u64 *w)
{
	chk.bad_sectors++;
	if (chk.lines++ < MAX_MISMATCH_LINES)
		print(TAG ": mismatch sector %lu word %u: got %#lx want %#lx (header sector %lu "
		      "seed %lu)\n", s, i, got, want, w[0], w[1]);
}

static void check(u64 sector, const u8 *buf, u32 bytes)
{
	const u64 *w = (const u64 *)buf;
	for (u32 k = 0; k < bytes / SECTOR; k++, w += WORDS_PER_SECTOR) {
		u64 s = sector + k;
		chk.sum += sector_hash(w);
		if (!chk.check)
			continue;
		u64 seed = w[1];
		if (w[0] != s || seed < chk.seed_lo || seed > chk.seed_hi) {
			mismatch(s, w[0] != s ? 0 : 1, w[0] != s ? w[0] : seed,
				 w[0] != s ? s : chk.seed_lo, w);
			continue;
		}
		if (seed != chk.seed_lo)
			chk.newer++;
		for (unsigned i = 2; i < WORDS_PER_SECTOR; i++) {
			u64 want = pattern_word(seed, s, i);
			if (w[i] != want) {
				mismatch(s, i, w[i], want, w);
				break;
			}
		}
	}
}

static void expect(u64 seed_lo, u64 seed_hi)
{
	chk = (typeof(chk)){ .seed_lo = seed_lo, .seed_hi = seed_hi, .check = true, .sum_reads = true };
}

/* ---- requests ---- */

static NORETURN void fail(u8 value)
{
	virtio_fail(&dev);
	debug_exit(value);
}

static void submit(unsigned i, u32 type, u64 sector, u32 bytes, u8 *buf)
{
	struct slot *sl = &slots[i];
	struct vq_buf bufs[MAX_SEGS + 2];
	unsigned n = 0;
	bool to_driver = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;

	sl->hdr = (struct blk_req_hdr){ .type = type, .sector = sector };
	sl->status = 0xff; /* the device overwrites it */
	sl->busy = true;
	sl->sector = sector;
	sl->bytes = bytes;
	sl->type = type;
	sl->buf = buf;
	bufs[n++] = (struct vq_buf){ (u64)(uintptr_t)&sl->hdr, sizeof(sl->hdr), false };
	u32 seg = cfg.seg_bytes ? cfg.seg_bytes : bytes;
	for (u32 off = 0; off < bytes; off += seg) {
		u32 len = bytes - off < seg ? bytes - off : seg;
		bufs[n++] = (struct vq_buf){ (u64)(uintptr_t)buf + off, len, to_driver };
	}
	bufs[n++] = (struct vq_buf){ (u64)(uintptr_t)&sl->status, 1, true };
	if (cfg.seg_max && n - 2 > cfg.seg_max) {
		print(TAG ": a %u-byte request needs %u segments, the device takes %u (seg_max)\n",
		      bytes, n - 2, cfg.seg_max);
		fail(VEXIT_ARGS);
	}
	if (!virtq_add(&vq, bufs, n, cfg.indirect ? indirect[i] : NULL, i)) {
		print(TAG ": no room for a %u-descriptor chain (queue size %u)\n", n, vq.size);
		fail(VEXIT_ARGS);
	}
}

/* Descriptors a request of `bytes` takes from the ring. */
static unsigned ring_descs(u32 bytes)
{
	u32 seg = cfg.seg_bytes ? cfg.seg_bytes : bytes;
	return cfg.indirect ? 1 : (bytes + seg - 1) / seg + 2;
}

/* Waits for one request; returns its slot. */
static unsigned complete_one(void)
{
	u32 token, len;
	if (!virtq_wait(&vq, &token, &len, REQ_TIMEOUT_US)) {
		print(TAG ": request timed out (avail idx %u, used idx %u, last used %u)\n",
		      vq.avail_shadow, *(volatile u16 *)&vq.used->idx, vq.last_used);
		fail(VEXIT_TIMEOUT);
	}
	if (token >= MAX_DEPTH || !slots[token].busy) {
		print(TAG ": the device returned a chain that is not in flight (id token %u)\n",
		      token);
		fail(VEXIT_IO);
	}
	slots[token].busy = false;
	return token;
}

/* One request alone; returns its status. */
static u8 single(u32 type, u64 sector, u32 bytes)
{
	submit(0, type, sector, bytes, slot_buf(0));
	virtq_kick(&vq);
	return slots[complete_one()].status;
}

static const char *type_name(u32 type)
{
	return type == VIRTIO_BLK_T_IN ? "read" : type == VIRTIO_BLK_T_OUT ? "write" : "request";
}

/* A run of `count` requests of `bytes` each, cfg.depth in flight: the k-th goes to
 * first + k * (bytes / 512), or to a pseudo-random `bytes`-aligned place in [0, span) when
 * `random`.  Writes are filled with `seed`'s pattern unless `seed` is 0 (bench: whatever the
 * buffer holds); reads are checked as chk says.  Returns the TSC ticks it took. */
static u64 stream(u32 type, u64 first, u64 count, u32 bytes, u64 seed, bool random, u64 span)
{
	u64 next = 0, done = 0, rng = 0x243f6a8885a308d3ull;
	unsigned inflight = 0, free_slot[MAX_DEPTH], nfree = cfg.depth;
	u64 blocks = span / bytes;

	for (unsigned i = 0; i < cfg.depth; i++)
		free_slot[i] = cfg.depth - 1 - i;
	u64 t0 = rdtsc();
	while (done < count) {
		bool posted = false;
		/* Never more in flight than the ring holds (a small queue, or long direct chains). */
		while (inflight < cfg.depth && next < count &&
		       (vq.num_free >= ring_descs(bytes) || inflight == 0)) {
			unsigned i = free_slot[--nfree];
			u64 sector = first + next * (bytes / SECTOR);
			if (random) {
				rng = rng * 6364136223846793005ull + 1442695040888963407ull;
				sector = ((rng >> 11) % blocks) * (bytes / SECTOR);
			}
			u8 *buf = next_buf(i);
			if (type == VIRTIO_BLK_T_OUT && seed)
				fill(seed, sector, buf, bytes);
			submit(i, type, sector, bytes, buf);
			inflight++;
			next++;
			posted = true;
		}
		if (posted)
			virtq_kick(&vq); /* up to `depth` chains published with one notify */
		unsigned i = complete_one();
		struct slot *sl = &slots[i];
		if (sl->status != VIRTIO_BLK_S_OK) {
			print(TAG ": %s of %u bytes at sector %lu: status %u\n", type_name(type),
			      sl->bytes, sl->sector, sl->status);
			fail(VEXIT_IO);
		}
		if (type == VIRTIO_BLK_T_IN && (chk.check || chk.sum_reads))
			check(sl->sector, sl->buf, sl->bytes);
		free_slot[nfree++] = i;
		inflight--;
		done++;
	}
	return rdtsc() - t0;
}

static void write_region(u64 first_sector, u64 bytes, u32 req, u64 seed)
{
	stream(VIRTIO_BLK_T_OUT, first_sector, bytes / req, req, seed, false, 0);
}

static void read_region(u64 first_sector, u64 bytes, u32 req)
{
	stream(VIRTIO_BLK_T_IN, first_sector, bytes / req, req, 0, false, 0);
}

/* A FLUSH, if the device offered it: any status but OK ends the guest. `say`: "flush ok" too. */
static void flush_disk(bool say)
{
	if (!(dev.features & (1ull << VIRTIO_BLK_F_FLUSH)))
		return;
	u8 st = single(VIRTIO_BLK_T_FLUSH, 0, 0);
	if (st != VIRTIO_BLK_S_OK) {
		print(TAG ": flush: status %u\n", st);
		fail(VEXIT_IO);
	}
	if (say)
		print(TAG ": flush ok\n");
}

static void flush(void)
{
	flush_disk(true);
}

static void verdict(const char *what, u64 mib)
{
	if (chk.bad_sectors) {
		print(TAG ": %s %lu MiB: %lu bad sectors\n", what, mib, chk.bad_sectors);
		fail(VEXIT_DATA);
	}
}

/* ---- modes ---- */

static void get_id(void)
{
	u8 st = single(VIRTIO_BLK_T_GET_ID, 0, GET_ID_BYTES);
	if (st == VIRTIO_BLK_S_UNSUPP) {
		print(TAG ": serial unsupported\n");
		return;
	}
	if (st != VIRTIO_BLK_S_OK) {
		print(TAG ": GET_ID: status %u\n", st);
		fail(VEXIT_IO);
	}
	char serial[GET_ID_BYTES + 1];
	const u8 *id = slot_buf(0);
	unsigned n = 0;
	/* 5.2.6: NUL-terminated unless it is exactly 20 bytes long. */
	while (n < GET_ID_BYTES && id[n]) {
		serial[n] = id[n] >= 0x20 && id[n] < 0x7f ? (char)id[n] : '?';
		n++;
	}
	serial[n] = 0;
	print(TAG ": serial \"%s\"\n", serial);
}

static void mode_readonly(void)
{
	if (dev.features & (1ull << VIRTIO_BLK_F_RO)) {
		/* 5.2.6.1: no writes to a device that offers RO. */
		print(TAG ": readonly: device offers VIRTIO_BLK_F_RO\n");
	} else {
		u8 st = single(VIRTIO_BLK_T_OUT, 0, SMALL_REQ);
		if (st == VIRTIO_BLK_S_OK) {
			print(TAG ": readonly: a write to sector 0 succeeded\n");
			fail(VEXIT_READONLY);
		}
		if (st != VIRTIO_BLK_S_IOERR) {
			print(TAG ": readonly: a write to sector 0 gave status %u, want IOERR (1)\n", st);
			fail(VEXIT_IO);
		}
		print(TAG ": readonly: write refused with IOERR\n");
	}
	chk = (typeof(chk)){ .sum_reads = true };
	read_region(0, MIB, SMALL_REQ);
	print(TAG ": readonly: read 1 MiB sum=%016lx\n", chk.sum);
	print(TAG ": test ok\n");
}

static void mode_test(u64 seed, u64 size)
{
	/* The first MiB in 4 KiB requests, the rest in 1 MiB ones; then read back the whole with
	 * 1 MiB requests and the first 2 MiB with 4 KiB ones, crossing the two. */
	chk = (typeof(chk)){ 0 };
	write_region(0, MIB, SMALL_REQ, seed);
	write_region(MIB / SECTOR, size - MIB, MAX_REQ, seed);
	u64 wsum = chk.sum;
	print(TAG ": wrote %lu MiB seed=%lu sum=%016lx\n", size / MIB, seed, wsum);
	flush();
	expect(seed, seed);
	read_region(0, size, MAX_REQ);
	verdict("read", size / MIB);
	print(TAG ": read %lu MiB in 1 MiB requests sum=%016lx\n", size / MIB, chk.sum);
	if (chk.sum != wsum) {
		print(TAG ": sum read back differs from the sum written\n");
		fail(VEXIT_DATA);
	}
	expect(seed, seed);
	read_region(0, 2 * MIB, SMALL_REQ);
	verdict("read", 2);
	print(TAG ": read 2 MiB in 4 KiB requests ok\n");
	print(TAG ": notifies=%u\n", vq.notifies);
	print(TAG ": test ok\n");
}

static void mode_write(u64 seed, u64 size)
{
	chk = (typeof(chk)){ 0 };
	write_region(0, size, MAX_REQ, seed);
	flush();
	print(TAG ": wrote %lu MiB seed=%lu sum=%016lx\n", size / MIB, seed, chk.sum);
}

static void mode_verify(u64 seed, u64 size)
{
	expect(seed, seed);
	read_region(0, size, MAX_REQ);
	verdict("verify", size / MIB);
	print(TAG ": verified %lu MiB seed=%lu sum=%016lx\n", size / MIB, seed, chk.sum);
}

/* Pass p writes every block with seed + p; before overwriting a block it reads it and checks it
 * holds pass p - 1's data (or already pass p's: a VM restored from a snapshot may find blocks
 * its first life wrote after the snapshot); after writing, it reads the block back. A byte on
 * COM1 stops it after the block it is in; a digit N (1-9) after N times `every` more, so that a
 * host can bound what a VM writes after a snapshot whatever its own latency. */
static void mode_loop(const char *cmdline, u64 seed, u64 size)
{
	u64 every = cmdline_size(cmdline, "every", 16 * MIB), passes = cmdline_u64(cmdline, "passes", 0);
	u64 blocks = size / MAX_REQ, total = 0, newer = 0, stop_at = 0; /* 0: no digit typed */
	u64 rate = cmdline_u64(cmdline, "rate", 0), tsc_khz = cmdline_u64(cmdline, "tsc_khz", 0);
	bool flush_each = cmdline_u64(cmdline, "flush", 0) != 0;

	if (every < MIB)
		every = MIB;
	if (rate && !tsc_khz) {
		print(TAG ": rate needs tsc_khz\n");
		fail(VEXIT_ARGS);
	}
	u64 per_block = rate ? tsc_khz * 1000 / rate : 0, next = rdtsc(); /* TSC ticks, rate= */
	print(TAG ": loop size=%lu MiB seed=%lu every=%lu MiB passes=%lu spread=%lu MiB rate=%lu\n",
	      size / MIB, seed, every / MIB, passes, cfg.buffer_sets * cfg.depth, rate);
	for (u64 p = 0; passes == 0 || p < passes; p++) {
		for (u64 b = 0; b < blocks; b++) {
			u64 sector = b * (MAX_REQ / SECTOR);
			if (rate) {
				u64 now;
				while ((now = rdtsc()) < next)
					asm volatile("pause" ::: "memory");
				next = now + per_block; /* late: no catching up in a burst */
			}
			if (p > 0) {
				expect(seed + p - 1, seed + p);
				read_region(sector, MAX_REQ, MAX_REQ);
				verdict("loop: before rewrite", 1);
				newer += chk.newer;
			}
			write_region(sector, MAX_REQ, MAX_REQ, seed + p);
			if (flush_each)
				flush_disk(false);
			expect(seed + p, seed + p);
			read_region(sector, MAX_REQ, MAX_REQ);
			verdict("loop: after write", 1);
			total += MAX_REQ;
			if (total % every == 0)
				print(TAG ": loop pass=%lu block=%lu written=%lu MiB ok\n", p, b,
				      total / MIB);
			int c = serial_poll_byte();
			if (c >= '1' && c <= '9' && !stop_at)
				stop_at = total + (u64)(c - '0') * every;
			else if (c >= 0 || (stop_at && total >= stop_at)) {
				print(TAG ": loop stopped by input after %lu MiB (pass %lu, %lu "
				      "newer sectors seen)\n", total / MIB, p, newer);
				return;
			}
		}
	}
	print(TAG ": loop done after %lu MiB (%lu passes, %lu newer sectors seen)\n", total / MIB,
	      passes, newer);
}

/* units * scale per second, from `ticks` of the TSC, printed with one decimal.  Through the
 * phase's microseconds, so that no product passes 64 bits: ticks * 1000 up to ~70 days at
 * 3 GHz, whole units * 10^7 up to ~1.8 * 10^12 of them (ios, or MiB of size), the rest
 * (< scale <= 1 MiB) * 10^7. */
static void print_rate(const char *what, u64 units, u64 ticks, const char *unit, u64 scale)
{
	u64 us = cfg.tsc_khz ? ticks * 1000 / cfg.tsc_khz : 0;
	if (!us) {
		print(TAG ": bench %s ticks=%lu\n", what, ticks);
		return;
	}
	u64 whole = units / scale, rest = units % scale; /* units = whole * scale + rest */
	u64 tenths = whole * 10000000 / us + rest * 10000000 / scale / us;
	print(TAG ": bench %s ticks=%lu %s=%lu.%lu\n", what, ticks, unit, tenths / 10,
	      tenths % 10);
}

static void mode_bench(const char *cmdline, u64 size)
{
	u64 ios = cmdline_u64(cmdline, "ios", 4096), passes = cmdline_u64(cmdline, "passes", 1);
	if (passes < 1 || passes > 1000) {
		print(TAG ": bench passes= must be 1..1000\n");
		fail(VEXIT_ARGS);
	}
	chk = (typeof(chk)){ 0 }; /* no checking: only throughput */
	cfg.tsc_khz = tsc_calibrate_khz();
	print(TAG ": bench size=%lu MiB depth=%u passes=%lu tsc_khz=%lu\n", size / MIB, cfg.depth,
	      passes, cfg.tsc_khz);
	for (unsigned i = 0; i < cfg.depth; i++)
		fill(1, 0, slot_buf(i), MAX_REQ);
	for (u64 p = 0; p < passes; p++) { /* a line per phase and pass: the host takes medians */
		u64 t = stream(VIRTIO_BLK_T_OUT, 0, size / MAX_REQ, MAX_REQ, 0, false, 0);
		print_rate("seq-write-1m", size, t, "mib_s", MIB);
		flush();
		t = stream(VIRTIO_BLK_T_IN, 0, size / MAX_REQ, MAX_REQ, 0, false, 0);
		print_rate("seq-read-1m", size, t, "mib_s", MIB);
		t = stream(VIRTIO_BLK_T_IN, 0, ios, SMALL_REQ, 0, true, size);
		print_rate("rand-read-4k", ios, t, "iops", 1);
	}
	print(TAG ": bench notifies=%u\n", vq.notifies);
}

/* ---- set-up ---- */

static void read_config(void)
{
	cfg.capacity = virtio_config_read(&dev, BLK_CFG_CAPACITY, 8);
	if (dev.features & (1ull << VIRTIO_BLK_F_SEG_MAX))
		cfg.seg_max = (u32)virtio_config_read(&dev, BLK_CFG_SEG_MAX, 4);
	if (dev.features & (1ull << VIRTIO_BLK_F_SIZE_MAX))
		cfg.size_max = (u32)virtio_config_read(&dev, BLK_CFG_SIZE_MAX, 4);
	u32 blk_size = SECTOR;
	if (dev.features & (1ull << VIRTIO_BLK_F_BLK_SIZE))
		blk_size = (u32)virtio_config_read(&dev, BLK_CFG_BLK_SIZE, 4);
	print(TAG ": capacity=%lu sectors (%lu MiB) blk_size=%u seg_max=%u size_max=%u\n",
	      cfg.capacity, cfg.capacity * SECTOR / MIB, blk_size, cfg.seg_max, cfg.size_max);
	if (cfg.size_max && (cfg.seg_bytes ? cfg.seg_bytes : MAX_REQ) > cfg.size_max) {
		/* 5.2.6.1: no segment larger than size_max. */
		cfg.seg_bytes = cfg.size_max & ~(u32)(SMALL_REQ - 1);
		print(TAG ": segments of %u bytes (size_max)\n", cfg.seg_bytes);
	}
}

static NORETURN void blk_main(void *bp)
{
	const char *cmdline = bp_cmdline(bp);

	serial_init();
	print(TAG ": cmdline: %s\n", cmdline);
	bool test = !cmdline_find(cmdline, "mode", &(const char *){ 0 }, &(size_t){ 0 }) ||
		    cmdline_is(cmdline, "mode", "test");
	u64 seed = cmdline_u64(cmdline, "seed", 1);
	u64 size = cmdline_size(cmdline, "size", test ? 8 * MIB : 64 * MIB);
	u64 depth = cmdline_u64(cmdline, "depth", 8), seg = cmdline_size(cmdline, "seg", 0);
	u64 spread = cmdline_size(cmdline, "spread", depth * MAX_REQ);
	if (!test && !cmdline_is(cmdline, "mode", "write") && !cmdline_is(cmdline, "mode", "verify") &&
	    !cmdline_is(cmdline, "mode", "loop") && !cmdline_is(cmdline, "mode", "bench")) {
		print(TAG ": mode= must be test, write, verify, loop or bench\n");
		debug_exit(VEXIT_ARGS);
	}
	if (depth < 1 || depth > MAX_DEPTH || seg % SMALL_REQ || seg > MAX_REQ || seed == 0 ||
	    size < 2 * MIB || size % MIB || !spread || spread % (depth * MAX_REQ) ||
	    spread > 1ull << 31) {
		print(TAG ": need 1 <= depth <= %u, seg a multiple of 4K up to 1M, seed >= 1, size a "
		      "multiple of 1M >= 2M, spread a multiple of depth MiB up to 2G\n", MAX_DEPTH);
		debug_exit(VEXIT_ARGS);
	}
	cfg.depth = (unsigned)depth;
	cfg.seg_bytes = (u32)seg;
	cfg.buffer_sets = spread / (depth * MAX_REQ);
	virtio_guest_need_ram(bp, TAG, DMA_BASE, DMA_BASE + spread);

	u64 wanted = 1ull << VIRTIO_BLK_F_SIZE_MAX | 1ull << VIRTIO_BLK_F_SEG_MAX |
		     1ull << VIRTIO_BLK_F_RO | 1ull << VIRTIO_BLK_F_BLK_SIZE |
		     1ull << VIRTIO_BLK_F_FLUSH;
	virtio_guest_open(bp, cmdline, TAG, VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_BLOCK, 0x1001,
			  wanted, &dev);
	virtio_guest_print_features(&dev, TAG);
	cfg.indirect = dev.features & (1ull << VIRTIO_F_INDIRECT_DESC);
	read_config();
	if (!virtq_setup(&dev, &vq, 0, virtio_guest_qsize(cmdline)))
		fail(VEXIT_SETUP);
	virtio_driver_ok(&dev);
	print(TAG ": queue 0 size %u indirect=%u event_idx=%u\n", vq.size, cfg.indirect,
	      vq.event_idx);
	if (size / SECTOR > cfg.capacity)
		size = cfg.capacity * SECTOR / MIB * MIB;
	if (size < 2 * MIB) {
		print(TAG ": the disk is smaller than 2 MiB\n");
		fail(VEXIT_ARGS);
	}
	get_id();

	if (cmdline_u64(cmdline, "ro", 0))
		mode_readonly();
	else if (test)
		mode_test(seed, size);
	else if (cmdline_is(cmdline, "mode", "write"))
		mode_write(seed, size);
	else if (cmdline_is(cmdline, "mode", "verify"))
		mode_verify(seed, size);
	else if (cmdline_is(cmdline, "mode", "loop"))
		mode_loop(cmdline, seed, size);
	else
		mode_bench(cmdline, size);
	print(TAG ": isr=%#x status=%#x\n", virtio_isr(&dev), virtio_status(&dev));
	debug_exit(VEXIT_OK);
}

/* The firmware flavour's command line before fw_cfg's (lib/fw_boot.c): the firmware flavour runs the benchmark unless told otherwise. */
extern const char fw_default_cmdline[];
const char fw_default_cmdline[] = "mode=bench passes=7";

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(blk_main, (void *)boot_params);
}
