/* 8250 UART register semantics from the National Semiconductor PC16550D datasheet; register
 * and bit names as in Linux include/uapi/linux/serial_reg.h. */
#include "serial.h"

#include "io.h"

/* Register offsets from the base port. */
#define UART_TX 0  /* out: transmit holding register (DLAB = 0) */
#define UART_RX 0  /* in:  receive buffer register (DLAB = 0) */
#define UART_DLL 0 /* out: divisor latch low byte (DLAB = 1) */
#define UART_IER 1 /* out: interrupt enable register (DLAB = 0) */
#define UART_DLM 1 /* out: divisor latch high byte (DLAB = 1) */
#define UART_FCR 2 /* out: FIFO control register */
#define UART_LCR 3 /* out: line control register */
#define UART_MCR 4 /* out: modem control register */
#define UART_LSR 5 /* in:  line status register */

#define UART_LCR_DLAB 0x80  /* divisor latch access bit */
#define UART_LCR_WLEN8 0x03 /* 8 data bits; bit 2 = 0: 1 stop bit; bit 3 = 0: no parity */
#define UART_FCR_ENABLE_FIFO 0x01
#define UART_FCR_CLEAR_RCVR 0x02
#define UART_FCR_CLEAR_XMIT 0x04
#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02 /* OUT2 (0x08) stays 0: on a PC it gates the IRQ line */
#define UART_LSR_DR 0x01   /* data ready: a received byte waits in UART_RX */
#define UART_LSR_THRE 0x20 /* transmit holding register empty */

/* 1.8432 MHz crystal / 16 = 115200 baud at divisor 1. */
#define UART_BAUD_BASE 115200
#define UART_BAUD 115200

/* Give up waiting for THRE after this many polls (then write anyway) so that a UART that never
 * reports THRE slows the guest down instead of hanging it. */
#define THRE_POLL_LIMIT 100000

void serial_init(void)
{
	u16 divisor = UART_BAUD_BASE / UART_BAUD;

	outb(COM1_PORT + UART_IER, 0); /* all interrupts off */
	/* Datasheet "Programming": set DLAB to reach the divisor latch, load it, clear DLAB. */
	outb(COM1_PORT + UART_LCR, UART_LCR_DLAB);
	outb(COM1_PORT + UART_DLL, divisor & 0xff);
	outb(COM1_PORT + UART_DLM, divisor >> 8);
	outb(COM1_PORT + UART_LCR, UART_LCR_WLEN8); /* 8N1, DLAB = 0 */
	outb(COM1_PORT + UART_FCR,
	     UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT);
	outb(COM1_PORT + UART_MCR, UART_MCR_DTR | UART_MCR_RTS);
}

void serial_wait_thre(void)
{
	/* LSR.THRE: the transmit holding register (with FIFOs on, the whole transmit FIFO) is
	 * empty and can take the next byte (or UART_FIFO_SIZE of them). */
	for (int i = 0; i < THRE_POLL_LIMIT; i++) {
		if (inb(COM1_PORT + UART_LSR) & UART_LSR_THRE)
			break;
	}
}

void serial_putc(char c)
{
	serial_wait_thre();
	outb(COM1_PORT + UART_TX, (u8)c);
}

void serial_write(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		serial_putc(s[i]);
}

int serial_poll_byte(void)
{
	if (!(inb(COM1_PORT + UART_LSR) & UART_LSR_DR))
		return -1;
	return inb(COM1_PORT + UART_RX);
}
