/* virtio-rng: reads entropy from a modern virtio entropy device (PCI 1af4:1044) as a polled
 * driver written from the virtio 1.2 specification, 5.4 "Entropy Device": one queue
 * (requestq), each buffer device-writable; the device fills it with random bytes and returns
 * how many it wrote.  Runs at CPL3 after the switch, as virtio-blk does.
 *
 * Command line (besides lib/virtio_guest.h's flags): count=N buffers (1..64, default 16),
 * len=N bytes each (16..4096, default 64), depth=N in flight at once (1..64, default 8),
 * rounds=N times over (default 1; each round zeroes, reads and checks the buffers again and,
 * when N > 1, prints "virtio-rng: round R ok": entropy that keeps coming).
 * Checks: each returned length is 1..len; no buffer all zeros or all one byte value (buffers
 * of 16 bytes or more); no two buffers alike over their common length; then prints a summary.
 * README.md gives the output and exit statuses. */
#include "bootparams.h"
#include "cmdline.h"
#include "cpl3.h"
#include "exit.h"
#include "print.h"
#include "serial.h"
#include "string.h"
#include "virtio_guest.h"

#define TAG "virtio-rng"
#define MAX_COUNT 64
#define MAX_LEN 4096
#define MIN_LEN 16
#define DMA_BASE (16ull << 20)
#define TIMEOUT_US 10000000ull

static struct virtio_dev dev;
static struct virtq vq;
static u32 got[MAX_COUNT];

static u8 *buf(unsigned i)
{
	return phys_ptr(DMA_BASE + (u64)i * MAX_LEN);
}

static bool uniform(const u8 *p, u32 n)
{
	for (u32 i = 1; i < n; i++)
		if (p[i] != p[0])
			return false;
	return true;
}

static void read_all(unsigned count, u32 len, unsigned depth, struct virtq_desc *ind)
{
	unsigned next = 0, done = 0, inflight = 0;
	bool indirect = dev.features & (1ull << VIRTIO_F_INDIRECT_DESC);

	while (done < count) {
		bool posted = false;
		while (inflight < depth && next < count && vq.num_free > 0) {
			struct vq_buf b = { (u64)(uintptr_t)buf(next), len, true };
			memset(buf(next), 0, len);
			if (!virtq_add(&vq, &b, 1, indirect ? &ind[next] : NULL, next)) {
				print(TAG ": queue full\n");
				debug_exit(VEXIT_SETUP);
			}
			next++;
			inflight++;
			posted = true;
		}
		if (posted)
			virtq_kick(&vq);
		u32 token, n;
		if (!virtq_wait(&vq, &token, &n, TIMEOUT_US)) {
			print(TAG ": no buffer back in time (%u of %u done)\n", done, count);
			debug_exit(VEXIT_TIMEOUT);
		}
		if (token >= count || n == 0 || n > len) {
			print(TAG ": buffer %u came back with %u bytes (asked %u)\n", token, n, len);
			debug_exit(VEXIT_IO);
		}
		got[token] = n;
		inflight--;
		done++;
	}
}

static unsigned check_all(unsigned count)
{
	unsigned bad = 0;
	for (unsigned i = 0; i < count; i++) {
		if (got[i] >= MIN_LEN && uniform(buf(i), got[i])) {
			print(TAG ": buffer %u is %u bytes of %#x\n", i, got[i], buf(i)[0]);
			bad++;
		}
		for (unsigned j = 0; j < i; j++) {
			u32 n = got[i] < got[j] ? got[i] : got[j];
			if (n >= MIN_LEN && memcmp(buf(i), buf(j), n) == 0) {
				print(TAG ": buffers %u and %u are alike\n", j, i);
				bad++;
			}
		}
	}
	return bad;
}

static NORETURN void rng_main(void *bp)
{
	static struct virtq_desc ind[MAX_COUNT] ALIGNED(16);
	const char *cmdline = bp_cmdline(bp);

	serial_init();
	print(TAG ": cmdline: %s\n", cmdline);
	u64 count = cmdline_u64(cmdline, "count", 16), len = cmdline_u64(cmdline, "len", 64);
	u64 depth = cmdline_u64(cmdline, "depth", 8);
	if (count < 1 || count > MAX_COUNT || len < MIN_LEN || len > MAX_LEN || depth < 1 ||
	    depth > MAX_COUNT) {
		print(TAG ": need 1 <= count <= %u, %u <= len <= %u, 1 <= depth <= %u\n", MAX_COUNT,
		      MIN_LEN, MAX_LEN, MAX_COUNT);
		debug_exit(VEXIT_ARGS);
	}
	virtio_guest_need_ram(bp, TAG, DMA_BASE, DMA_BASE + count * MAX_LEN);
	virtio_guest_open(bp, cmdline, TAG, VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_ENTROPY,
			  0x1005, 0, &dev);
	virtio_guest_print_features(&dev, TAG);
	if (!virtq_setup(&dev, &vq, 0, virtio_guest_qsize(cmdline))) {
		virtio_fail(&dev);
		debug_exit(VEXIT_SETUP);
	}
	virtio_driver_ok(&dev);
	print(TAG ": queue 0 size %u\n", vq.size);
	u64 rounds = cmdline_u64(cmdline, "rounds", 1);
	for (u64 r = 1; r < rounds; r++) {
		read_all((unsigned)count, (u32)len, (unsigned)depth, ind);
		unsigned bad = check_all((unsigned)count);
		if (bad) {
			print(TAG ": round %lu: %u checks failed\n", r, bad);
			debug_exit(VEXIT_DATA);
		}
		print(TAG ": round %lu ok\n", r);
	}
	read_all((unsigned)count, (u32)len, (unsigned)depth, ind);
	u64 total = 0;
	for (unsigned i = 0; i < count; i++)
		total += got[i];
	unsigned bad = check_all((unsigned)count);
	print(TAG ": %lu buffers, %lu bytes, first %02x%02x%02x%02x%02x%02x%02x%02x, notifies=%u\n",
	      count, total, buf(0)[0], buf(0)[1], buf(0)[2], buf(0)[3], buf(0)[4], buf(0)[5],
	      buf(0)[6], buf(0)[7], vq.notifies);
	if (bad) {
		print(TAG ": %u checks failed\n", bad);
		debug_exit(VEXIT_DATA);
	}
	print(TAG ": ok\n");
	debug_exit(VEXIT_OK);
}

/* The firmware flavour's command line before fw_cfg's (lib/fw_boot.c). */
extern const char fw_default_cmdline[];
const char fw_default_cmdline[] = "";

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(rng_main, (void *)boot_params);
}
