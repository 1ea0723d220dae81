/* smp: brings up every application processor listed in the MP table with INIT-SIPI-SIPI and
 * checks that each one runs.  With nmi_first_ms=T it first sends each AP an NMI IPI (SDM Vol.
 * 3A 11.6.1, delivery mode 100b), which a processor that no INIT and SIPI started cannot take,
 * prints "smp: NMI sent to the APs" and waits T ms before the INIT (which clears it): what a
 * hostile guest may do, for the host to watch.  Exit statuses (debug-exit value -> host status):
 *   0x10 -> 33  all N processors came up
 *   0x02 ->  5  an AP did not come up in time ("smp: only K of N cpus came up")
 *   0x03 ->  7  no usable MP table, or the BSP is not listed in it
 *   0x04 ->  9  an IPI stayed "send pending" */
#include "bootparams.h"
#include "cmdline.h"
#include "exit.h"
#include "io.h"
#include "lapic.h"
#include "mptable.h"
#include "print.h"
#include "serial.h"
#include "string.h"
#include "tsc.h"

#define EXIT_ALL_ONLINE 0x10
#define EXIT_TIMEOUT 0x02
#define EXIT_NO_MPTABLE 0x03
#define EXIT_IPI_FAILED 0x04

/* Where the real-mode AP code goes: 4 KiB aligned, below 1 MiB, in conventional memory that
 * neither the boot protocol nor the PC memory map gives another use. */
#define TRAMPOLINE_ADDR 0x10000
#define SIPI_VECTOR (TRAMPOLINE_ADDR >> 12)

/* SDM Vol. 3A 9.4.4.1 "Typical BSP Initialization Sequence": 10 ms after INIT, 200 us after
 * each start-up IPI. */
#define INIT_DELAY_US 10000
#define SIPI_DELAY_US 200
/* How long one AP may take to check in.  Its code is emulated here (~1 us an instruction)
 * and each byte it prints is two port exits, so this is generous on purpose. */
#define AP_TIMEOUT_US 5000000
#define LOCK_TIMEOUT_US 1000000

/* smp_trampoline.S */
extern const char ap_trampoline_start[], ap_trampoline_end[];
extern const char ap_lock[], ap_count[], ap_ids[];

NORETURN void guest_main(const void *boot_params);

/* The address of trampoline symbol `sym` in the copy the APs run. */
static void *in_copy(const char *sym)
{
	return phys_ptr(TRAMPOLINE_ADDR + (uintptr_t)(sym - ap_trampoline_start));
}

static u32 aps_online(void)
{
	return *(volatile u32 *)in_copy(ap_count);
}

/* The APs' print lock, taken so that the BSP's lines do not cut into theirs.  Bounded: an AP
 * that died holding it must not hang the report. */
static void print_lock(void)
{
	u8 *lock = in_copy(ap_lock);
	u64 deadline = tsc_deadline(LOCK_TIMEOUT_US);

	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE) && !tsc_passed(deadline))
		barrier();
}

static void print_unlock(void)
{
	__atomic_store_n((u8 *)in_copy(ap_lock), 0, __ATOMIC_RELEASE);
}

/* SDM Vol. 3A 9.4.4.1 and MP spec B.4: INIT, wait 10 ms, start-up IPI, wait 200 us, a second
 * start-up IPI, wait 200 us.  The second is ignored by an AP that already started. */
static bool start_ap(uintptr_t lapic, u8 apic_id)
{
	if (!lapic_send_ipi(lapic, apic_id, APIC_DM_INIT | APIC_INT_ASSERT))
		return false;
	tsc_delay_us(INIT_DELAY_US);
	for (int i = 0; i < 2; i++) {
		if (!lapic_send_ipi(lapic, apic_id, APIC_DM_STARTUP | APIC_INT_ASSERT | SIPI_VECTOR))
			return false;
		tsc_delay_us(SIPI_DELAY_US);
	}
	return true;
}

static bool wait_for_aps(u32 count)
{
	u64 deadline = tsc_deadline(AP_TIMEOUT_US);

	while (aps_online() < count) {
		if (tsc_passed(deadline))
			return false;
	}
	return true;
}

/* The NMI IPI of nmi_first_ms=T: to every AP, then T ms of waiting. */
static void nmi_first(const struct mp_info *mp, u8 bsp_id, u64 wait_ms)
{
	for (unsigned i = 0; i < mp->ncpus; i++) {
		u8 id = mp->cpus[i].apic_id;
		if (id != bsp_id && !lapic_send_ipi(mp->lapic_addr, id, APIC_DM_NMI | APIC_INT_ASSERT)) {
			print("smp: NMI IPI to apic id %u stays pending\n", id);
			debug_exit(EXIT_IPI_FAILED);
		}
	}
	print("smp: NMI sent to the APs\n");
	tsc_delay_us(wait_ms * 1000);
}

/* Starts the APs one after the other, so that their lines come out in MP-table order. */
static void start_all(const struct mp_info *mp, u8 bsp_id)
{
	u32 started = 0;

	for (unsigned i = 0; i < mp->ncpus; i++) {
		u8 id = mp->cpus[i].apic_id;
		if (id == bsp_id)
			continue;
		if (!start_ap(mp->lapic_addr, id)) {
			print("smp: IPI to apic id %u stays pending\n", id);
			debug_exit(EXIT_IPI_FAILED);
		}
		if (!wait_for_aps(++started)) {
			print_lock();
			print("smp: only %u of %u cpus came up\n", 1 + aps_online(), mp->ncpus);
			print_unlock();
			debug_exit(EXIT_TIMEOUT);
		}
	}
}

/* The APIC IDs the APs read from CPUID should be the ones the MP table gave them. */
static void check_reported_ids(const struct mp_info *mp, u8 bsp_id)
{
	const u8 *reported = in_copy(ap_ids);
	unsigned n = 0;

	for (unsigned i = 0; i < mp->ncpus; i++) {
		u8 id = mp->cpus[i].apic_id;
		if (id == bsp_id)
			continue;
		if (reported[n] != id)
			print("smp: warning: cpu started as apic id %u reports cpuid apic id %u\n",
			      id, reported[n]);
		n++;
	}
}

static bool bsp_listed(const struct mp_info *mp, u8 bsp_id)
{
	for (unsigned i = 0; i < mp->ncpus; i++) {
		if (mp->cpus[i].apic_id == bsp_id)
			return true;
	}
	return false;
}

NORETURN void guest_main(const void *boot_params)
{
	struct mp_info mp;

	serial_init();
	u64 nmi_wait_ms = cmdline_u64(bp_cmdline(boot_params), "nmi_first_ms", 0);
	if (!mp_find_cpus(&mp))
		debug_exit(EXIT_NO_MPTABLE);
	u8 bsp_id = lapic_id(mp.lapic_addr);
	if (!bsp_listed(&mp, bsp_id)) {
		print("smp: the bsp (apic id %u) is not in the MP table\n", bsp_id);
		debug_exit(EXIT_NO_MPTABLE);
	}
	print("cpu %u (bsp) online of %u\n", bsp_id, mp.ncpus);

	memcpy(phys_ptr(TRAMPOLINE_ADDR), ap_trampoline_start,
	       (size_t)(ap_trampoline_end - ap_trampoline_start));
	lapic_enable(mp.lapic_addr); /* SDM 9.4.4.1: the BSP enables its local APIC first */
	if (nmi_wait_ms)
		nmi_first(&mp, bsp_id, nmi_wait_ms);
	start_all(&mp, bsp_id);
	check_reported_ids(&mp, bsp_id);
	print("smp: all %u cpus online\n", mp.ncpus);
	debug_exit(EXIT_ALL_ONLINE);
}
