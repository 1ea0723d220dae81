#include "sort.h"

/* Moves a[root] down the max-heap a[0..n) until both its children are smaller. */
static void sift_down(u64 *a, size_t root, size_t n)
{
	for (;;) {
		size_t child = 2 * root + 1;
		if (child >= n)
			return;
		if (child + 1 < n && a[child + 1] > a[child])
			child++;
		if (a[root] >= a[child])
			return;
		u64 t = a[root];
		a[root] = a[child];
		a[child] = t;
		root = child;
	}
}

void sort_u64(u64 *a, size_t n)
{
	for (size_t i = n / 2; i-- > 0;)
		sift_down(a, i, n);
	for (size_t end = n; end-- > 1;) {
		u64 t = a[0];
		a[0] = a[end];
		a[end] = t;
		sift_down(a, 0, end);
	}
}

u64 percentile_u64(const u64 *sorted, size_t n, unsigned pct)
{
	size_t rank = (pct * n + 99) / 100; /* ceil(pct * n / 100) */
	return sorted[rank ? rank - 1 : 0];
}
