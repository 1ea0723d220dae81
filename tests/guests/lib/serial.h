/* Polled 8250/16550 UART driver for COM1.  Interrupts stay off (IER = 0): nothing would
 * deliver them to this guest.  Works at CPL0 and at CPL3 with IOPL = 3. */
#pragma once

#include "types.h"

#define COM1_PORT 0x3f8
/* The 16550's transmit FIFO (enabled by serial_init): after THRE, this many bytes fit. */
#define UART_FIFO_SIZE 16

void serial_init(void);
/* Until LSR.THRE says the transmitter can take a byte, or UART_FIFO_SIZE with FIFOs on
 * (bounded: a UART that never says so slows the guest, never hangs it). */
void serial_wait_thre(void);
void serial_putc(char c);
void serial_write(const char *s, size_t len);
/* A received byte (0-255) if one is waiting (LSR.DR), else -1.  One or two port reads. */
int serial_poll_byte(void);
