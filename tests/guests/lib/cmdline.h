/* `key=value` words on the kernel command line (space or tab separated; no quoting). */
#pragma once

#include "types.h"

/* Finds the last word "key=value"; sets *value and *len to the value.  False if absent. */
bool cmdline_find(const char *cmdline, const char *key, const char **value, size_t *len);

/* Parses decimal or 0x-prefixed hex, the whole of s[0..len); false on anything else or
 * overflow. */
bool parse_u64(const char *s, size_t len, u64 *out);

/* The value of key as a number, or `fallback` when key is absent.  A value that is present
 * but not a number prints a warning and gives `fallback`. */
u64 cmdline_u64(const char *cmdline, const char *key, u64 fallback);

/* Like cmdline_u64, with an optional binary suffix K, M or G (x 1024, 1024^2, 1024^3), e.g.
 * "size=64M". */
u64 cmdline_size(const char *cmdline, const char *key, u64 fallback);

/* True when the last "key=..." word has exactly the value `value`; false when it is absent. */
bool cmdline_is(const char *cmdline, const char *key, const char *value);
