/* virtio-console: a polled driver for a modern virtio console (PCI 1af4:1043) written from the
 * virtio 1.2 specification, 5.3 "Console Device" (and lib/virtio_pci.c for 2.7, 3.1, 4.1).
 * It uses port 0 only, without VIRTIO_CONSOLE_F_MULTIPORT: receiveq0 (queue 0) and
 * transmitq0 (queue 1).  Everything after the switch runs at CPL3.
 *
 * Command line (besides lib/virtio_guest.h's assign= ecam= caps= move= indirect= event_idx=
 * qsize=):
 *   mode=echo|pattern|sink   (default echo)
 *   bytes=N      pattern: bytes to send; sink: bytes to receive (default 65536)
 *   chunk=N      pattern: bytes per transmit buffer (1..4096, default 1024)
 *   rxbuf=N      bytes per receive buffer (1..4096, default 64)
 *   timeout_s=T  echo/sink: give up when no byte came for T s (default 60, 0: never)
 *   emerg=1      negotiate VIRTIO_CONSOLE_F_EMERG_WRITE (if offered) and write one line
 *                through emerg_wr before the queues are used
 * Every mode first writes a greeting line on the console.  README.md gives the output, the
 * pattern and the exit statuses. */
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

#define TAG "virtio-console"
#define VIRTIO_ID_CONSOLE 3
#define TRANSITIONAL_ID 0x1003

/* 5.3.3 feature bits */
#define VIRTIO_CONSOLE_F_SIZE 0
#define VIRTIO_CONSOLE_F_MULTIPORT 1
#define VIRTIO_CONSOLE_F_EMERG_WRITE 2
/* 5.3.4 struct virtio_console_config */
#define CON_CFG_COLS 0
#define CON_CFG_ROWS 2
#define CON_CFG_EMERG_WR 8

#define RXQ 0 /* 5.3.2: receiveq(port0) */
#define TXQ 1 /* transmitq(port0) */
#define SLOT 4096u
#define DMA_BASE (16ull << 20)
#define RX_BASE DMA_BASE                  /* receive buffer i at RX_BASE + i * SLOT */
#define TX_BASE (DMA_BASE + (1ull << 20)) /* transmit slot i at TX_BASE + i * SLOT */
#define DMA_END (DMA_BASE + (2ull << 20))
#define MAX_LINE 256
#define TX_WAIT_US 10000000ull
#define S 1000000ul
#define FOREVER_US (1ull << 40) /* 12 days */
#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull
#define GREETING "virtio-console: hello from the console guest\n"

static struct virtio_dev dev;
static struct virtq rxq, txq;
static struct vq_slots tx;
static u32 rxbuf;
static u64 rx_bytes, tx_bytes;

static NORETURN void fail(u8 value)
{
	virtio_fail(&dev);
	debug_exit(value);
}

/* ---- the pattern: 64-byte lines, 63 characters from a 64-character alphabet and "\n" ---- */

static u8 pattern_byte(u64 i)
{
	static const char alphabet[] =
		"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/";
	if (i % 64 == 63)
		return '\n';
	return (u8)alphabet[(i / 64 + i % 64) % 64];
}

static u64 fnv1a(u64 h, const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++)
		h = (h ^ p[i]) * FNV_PRIME;
	return h;
}

/* ---- queues ---- */

static u8 *rx_buf(unsigned i)
{
	return phys_ptr(RX_BASE + (u64)i * SLOT);
}

static u8 *tx_slot(unsigned i)
{
	return phys_ptr(TX_BASE + (u64)i * SLOT);
}

static void rx_post(unsigned i)
{
	struct vq_buf b = { (u64)(uintptr_t)rx_buf(i), rxbuf, true };
	if (!virtq_add(&rxq, &b, 1, NULL, i)) {
		print(TAG ": receive queue has no room for buffer %u\n", i);
		fail(VEXIT_IO);
	}
}

static unsigned tx_get(void)
{
	return vq_slots_get(&txq, &tx, TAG, TX_WAIT_US);
}

/* Queues `n` bytes (at most SLOT) for the host; kicks when `kick`. */
static void con_write(const void *p, u32 n, bool kick)
{
	unsigned i = tx_get();
	memcpy(tx_slot(i), p, n);
	struct vq_buf b = { (u64)(uintptr_t)tx_slot(i), n, false };
	if (!virtq_add(&txq, &b, 1, NULL, i)) {
		print(TAG ": transmit queue has no room for slot %u\n", i);
		fail(VEXIT_IO);
	}
	tx_bytes += n;
	if (kick)
		virtq_kick(&txq);
}

static void con_puts(const char *s)
{
	con_write(s, (u32)strlen(s), true);
}

/* Waits until the device has taken every transmit buffer. */
static void tx_drain(void)
{
	vq_slots_drain(&txq, &tx, TAG, TX_WAIT_US);
}

/* Waits for one filled receive buffer; returns its slot and sets *len, or returns -1 after
 * `timeout_us` (0: never) without one.  The caller re-posts it with rx_post. */
static int con_read(u32 *len, u64 timeout_us)
{
	u32 token;
	if (!virtq_wait(&rxq, &token, len, timeout_us ? timeout_us : FOREVER_US))
		return -1;
	if (token >= rxq.size || *len > rxbuf) {
		print(TAG ": receive buffer %u came back with %u bytes (posted %u)\n", token, *len,
		      rxbuf);
		fail(VEXIT_IO);
	}
	rx_bytes += *len;
	return (int)token;
}

/* ---- modes ---- */

static void print_printable(const char *s, u32 n)
{
	for (u32 i = 0; i < n; i++)
		serial_putc(s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?');
}

static void mode_echo(u64 timeout_us)
{
	static char line[MAX_LINE];
	static char out[MAX_LINE + 8];
	u32 n = 0, lines = 0;
	print(TAG ": echo: waiting for lines (\"quit\" ends)\n");
	for (;;) {
		u32 len;
		int slot = con_read(&len, timeout_us);
		if (slot < 0) {
			print(TAG ": echo: no input for %lu s (%u lines echoed)\n", timeout_us / S,
			      lines);
			fail(VEXIT_TIMEOUT);
		}
		const u8 *b = rx_buf((unsigned)slot);
		for (u32 k = 0; k < len; k++) {
			char c = (char)b[k];
			if (c != '\n' && n < MAX_LINE - 1) {
				line[n++] = c;
				continue;
			}
			if (c != '\n')
				line[n++] = c; /* a full line without "\n" goes out as it is */
			else if (n && line[n - 1] == '\r')
				n--; /* a terminal's "\r\n" */
			lines++;
			print(TAG ": echo: line %u \"", lines);
			print_printable(line, n);
			print("\"\n");
			if (n == 4 && memcmp(line, "quit", 4) == 0) {
				con_puts("bye\n");
				tx_drain();
				print(TAG ": echo: %u lines, rx_bytes=%lu tx_bytes=%lu\n", lines,
				      rx_bytes, tx_bytes);
				return;
			}
			memcpy(out, "echo: ", 6);
			memcpy(out + 6, line, n);
			out[6 + n] = '\n';
			con_write(out, 7 + n, true);
			n = 0;
		}
		rx_post((unsigned)slot);
		virtq_kick(&rxq);
	}
}

static void mode_pattern(u64 bytes, u32 chunk)
{
	static u8 buf[SLOT];
	static char line[96];
	u64 h = FNV_OFFSET, t0 = rdtsc();
	for (u64 off = 0; off < bytes; off += chunk) {
		u32 n = bytes - off < chunk ? (u32)(bytes - off) : chunk;
		for (u32 k = 0; k < n; k++)
			buf[k] = pattern_byte(off + k);
		h = fnv1a(h, buf, n);
		con_write(buf, n, false);
		if (tx.nfree == 0)
			virtq_kick(&txq);
	}
	tx_drain();
	u64 ticks = rdtsc() - t0;
	/* The checksum line, on the console and on COM1 alike. */
	u32 n = (u32)format(line, sizeof(line), "pattern: %lu bytes fnv1a=%016lx\n", bytes, h);
	con_write(line, n, true);
	tx_drain();
	print(TAG ": pattern: %lu bytes fnv1a=%016lx ticks=%lu notifies=%u\n", bytes, h, ticks,
	      txq.notifies);
}

static void mode_sink(u64 bytes, u64 timeout_us)
{
	u64 got = 0, h = FNV_OFFSET, bad = 0;
	print(TAG ": sink: waiting for %lu bytes\n", bytes);
	while (got < bytes) {
		u32 len;
		int slot = con_read(&len, timeout_us);
		if (slot < 0) {
			print(TAG ": sink: %lu of %lu bytes, then nothing for %lu s\n", got, bytes,
			      timeout_us / S);
			fail(VEXIT_TIMEOUT);
		}
		const u8 *b = rx_buf((unsigned)slot);
		if (got + len > bytes)
			len = (u32)(bytes - got); /* what follows is not the pattern's */
		for (u32 k = 0; k < len; k++) {
			if (b[k] != pattern_byte(got + k) && bad++ < 4)
				print(TAG ": sink: byte %lu is %#x, want %#x\n", got + k, b[k],
				      pattern_byte(got + k));
		}
		h = fnv1a(h, b, len);
		got += len;
		rx_post((unsigned)slot);
		virtq_kick(&rxq);
	}
	print(TAG ": sink: %lu bytes fnv1a=%016lx bad=%lu\n", got, h, bad);
	if (bad)
		fail(VEXIT_DATA);
	con_puts("sink: ok\n");
	tx_drain();
}

/* ---- set-up ---- */

static void emergency_write(void)
{
	/* 5.3.4: a driver writes one character to emerg_wr, before or without the queues. */
	const char *s = "virtio-console: emergency write\n";
	for (; *s; s++)
		mmio_write32(dev.r[VIRTIO_PCI_CAP_DEVICE_CFG].addr + CON_CFG_EMERG_WR, (u8)*s);
	print(TAG ": wrote a line through emerg_wr\n");
}

static NORETURN void console_main(void *bp)
{
	const char *cmdline = bp_cmdline(bp);
	serial_init();
	print(TAG ": cmdline: %s\n", cmdline);
	bool echo = !cmdline_find(cmdline, "mode", &(const char *){ 0 }, &(size_t){ 0 }) ||
		    cmdline_is(cmdline, "mode", "echo");
	bool pattern = cmdline_is(cmdline, "mode", "pattern");
	bool sink = cmdline_is(cmdline, "mode", "sink");
	u64 bytes = cmdline_size(cmdline, "bytes", 65536), chunk = cmdline_u64(cmdline, "chunk", 1024);
	u64 rx = cmdline_u64(cmdline, "rxbuf", 64);
	u64 timeout_us = cmdline_u64(cmdline, "timeout_s", 60) * S;
	if (!echo && !pattern && !sink) {
		print(TAG ": mode= must be echo, pattern or sink\n");
		debug_exit(VEXIT_ARGS);
	}
	if (chunk < 1 || chunk > SLOT || rx < 1 || rx > SLOT || bytes < 1) {
		print(TAG ": need 1 <= chunk <= %u, 1 <= rxbuf <= %u, bytes >= 1\n", SLOT, SLOT);
		debug_exit(VEXIT_ARGS);
	}
	rxbuf = (u32)rx;
	virtio_guest_need_ram(bp, TAG, DMA_BASE, DMA_END);
	u64 wanted = 1ull << VIRTIO_CONSOLE_F_SIZE;
	if (cmdline_u64(cmdline, "emerg", 0))
		wanted |= 1ull << VIRTIO_CONSOLE_F_EMERG_WRITE;
	virtio_guest_open(bp, cmdline, TAG, VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_CONSOLE,
			  TRANSITIONAL_ID, wanted, &dev);
	virtio_guest_print_features(&dev, TAG);
	if (dev.features & (1ull << VIRTIO_CONSOLE_F_SIZE))
		print(TAG ": size cols=%lu rows=%lu\n", virtio_config_read(&dev, CON_CFG_COLS, 2),
		      virtio_config_read(&dev, CON_CFG_ROWS, 2));
	else
		print(TAG ": size not offered\n");
	if (dev.features & (1ull << VIRTIO_CONSOLE_F_EMERG_WRITE))
		emergency_write();
	u16 qsize = virtio_guest_qsize(cmdline);
	if (!virtq_setup(&dev, &rxq, RXQ, qsize) || !virtq_setup(&dev, &txq, TXQ, qsize))
		fail(VEXIT_SETUP);
	vq_slots_init(&tx, txq.size);
	virtio_driver_ok(&dev);
	for (unsigned i = 0; i < rxq.size; i++)
		rx_post(i);
	virtq_kick(&rxq);
	print(TAG ": rxq size %u buffers of %u bytes, txq size %u\n", rxq.size, rxbuf, txq.size);
	con_puts(GREETING);
	tx_drain();
	print(TAG ": greeting sent\n");

	if (echo)
		mode_echo(timeout_us);
	else if (pattern)
		mode_pattern(bytes, (u32)chunk);
	else
		mode_sink(bytes, timeout_us);
	print(TAG ": isr=%#x status=%#x\n", virtio_isr(&dev), virtio_status(&dev));
	print(TAG ": ok\n");
	debug_exit(VEXIT_OK);
}

/* The firmware flavour's command line before fw_cfg's (lib/fw_boot.c). */
extern const char fw_default_cmdline[];
const char fw_default_cmdline[] = "";

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_main(const void *boot_params)
{
	cpl3_enter(console_main, (void *)boot_params);
}
