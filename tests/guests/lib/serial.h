/* Polled 8250/16550 UART driver for COM1.  Interrupts stay off (IER = 0): nothing would
 * deliver them to this guest.  Works at CPL0 and at CPL3 with IOPL = 3. */
#pragma once

#include "types.h"

#define COM1_PORT 0x3f8

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t len);
/* A received byte (0-255) if one is waiting (LSR.DR), else -1.  One or two port reads. */
int serial_poll_byte(void);
