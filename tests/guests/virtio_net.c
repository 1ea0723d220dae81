/* virtio-net: a polled driver for a modern virtio network device (PCI 1af4:1041) written from
 * the virtio 1.2 specification, 5.1 "Network Device" (and lib/virtio_pci.c for 2.7, 3.1, 4.1),
 * with just enough Ethernet, ARP (RFC 826), IPv4 (RFC 791), ICMP echo (RFC 792) and UDP
 * (RFC 768) to exchange frames with a host.  Everything after the switch runs at CPL3.
 *
 * Command line (besides lib/virtio_guest.h's assign= ecam= caps= move= indirect= event_idx=
 * qsize=):
 *   mode=ping|udp-echo|burst|sink|link   (default ping)
 *   ip=A.B.C.D        this guest's address (default 10.0.2.15)
 *   peer_ip=A.B.C.D   the host side (default 10.0.2.2)
 *   port=P            UDP port: udp-echo and sink listen on it, burst sends to it (default 7)
 *   count=N           ping: echo requests (default 4); udp-echo: datagrams to echo before
 *                     ending (default 0: until a byte arrives on COM1); burst: datagrams to
 *                     send, sink: to receive (default 1000)
 *   size=S            ping: ICMP payload bytes (default 56); burst: UDP payload bytes
 *                     (default 1472); 8..1472
 *   mrg_rxbuf=1       negotiate VIRTIO_NET_F_MRG_RXBUF (if offered) and post small buffers
 *   rxbuf=B           bytes per receive buffer, header included (default 1526; 128 with
 *                     mrg_rxbuf, at least 12 then)
 *   csum=1            negotiate VIRTIO_NET_F_CSUM: ICMP and UDP frames go out with
 *                     VIRTIO_NET_HDR_F_NEEDS_CSUM and a partial checksum
 *   guest_csum=1      negotiate VIRTIO_NET_F_GUEST_CSUM (frames marked NEEDS_CSUM are taken
 *                     without checking their L4 checksum)
 *   txsplit=1         send the header and the frame in two descriptors (default one)
 *   strict=1          fail (exit 0x04) on num_buffers != 1 without MRG_RXBUF, a rule some
 *                     devices predate (QEMU 7.2 leaves 0); otherwise only counted
 *   batch=N           burst: frames per notify (default 32)
 *   hold_ms=M         sink: after the first datagram, take nothing from the receive ring for
 *                     M ms, so that a burst larger than the ring must wait in the device
 *   idle_ms=M         sink: end when no datagram came for M ms once one has (default 3000)
 *   wait_s=W          udp-echo/sink: give up when nothing arrives in W s (default 60, 0: never);
 *                     link: when the link does not change in W s
 * mode=link follows the link the host takes down and up (5.1.4 VIRTIO_NET_S_LINK_UP): count=N
 * changes (default 2), each with its configuration interrupt's ISR bit (4.1.4.5); while it is
 * down an ARP request's buffer comes back and no reply does, once it is up again a ping works.
 * README.md gives each mode's output, the payload patterns and the exit statuses. */
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

#define TAG "virtio-net"
#define VIRTIO_ID_NET 1
#define TRANSITIONAL_ID 0x1000

/* 5.1.3 feature bits */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
/* 5.1.4 struct virtio_net_config */
#define NET_CFG_MAC 0
#define NET_CFG_STATUS 6
#define VIRTIO_NET_S_LINK_UP 1
/* 4.1.4.5 ISR status: a device configuration change */
#define VIRTIO_ISR_CONFIG 2
/* 5.1.6 struct virtio_net_hdr */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_GSO_NONE 0

/* Exit values beyond lib/virtio_guest.h's (host status (V << 1) | 1). */
#define VEXIT_LINK 9  /* 19: VIRTIO_NET_S_LINK_UP never came */
#define VEXIT_ARP 10  /* 21: the peer never answered ARP */

#define RXQ 0 /* 5.1.2: receiveq1 */
#define TXQ 1 /* transmitq1 */
#define SLOT 2048u
#define DMA_BASE (16ull << 20)
#define RX_BASE DMA_BASE                  /* receive buffer i at RX_BASE + i * SLOT */
#define TX_BASE (DMA_BASE + (1ull << 20)) /* transmit slot i at TX_BASE + i * SLOT */
#define DMA_END (DMA_BASE + (2ull << 20))
#define ETH_HLEN 14
#define ETH_FRAME_MAX 1514 /* without FCS */
#define IP_HLEN 20
#define UDP_HLEN 8
#define ICMP_HLEN 8
#define PAYLOAD_MAX (ETH_FRAME_MAX - ETH_HLEN - IP_HLEN - UDP_HLEN) /* 1472 */
#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_ARP 0x0806
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO 8
#define PING_ID 0x5356 /* "SV" */
#define ARP_TRIES 5
#define ARP_WAIT_US 1000000ull
#define PING_WAIT_US 2000000ull
#define TX_WAIT_US 5000000ull
#define LINK_QUIET_US 300000ull /* link down: how long no ARP reply must come */
#define INPUT_POLL_US 10000ull
#define REPOST_BATCH 32
#define MS 1000ul
#define S 1000000ul

struct virtio_net_hdr {
	u8 flags;
	u8 gso_type;
	u16 hdr_len;
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
	u16 num_buffers; /* always there with VIRTIO_F_VERSION_1 */
} PACKED;

#define NET_HDR_LEN ((u32)sizeof(struct virtio_net_hdr)) /* 12 */

static struct virtio_dev dev;
static struct virtq rxq, txq;

static struct {
	u8 mac[6];
	u32 ip, peer_ip;
	u8 peer_mac[6];
	bool peer_known;
	u32 rxbuf;
	bool mrg, csum, guest_csum, txsplit, strict;
	u64 tsc_khz;
} cfg;

static struct {
	u64 rx_frames, rx_bytes, tx_frames, tx_bytes;
	u64 merged;      /* frames that took more than one receive buffer */
	u64 arp_answered, icmp_answered;
	u64 ignored;     /* not for us, or a protocol we do not speak */
	u64 bad_csum;    /* IPv4/ICMP/UDP checksum wrong */
	u64 hdr_errors;  /* the device broke a 5.1.6.4 rule (flags, gso_type) */
	u64 num_buffers_not_1; /* without MRG_RXBUF (see rx_frame) */
	u64 rx_partial;  /* NEEDS_CSUM frames taken unchecked (guest_csum=1) */
	u64 tx_partial;  /* frames sent with NEEDS_CSUM */
	u64 rx_notifies_before;
} st;

static u8 frame[ETH_FRAME_MAX + SLOT]; /* one received frame, reassembled */
static struct virtio_net_hdr frame_hdr;
static struct vq_slots tx;
static unsigned reposted;

static NORETURN void fail(u8 value)
{
	virtio_fail(&dev);
	debug_exit(value);
}

/* ---- byte order and checksums (RFC 1071) ---- */

static u16 get16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static u32 get32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static void put32(u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

static u64 csum_add(u64 sum, const u8 *p, u32 n)
{
	for (; n > 1; n -= 2, p += 2)
		sum += get16(p);
	if (n)
		sum += (u16)(p[0] << 8);
	return sum;
}

/* The one's complement sum folded to 16 bits (not inverted). */
static u16 csum_fold(u64 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}

/* The UDP pseudo-header's sum (RFC 768). */
static u64 pseudo_sum(u32 src, u32 dst, u16 udp_len)
{
	return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + IPPROTO_UDP + udp_len;
}

/* ---- command line ---- */

static bool parse_ip(const char *cmdline, const char *key, u32 fallback, u32 *out)
{
	const char *v;
	size_t len;
	if (!cmdline_find(cmdline, key, &v, &len)) {
		*out = fallback;
		return true;
	}
	u32 ip = 0;
	const char *p = v, *end = v + len;
	for (int part = 0; part < 4; part++) {
		const char *start = p;
		while (p < end && *p != '.')
			p++;
		u64 b;
		if (!parse_u64(start, (size_t)(p - start), &b) || b > 255)
			return false;
		ip = ip << 8 | (u32)b;
		if (part < 3) {
			if (p == end)
				return false;
			p++;
		}
	}
	*out = ip;
	return p == end;
}

static void print_ip(u32 ip)
{
	print("%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

static void print_mac(const u8 *m)
{
	print("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* ---- receive (5.1.6.3, 5.1.6.4) ---- */

static u8 *rx_buf(unsigned i)
{
	return phys_ptr(RX_BASE + (u64)i * SLOT);
}

static void rx_post(unsigned i)
{
	struct vq_buf b = { (u64)(uintptr_t)rx_buf(i), cfg.rxbuf, true };
	if (!virtq_add(&rxq, &b, 1, NULL, i)) {
		print(TAG ": receive queue has no room for buffer %u\n", i);
		fail(VEXIT_IO);
	}
	if (++reposted >= REPOST_BATCH) {
		virtq_kick(&rxq);
		reposted = 0;
	}
}

static void rx_flush(void)
{
	virtq_kick(&rxq);
	reposted = 0;
}

static bool rx_wait(u32 *token, u32 *len)
{
	if (!virtq_wait(&rxq, token, len, PING_WAIT_US)) {
		print(TAG ": a merged frame's next buffer never came (used idx %u)\n",
		      *(volatile u16 *)&rxq.used->idx);
		fail(VEXIT_IO);
	}
	return true;
}

static void rx_check_len(u32 token, u32 len)
{
	if (token >= rxq.size || len > cfg.rxbuf) {
		print(TAG ": receive buffer %u came back with %u bytes (posted %u)\n", token, len,
		      cfg.rxbuf);
		fail(VEXIT_IO);
	}
}

/* Takes one frame from the receive ring into `frame` (buffers re-posted at once); returns its
 * length, or 0 when none is waiting. */
static u32 rx_frame(void)
{
	u32 token, len;
	if (!virtq_poll(&rxq, &token, &len)) {
		if (reposted)
			rx_flush();
		return 0;
	}
	rx_check_len(token, len);
	if (len < NET_HDR_LEN) {
		print(TAG ": receive buffer %u holds %u bytes, less than the header\n", token, len);
		fail(VEXIT_IO);
	}
	memcpy(&frame_hdr, rx_buf(token), NET_HDR_LEN);
	u32 n = len - NET_HDR_LEN;
	memcpy(frame, rx_buf(token) + NET_HDR_LEN, n);
	rx_post(token);
	u16 nbuf = frame_hdr.num_buffers;
	if (cfg.mrg) {
		if (nbuf == 0 || (u64)nbuf * cfg.rxbuf > sizeof(frame) + NET_HDR_LEN) {
			print(TAG ": num_buffers %u with %u-byte buffers\n", nbuf, cfg.rxbuf);
			fail(VEXIT_IO);
		}
		/* 5.1.6.4: the frame continues in the next num_buffers - 1 used buffers. */
		for (u16 k = 1; k < nbuf; k++) {
			rx_wait(&token, &len);
			rx_check_len(token, len);
			memcpy(frame + n, rx_buf(token), len);
			n += len;
			rx_post(token);
		}
		if (nbuf > 1)
			st.merged++;
	} else if (nbuf != 1) {
		/* 5.1.6.4.1: the device MUST set it to 1 without MRG_RXBUF.  Devices written before
		 * that rule leave 0 (QEMU 7.2, vhost-net before 2025): a failure only with strict=1. */
		st.num_buffers_not_1++;
	}
	if ((frame_hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !cfg.guest_csum)
		st.hdr_errors++; /* flags must be 0 without GUEST_CSUM */
	if (frame_hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE)
		st.hdr_errors++; /* no GUEST_TSO or UFO negotiated */
	st.rx_frames++;
	st.rx_bytes += n;
	return n;
}

/* ---- transmit (5.1.6.2) ---- */

static u8 *tx_slot(unsigned i)
{
	return phys_ptr(TX_BASE + (u64)i * SLOT);
}

static unsigned tx_get(void)
{
	return vq_slots_get(&txq, &tx, TAG, TX_WAIT_US);
}

/* Queues slot i's frame of `len` bytes; `l4_csum` is the checksum field's offset in the L4
 * header (0: none to offload).  With CSUM negotiated the L4 checksum is left partial. */
static void tx_queue(unsigned i, u32 len, u32 l4_csum, bool kick)
{
	u8 *p = tx_slot(i);
	struct virtio_net_hdr h = { .gso_type = VIRTIO_NET_HDR_GSO_NONE };
	if (cfg.csum && l4_csum) {
		h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
		h.csum_start = ETH_HLEN + IP_HLEN;
		h.csum_offset = (u16)l4_csum;
		st.tx_partial++;
	}
	memcpy(p, &h, NET_HDR_LEN);
	struct vq_buf b[2] = { { (u64)(uintptr_t)p, NET_HDR_LEN + len, false } };
	unsigned n = 1;
	if (cfg.txsplit) {
		b[0].len = NET_HDR_LEN;
		b[1] = (struct vq_buf){ (u64)(uintptr_t)p + NET_HDR_LEN, len, false };
		n = 2;
	}
	if (!virtq_add(&txq, b, n, NULL, i)) {
		print(TAG ": transmit queue has no room for slot %u\n", i);
		fail(VEXIT_IO);
	}
	st.tx_frames++;
	st.tx_bytes += len;
	if (kick)
		virtq_kick(&txq);
}

static void tx_drain(void)
{
	vq_slots_drain(&txq, &tx, TAG, TX_WAIT_US);
}

/* ---- building frames ---- */

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, cfg.mac, 6);
	put16(f + 12, type);
}

static void ip_header(u8 *ip, u32 dst, u8 proto, u16 payload_len)
{
	static u16 ident;
	ip[0] = 0x45; /* version 4, 5 words */
	ip[1] = 0;
	put16(ip + 2, (u16)(IP_HLEN + payload_len));
	put16(ip + 4, ident++);
	put16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, cfg.ip);
	put32(ip + 16, dst);
	put16(ip + 10, (u16)~csum_fold(csum_add(0, ip, IP_HLEN)));
}

/* Fills in the ICMP checksum, or leaves it for the device (it covers no pseudo-header). */
static void icmp_finish(u8 *icmp, u32 len)
{
	put16(icmp + 2, 0);
	if (!cfg.csum)
		put16(icmp + 2, (u16)~csum_fold(csum_add(0, icmp, len)));
}

static void udp_finish(u8 *udp, u32 dst, u16 len)
{
	u64 pseudo = pseudo_sum(cfg.ip, dst, len);
	put16(udp + 6, 0);
	if (cfg.csum) {
		/* 5.1.6.2: the device sums from csum_start and stores at csum_offset; the field
		 * starts as the pseudo-header's sum. */
		put16(udp + 6, csum_fold(pseudo));
		return;
	}
	u16 c = (u16)~csum_fold(csum_add(pseudo, udp, len));
	put16(udp + 6, c ? c : 0xffff); /* RFC 768: 0 means "no checksum" */
}

static void send_arp(u16 op, const u8 *dst_mac, const u8 *target_mac, u32 target_ip)
{
	static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	unsigned i = tx_get();
	u8 *f = tx_slot(i) + NET_HDR_LEN, *a = f + ETH_HLEN;
	eth_header(f, dst_mac ? dst_mac : broadcast, ETHERTYPE_ARP);
	put16(a, 1);              /* Ethernet */
	put16(a + 2, ETHERTYPE_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, cfg.mac, 6);
	put32(a + 14, cfg.ip);
	memset(a + 18, 0, 6);
	if (target_mac)
		memcpy(a + 18, target_mac, 6);
	put32(a + 24, target_ip);
	memset(a + 28, 0, 60 - ETH_HLEN - 28); /* pad to the 60-byte minimum */
	tx_queue(i, 60, 0, true);
}

/* Slot i gets an IPv4/UDP frame to dst_mac/dst:dport from port sport; returns its length. */
static u32 build_udp(unsigned i, const u8 *dst_mac, u32 dst, u16 sport, u16 dport,
		     const u8 *payload, u32 len)
{
	u8 *f = tx_slot(i) + NET_HDR_LEN, *ip = f + ETH_HLEN, *udp = ip + IP_HLEN;
	eth_header(f, dst_mac, ETHERTYPE_IP);
	ip_header(ip, dst, IPPROTO_UDP, (u16)(UDP_HLEN + len));
	put16(udp, sport);
	put16(udp + 2, dport);
	put16(udp + 4, (u16)(UDP_HLEN + len));
	if (payload)
		memcpy(udp + UDP_HLEN, payload, len);
	udp_finish(udp, dst, (u16)(UDP_HLEN + len));
	return ETH_HLEN + IP_HLEN + UDP_HLEN + len;
}

/* ---- the patterns ---- */

/* Ping: byte j of the payload of echo request `seq`. */
static u8 ping_byte(u16 seq, u32 j)
{
	return (u8)(j * 7 + seq);
}

/* Burst and sink datagrams: a little-endian u64 sequence number, then byte j = seq + j. */
static void udp_pattern(u8 *p, u64 seq, u32 len)
{
	for (u32 j = 0; j < 8; j++)
		p[j] = (u8)(seq >> (8 * j));
	for (u32 j = 8; j < len; j++)
		p[j] = (u8)(seq + j);
}

static bool udp_pattern_ok(const u8 *p, u32 len, u64 *seq)
{
	if (len < 8)
		return false;
	u64 s = 0;
	for (u32 j = 0; j < 8; j++)
		s |= (u64)p[j] << (8 * j);
	*seq = s;
	for (u32 j = 8; j < len; j++)
		if (p[j] != (u8)(s + j))
			return false;
	return true;
}

/* ---- receiving: what each frame is ---- */

struct udp_in {
	const u8 *src_mac;
	u32 src_ip;
	u16 sport, dport;
	const u8 *data;
	u32 len;
};

static struct {
	u16 want_seq;     /* ping: the echo reply awaited */
	bool got;
	bool bad;         /* its payload was wrong */
	u8 ttl;
	struct udp_in udp;
	bool udp_got;
} in;

static void on_arp(const u8 *a, u32 len)
{
	if (len < 28 || get16(a) != 1 || get16(a + 2) != ETHERTYPE_IP || a[4] != 6 || a[5] != 4) {
		st.ignored++;
		return;
	}
	u16 op = get16(a + 6);
	u32 sender = get32(a + 14), target = get32(a + 24);
	if (sender == cfg.peer_ip && (op == 1 || op == 2)) {
		memcpy(cfg.peer_mac, a + 8, 6);
		cfg.peer_known = true;
	}
	if (op == 1 && target == cfg.ip) {
		send_arp(2, a + 8, a + 8, sender);
		st.arp_answered++;
	} else if (op != 2) {
		st.ignored++;
	}
}

static void on_icmp(const u8 *src_mac, const u8 *ip, const u8 *icmp, u32 len)
{
	if (len < ICMP_HLEN) {
		st.ignored++;
		return;
	}
	bool partial = frame_hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM;
	if (!partial && csum_fold(csum_add(0, icmp, len)) != 0xffff) {
		st.bad_csum++;
		return;
	}
	if (icmp[0] == ICMP_ECHO && icmp[1] == 0) {
		/* Answer pings too, so the host side can ping this guest. */
		if (len > PAYLOAD_MAX + UDP_HLEN)
			return;
		unsigned i = tx_get();
		u8 *f = tx_slot(i) + NET_HDR_LEN, *rip = f + ETH_HLEN, *r = rip + IP_HLEN;
		eth_header(f, src_mac, ETHERTYPE_IP);
		ip_header(rip, get32(ip + 12), IPPROTO_ICMP, (u16)len);
		memcpy(r, icmp, len);
		r[0] = ICMP_ECHO_REPLY;
		icmp_finish(r, len);
		tx_queue(i, ETH_HLEN + IP_HLEN + len, 2, true);
		st.icmp_answered++;
		return;
	}
	if (icmp[0] != ICMP_ECHO_REPLY || get16(icmp + 4) != PING_ID ||
	    get16(icmp + 6) != in.want_seq || in.got) {
		st.ignored++;
		return;
	}
	in.got = true;
	in.ttl = ip[8];
	for (u32 j = 0; j < len - ICMP_HLEN; j++)
		if (icmp[ICMP_HLEN + j] != ping_byte(in.want_seq, j))
			in.bad = true;
}

static void on_udp(const u8 *src_mac, const u8 *ip, const u8 *udp, u32 len)
{
	if (len < UDP_HLEN || get16(udp + 4) < UDP_HLEN || get16(udp + 4) > len) {
		st.ignored++;
		return;
	}
	len = get16(udp + 4);
	bool partial = frame_hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM;
	if (get16(udp + 6) != 0 && !partial &&
	    csum_fold(csum_add(pseudo_sum(get32(ip + 12), get32(ip + 16), (u16)len), udp, len)) !=
		    0xffff) {
		st.bad_csum++;
		return;
	}
	in.udp = (struct udp_in){ src_mac, get32(ip + 12), get16(udp), get16(udp + 2),
				  udp + UDP_HLEN, len - UDP_HLEN };
	in.udp_got = true;
}

static void on_ipv4(const u8 *src_mac, const u8 *ip, u32 len)
{
	if (len < IP_HLEN || ip[0] >> 4 != 4 || (ip[0] & 0xf) * 4u < IP_HLEN ||
	    get16(ip + 2) > len || get32(ip + 16) != cfg.ip) {
		st.ignored++;
		return;
	}
	u32 ihl = (ip[0] & 0xfu) * 4, total = get16(ip + 2);
	if (total < ihl || csum_fold(csum_add(0, ip, ihl)) != 0xffff) {
		st.bad_csum++;
		return;
	}
	if (get16(ip + 6) & 0x3fff) { /* MF or a fragment offset: no reassembly here */
		st.ignored++;
		return;
	}
	if (frame_hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
		st.rx_partial++;
	if (ip[9] == IPPROTO_ICMP)
		on_icmp(src_mac, ip, ip + ihl, total - ihl);
	else if (ip[9] == IPPROTO_UDP)
		on_udp(src_mac, ip, ip + ihl, total - ihl);
	else
		st.ignored++;
}

/* Receives and handles one frame if one is waiting; returns false when none was. */
static bool net_poll(void)
{
	u32 n = rx_frame();
	if (!n)
		return false;
	if (n < ETH_HLEN) {
		st.ignored++;
		return true;
	}
	bool to_us = memcmp(frame, cfg.mac, 6) == 0, broadcast = true;
	for (int k = 0; k < 6; k++)
		broadcast &= frame[k] == 0xff;
	if (!to_us && !broadcast) {
		st.ignored++;
		return true;
	}
	u16 type = get16(frame + 12);
	if (type == ETHERTYPE_ARP)
		on_arp(frame + ETH_HLEN, n - ETH_HLEN);
	else if (type == ETHERTYPE_IP && to_us)
		on_ipv4(frame + 6, frame + ETH_HLEN, n - ETH_HLEN);
	else
		st.ignored++;
	return true;
}

/* ---- modes ---- */

static u64 ticks_to_us(u64 ticks)
{
	return cfg.tsc_khz ? ticks * 1000 / cfg.tsc_khz : 0;
}

/* "frames_s=X mib_s=Y.Z" for `frames` frames of `bytes` bytes in all over `ticks`. */
static void print_rate(u64 frames, u64 bytes, u64 ticks)
{
	u64 us = ticks_to_us(ticks);
	if (!us) {
		print(" ticks=%lu\n", ticks);
		return;
	}
	u64 tenths = bytes * 10 * S / us / (1ull << 20);
	print(" ticks=%lu us=%lu frames_s=%lu mib_s=%lu.%lu\n", ticks, us, frames * S / us,
	      tenths / 10, tenths % 10);
}

static void resolve_peer(void)
{
	for (int t = 0; t < ARP_TRIES && !cfg.peer_known; t++) {
		send_arp(1, NULL, NULL, cfg.peer_ip);
		u64 deadline = tsc_deadline(ARP_WAIT_US);
		while (!cfg.peer_known && !tsc_passed(deadline))
			net_poll();
	}
	if (!cfg.peer_known) {
		print(TAG ": no ARP reply from ");
		print_ip(cfg.peer_ip);
		print(" after %u requests\n", ARP_TRIES);
		fail(VEXIT_ARP);
	}
	print(TAG ": arp ");
	print_ip(cfg.peer_ip);
	print(" is at ");
	print_mac(cfg.peer_mac);
	print("\n");
}

static void mode_ping(u64 count, u64 size)
{
	u64 lost = 0, bad = 0;
	resolve_peer();
	for (u16 seq = 1; seq <= count; seq++) {
		unsigned i = tx_get();
		u8 *f = tx_slot(i) + NET_HDR_LEN, *ip = f + ETH_HLEN, *icmp = ip + IP_HLEN;
		u32 len = ICMP_HLEN + (u32)size;
		eth_header(f, cfg.peer_mac, ETHERTYPE_IP);
		ip_header(ip, cfg.peer_ip, IPPROTO_ICMP, (u16)len);
		icmp[0] = ICMP_ECHO;
		icmp[1] = 0;
		put16(icmp + 4, PING_ID);
		put16(icmp + 6, seq);
		for (u32 j = 0; j < size; j++)
			icmp[ICMP_HLEN + j] = ping_byte(seq, j);
		icmp_finish(icmp, len);
		in.want_seq = seq;
		in.got = in.bad = false;
		u64 t0 = rdtsc(), deadline = tsc_deadline(PING_WAIT_US);
		tx_queue(i, ETH_HLEN + IP_HLEN + len, 2, true);
		while (!in.got && !tsc_passed(deadline))
			net_poll();
		u64 rtt = rdtsc() - t0;
		if (!in.got) {
			print(TAG ": ping seq=%u timed out\n", seq);
			lost++;
			continue;
		}
		print(TAG ": ping seq=%u bytes=%lu ttl=%u %s rtt_us=%lu\n", seq, size, in.ttl,
		      in.bad ? "payload mismatch" : "ok", ticks_to_us(rtt));
		bad += in.bad;
	}
	print(TAG ": ping sent=%lu received=%lu lost=%lu bad=%lu\n", count, count - lost, lost,
	      bad);
	if (bad)
		fail(VEXIT_DATA);
	if (lost)
		fail(VEXIT_TIMEOUT);
}

static u16 link_status(void)
{
	return (u16)virtio_config_read(&dev, NET_CFG_STATUS, 2);
}

static void mode_link(u64 count, u64 wait_us)
{
	bool up = link_status() & VIRTIO_NET_S_LINK_UP;
	print(TAG ": link ready, %s\n", up ? "up" : "down");
	for (u64 n = 0; n < count; n++) {
		u64 deadline = tsc_deadline(wait_us);
		u16 status;
		while (!!((status = link_status()) & VIRTIO_NET_S_LINK_UP) == up) {
			net_poll();
			if (wait_us && tsc_passed(deadline)) {
				print(TAG ": the link stayed %s\n", up ? "up" : "down");
				fail(VEXIT_TIMEOUT);
			}
		}
		up = !up;
		u8 isr = virtio_isr(&dev);
		print(TAG ": link %s (status %#x isr %#x)\n", up ? "up" : "down", status, isr);
		if (!(isr & VIRTIO_ISR_CONFIG)) {
			print(TAG ": no configuration change interrupt came with it (4.1.4.5)\n");
			fail(VEXIT_IO);
		}
		if (up) {
			mode_ping(1, 56);
			continue;
		}
		cfg.peer_known = false;
		send_arp(1, NULL, NULL, cfg.peer_ip);
		tx_drain(); /* its buffer comes back: the frame went nowhere */
		u64 quiet = tsc_deadline(LINK_QUIET_US);
		while (!tsc_passed(quiet))
			net_poll();
		if (cfg.peer_known) {
			print(TAG ": an ARP reply came while the link was down\n");
			fail(VEXIT_DATA);
		}
		print(TAG ": link down: the ARP request's buffer came back, no reply\n");
	}
}

/* Waits for the next UDP datagram to cfg.ip:port (handling ARP and pings meanwhile); false
 * when a byte arrived on COM1 or `wait_us` (0: never) passed with nothing. */
static bool next_udp(u16 port, u64 wait_us, bool *input)
{
	u64 deadline = wait_us ? tsc_deadline(wait_us) : 0, poll_at = tsc_deadline(INPUT_POLL_US);
	for (;;) {
		in.udp_got = false;
		if (net_poll()) {
			if (in.udp_got && in.udp.dport == port)
				return true;
			if (in.udp_got)
				st.ignored++;
			continue;
		}
		if (tsc_passed(poll_at)) {
			if (serial_poll_byte() >= 0) {
				*input = true;
				return false;
			}
			poll_at = tsc_deadline(INPUT_POLL_US);
		}
		if (wait_us && tsc_passed(deadline))
			return false;
		asm volatile("pause");
	}
}

static void mode_udp_echo(u16 port, u64 count, u64 wait_us)
{
	u64 n = 0, bytes = 0;
	bool input = false;
	print(TAG ": udp-echo ready ip=");
	print_ip(cfg.ip);
	print(" port=%u count=%lu\n", port, count);
	while (count == 0 || n < count) {
		if (!next_udp(port, n ? 0 : wait_us, &input))
			break;
		unsigned i = tx_get();
		u32 len = build_udp(i, in.udp.src_mac, in.udp.src_ip, port, in.udp.sport,
				    in.udp.data, in.udp.len);
		tx_queue(i, len, 6, true);
		n++;
		bytes += in.udp.len;
	}
	tx_drain();
	print(TAG ": udp-echo echoed=%lu bytes=%lu%s\n", n, bytes,
	      input ? " (stopped by input)" : "");
	if (n == 0 && !input) {
		print(TAG ": no datagram came\n");
		fail(VEXIT_TIMEOUT);
	}
}

static void mode_burst(u16 port, u64 count, u64 size, u64 batch)
{
	resolve_peer();
	print(TAG ": burst to ");
	print_ip(cfg.peer_ip);
	print(":%u count=%lu size=%lu batch=%lu\n", port, count, size, batch);
	u64 t0 = rdtsc();
	for (u64 seq = 0; seq < count; seq++) {
		unsigned i = tx_get();
		u8 *payload = tx_slot(i) + NET_HDR_LEN + ETH_HLEN + IP_HLEN + UDP_HLEN;
		udp_pattern(payload, seq, (u32)size);
		u32 len = build_udp(i, cfg.peer_mac, cfg.peer_ip, port, port, NULL, (u32)size);
		tx_queue(i, len, 6, (seq + 1) % batch == 0);
		while (net_poll()) /* answer ARP from the host while sending */
			;
	}
	tx_drain();
	u64 t = rdtsc() - t0;
	print(TAG ": burst sent=%lu bytes=%lu", count, count * size);
	print_rate(count, count * size, t);
}

static void hold(u64 ms)
{
	tsc_delay_us(ms * MS); /* at least ms (tsc.h assumes the fastest TSC) */
}

static void mode_sink(u16 port, u64 count, u64 wait_us, u64 hold_ms, u64 idle_ms)
{
	u64 n = 0, bytes = 0, bad = 0, reordered = 0, next = 0, t0 = 0, t1 = 0;
	u64 max_seq = 0;
	bool input = false;
	print(TAG ": sink ready ip=");
	print_ip(cfg.ip);
	print(" port=%u count=%lu rx_buffers=%u hold_ms=%lu\n", port, count, rxq.size, hold_ms);
	while (n < count) {
		if (!next_udp(port, n ? idle_ms * MS : wait_us, &input))
			break;
		t1 = rdtsc();
		if (n == 0) {
			t0 = t1;
			if (hold_ms)
				hold(hold_ms);
		}
		u64 seq = 0;
		n++;
		bytes += in.udp.len;
		if (!udp_pattern_ok(in.udp.data, in.udp.len, &seq)) {
			if (bad++ < 4)
				print(TAG ": datagram %lu (seq %lu, %u bytes) has a wrong payload\n",
				      n, seq, in.udp.len);
			continue;
		}
		if (seq < next)
			reordered++;
		if (seq + 1 > max_seq)
			max_seq = seq + 1;
		next = seq + 1;
	}
	/* Sequence numbers the host sent below the highest seen and not received. */
	u64 good = n - bad;
	u64 missing = max_seq > good ? max_seq - good : 0;
	print(TAG ": sink received=%lu of %lu bytes=%lu highest_seq=%lu missing=%lu "
	      "reordered=%lu bad=%lu%s", n, count, bytes, max_seq ? max_seq - 1 : 0, missing,
	      reordered, bad, input ? " (stopped by input)" : "");
	print_rate(n > 1 ? n - 1 : 0, bytes, t1 - t0);
	if (bad)
		fail(VEXIT_DATA);
	if (n == 0) {
		print(TAG ": no datagram came\n");
		fail(VEXIT_TIMEOUT);
	}
}

/* ---- set-up ---- */

static void setup_queues(const char *cmdline)
{
	u16 qsize = virtio_guest_qsize(cmdline);
	if (!virtq_setup(&dev, &rxq, RXQ, qsize) || !virtq_setup(&dev, &txq, TXQ, qsize))
		fail(VEXIT_SETUP);
	vq_slots_init(&tx, cfg.txsplit ? txq.size / 2u : txq.size);
	virtio_driver_ok(&dev);
	/* 5.1.6.3: receive buffers may be posted after DRIVER_OK (3.1.1 step 8 allows it). */
	for (unsigned i = 0; i < rxq.size; i++)
		rx_post(i);
	rx_flush();
}

static void read_config(void)
{
	static const u8 default_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
	bool from_cfg = dev.features & (1ull << VIRTIO_NET_F_MAC);
	for (u32 k = 0; k < 6; k++)
		cfg.mac[k] = from_cfg ? (u8)virtio_config_read(&dev, NET_CFG_MAC + k, 1)
				      : default_mac[k];
	print(TAG ": mac ");
	print_mac(cfg.mac);
	print(" (%s)", from_cfg ? "config" : "default, VIRTIO_NET_F_MAC not offered");
	if (!(dev.features & (1ull << VIRTIO_NET_F_STATUS))) {
		print(" link status not offered\n");
		return;
	}
	u64 deadline = tsc_deadline(5 * S);
	u16 status;
	while (!((status = (u16)virtio_config_read(&dev, NET_CFG_STATUS, 2)) &
		 VIRTIO_NET_S_LINK_UP)) {
		if (tsc_passed(deadline)) {
			print(" link down (status %#x)\n", status);
			fail(VEXIT_LINK);
		}
	}
	print(" link up (status %#x)\n", status);
}

static NORETURN void net_main(void *bp)
{
	const char *cmdline = bp_cmdline(bp);
	serial_init();
	print(TAG ": cmdline: %s\n", cmdline);
	bool ping = !cmdline_find(cmdline, "mode", &(const char *){ 0 }, &(size_t){ 0 }) ||
		    cmdline_is(cmdline, "mode", "ping");
	bool echo = cmdline_is(cmdline, "mode", "udp-echo"), burst = cmdline_is(cmdline, "mode", "burst");
	bool sink = cmdline_is(cmdline, "mode", "sink"), linkmode = cmdline_is(cmdline, "mode", "link");
	if (!ping && !echo && !burst && !sink && !linkmode) {
		print(TAG ": mode= must be ping, udp-echo, burst, sink or link\n");
		debug_exit(VEXIT_ARGS);
	}
	bool mrg = cmdline_u64(cmdline, "mrg_rxbuf", 0);
	u64 count = cmdline_u64(cmdline, "count", ping ? 4 : echo ? 0 : linkmode ? 2 : 1000);
	u64 size = cmdline_u64(cmdline, "size", ping ? 56 : PAYLOAD_MAX);
	u64 port = cmdline_u64(cmdline, "port", 7), batch = cmdline_u64(cmdline, "batch", 32);
	u64 rxbuf = cmdline_u64(cmdline, "rxbuf", mrg ? 128 : NET_HDR_LEN + ETH_FRAME_MAX);
	u64 wait_us = cmdline_u64(cmdline, "wait_s", 60) * S;
	if (!parse_ip(cmdline, "ip", 0x0a00020f, &cfg.ip) ||
	    !parse_ip(cmdline, "peer_ip", 0x0a000202, &cfg.peer_ip)) {
		print(TAG ": ip= and peer_ip= must be dotted quads\n");
		debug_exit(VEXIT_ARGS);
	}
	if (size < 8 || size > PAYLOAD_MAX || port == 0 || port > 0xffff || batch == 0 ||
	    rxbuf < NET_HDR_LEN || rxbuf > SLOT || (ping && (count == 0 || count > 0xffff))) {
		print(TAG ": need 8 <= size <= %u, 1 <= port <= 65535, batch >= 1, %u <= rxbuf <= "
		      "%u, 1 <= count <= 65535 for ping\n", PAYLOAD_MAX, NET_HDR_LEN, SLOT);
		debug_exit(VEXIT_ARGS);
	}
	virtio_guest_need_ram(bp, TAG, DMA_BASE, DMA_END);
	cfg.tsc_khz = tsc_calibrate_khz();

	u64 wanted = 1ull << VIRTIO_NET_F_MAC | 1ull << VIRTIO_NET_F_STATUS;
	if (mrg)
		wanted |= 1ull << VIRTIO_NET_F_MRG_RXBUF;
	if (cmdline_u64(cmdline, "csum", 0))
		wanted |= 1ull << VIRTIO_NET_F_CSUM;
	if (cmdline_u64(cmdline, "guest_csum", 0))
		wanted |= 1ull << VIRTIO_NET_F_GUEST_CSUM;
	virtio_guest_open(bp, cmdline, TAG, VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_NET,
			  TRANSITIONAL_ID, wanted, &dev);
	virtio_guest_print_features(&dev, TAG);
	cfg.mrg = dev.features & (1ull << VIRTIO_NET_F_MRG_RXBUF);
	cfg.csum = dev.features & (1ull << VIRTIO_NET_F_CSUM);
	cfg.guest_csum = dev.features & (1ull << VIRTIO_NET_F_GUEST_CSUM);
	cfg.txsplit = cmdline_u64(cmdline, "txsplit", 0);
	cfg.strict = cmdline_u64(cmdline, "strict", 0);
	/* 5.1.6.3.1: without MRG_RXBUF a buffer must take a whole 1514-byte frame and the header. */
	cfg.rxbuf = cfg.mrg ? (u32)rxbuf : NET_HDR_LEN + ETH_FRAME_MAX;
	if (!cfg.mrg && rxbuf < cfg.rxbuf)
		print(TAG ": rxbuf=%lu needs MRG_RXBUF; using %u\n", rxbuf, cfg.rxbuf);
	read_config();
	setup_queues(cmdline);
	print(TAG ": rxq size %u buffers of %u bytes mrg_rxbuf=%u txq size %u slots %u csum=%u "
	      "guest_csum=%u txsplit=%u tsc_khz=%lu\n", rxq.size, cfg.rxbuf, cfg.mrg, txq.size,
	      tx.total, cfg.csum, cfg.guest_csum, cfg.txsplit, cfg.tsc_khz);
	print(TAG ": ip ");
	print_ip(cfg.ip);
	print(" peer ");
	print_ip(cfg.peer_ip);
	print("\n");

	if (ping)
		mode_ping(count, size);
	else if (echo)
		mode_udp_echo((u16)port, count, wait_us);
	else if (linkmode)
		mode_link(count, wait_us);
	else if (burst)
		mode_burst((u16)port, count ? count : 1, size, batch);
	else
		mode_sink((u16)port, count ? count : 1, wait_us, cmdline_u64(cmdline, "hold_ms", 0),
			  cmdline_u64(cmdline, "idle_ms", 3000));
	tx_drain();
	print(TAG ": stats rx_frames=%lu rx_bytes=%lu tx_frames=%lu tx_bytes=%lu merged=%lu "
	      "num_buffers_not_1=%lu arp_answered=%lu icmp_answered=%lu ignored=%lu bad_csum=%lu hdr_errors=%lu "
	      "rx_partial=%lu tx_partial=%lu notifies rx=%u tx=%u\n", st.rx_frames, st.rx_bytes,
	      st.tx_frames, st.tx_bytes, st.merged, st.num_buffers_not_1, st.arp_answered, st.icmp_answered, st.ignored,
	      st.bad_csum, st.hdr_errors, st.rx_partial, st.tx_partial, rxq.notifies, txq.notifies);
	if (st.hdr_errors) {
		print(TAG ": the device broke %lu virtio_net_hdr rules (5.1.6.4)\n", st.hdr_errors);
		fail(VEXIT_IO);
	}
	if (cfg.strict && st.num_buffers_not_1) {
		print(TAG ": %lu frames with num_buffers != 1 without MRG_RXBUF (5.1.6.4.1)\n",
		      st.num_buffers_not_1);
		fail(VEXIT_IO);
	}
	if (st.bad_csum) {
		print(TAG ": %lu frames with a wrong checksum\n", st.bad_csum);
		fail(VEXIT_DATA);
	}
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
	cpl3_enter(net_main, (void *)boot_params);
}
