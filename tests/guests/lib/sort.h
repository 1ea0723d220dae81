/* Sorting and percentiles of u64 samples. */
#pragma once

#include "types.h"

/* In-place heapsort, ascending: O(n log n), no recursion, no extra memory. */
void sort_u64(u64 *a, size_t n);

/* Nearest-rank percentile of sorted a[0..n), n >= 1: the smallest value that at least
 * pct % of the samples do not exceed (a[ceil(pct * n / 100) - 1]). */
u64 percentile_u64(const u64 *sorted, size_t n, unsigned pct);
