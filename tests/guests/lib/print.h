/* Formatted output to the serial port.  Lines end in "\n" alone (no "\r"). */
#pragma once

#include "types.h"

/* A printf subset: %s %c %d %u %x and %%, with an optional '#' (0x prefix), '0' flag, width
 * and 'l' (64-bit) length, e.g. "%#018lx" or "%lu". */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void vprint(const char *fmt, va_list ap);
/* The same into buf (at most size - 1 characters and a NUL); returns the length the whole
 * output has, as snprintf does. */
size_t format(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
