/* Waiting with the time-stamp counter.  Its rate is unknown without calibration, so waits
 * assume the fastest plausible TSC (5 GHz): a wait of N microseconds lasts at least N
 * microseconds, and longer on a slower TSC.  Good for the minimum delays the SDM asks for and
 * for generous timeouts, not for measuring time. */
#pragma once

#include "io.h"

#define TSC_MAX_TICKS_PER_US 5000ull

/* A TSC value `us` microseconds (at least) from now. */
static inline u64 tsc_deadline(u64 us)
{
	return rdtsc() + us * TSC_MAX_TICKS_PER_US;
}

static inline bool tsc_passed(u64 deadline)
{
	return (int64_t)(rdtsc() - deadline) >= 0;
}

static inline void tsc_delay_us(u64 us)
{
	u64 deadline = tsc_deadline(us);
	while (!tsc_passed(deadline))
		barrier();
}

/* The TSC rate in kHz, measured against the 8254 PIT's channel 2 for 50 ms (tsc_cal.c); 0 when
 * the timer does not behave like one. */
u64 tsc_calibrate_khz(void);
