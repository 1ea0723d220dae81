/* TSC rate from the PC's 8254 timer (Intel 8254 datasheet; the PC wiring of channel 2 through
 * port 0x61 as in Linux arch/x86/kernel/tsc.c, pit_calibrate_tsc): channel 2 in mode 0 counts
 * down from a latch with its gate high; port 0x61 bit 5 shows OUT2, which goes high at zero. */
#include "io.h"
#include "tsc.h"

#define PIT_HZ 1193182u
#define PIT_CH2 0x42
#define PIT_MODE 0x43
#define PIT_CH2_MODE0_LOHI 0xb0 /* channel 2, lobyte/hibyte, mode 0, binary */
#define PORT_61 0x61
#define PORT_61_GATE2 0x01
#define PORT_61_SPEAKER 0x02
#define PORT_61_OUT2 0x20
#define CAL_MS 50
#define MIN_KHZ 100000u  /* below 100 MHz the timer is not really there */
#define GIVE_UP_US 200000 /* 4 x CAL_MS even at a 20 GHz TSC (tsc.h assumes 5 GHz) */

u64 tsc_calibrate_khz(void)
{
	u32 latch = PIT_HZ / (1000 / CAL_MS);
	outb(PORT_61, (u8)((inb(PORT_61) & ~PORT_61_SPEAKER) | PORT_61_GATE2));
	outb(PIT_MODE, PIT_CH2_MODE0_LOHI);
	outb(PIT_CH2, latch & 0xff);
	outb(PIT_CH2, (u8)(latch >> 8));
	u64 t0 = rdtsc(), deadline = tsc_deadline(GIVE_UP_US);
	while (!(inb(PORT_61) & PORT_61_OUT2)) {
		if (tsc_passed(deadline))
			return 0;
	}
	u64 khz = (rdtsc() - t0) / CAL_MS;
	return khz < MIN_KHZ ? 0 : khz;
}
