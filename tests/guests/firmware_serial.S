/* firmware-serial: a 64 KiB BIOS-style firmware image (16-bit real mode) that prints 16 KiB
 * through COM1 the way a polled driver does, so the same guest gives the same figure under
 * splitvmm and QEMU (bench/serial.py).
 *
 * Reset and layout as firmware-hello (firmware_hello.S, firmware.ld). It initialises COM1 for
 * polled use (lib/rm_uart.inc: IER = 0, 115200 8N1, FIFOs on, OUT2 off), then, between one
 * rdtsc before and one after, writes BYTES bytes with putc: for each byte it reads LSR until
 * THRE is set (one read when the line keeps up), then writes THR. The bytes are 63 printable
 * characters ('0' + i mod 63) and a newline, repeated: 256 lines of 64 bytes. Then it prints
 *
 *   fw-serial: ticks=<T> bytes=16384
 *
 * (T: the TSC delta over the whole output) and writes 31h to the debug-exit port F4h (host
 * status (31h << 1) | 1 = 99). On a PVM host every instruction runs in KVM's emulator, the
 * same for any VMM; the rest of the difference is the VMM's cost of an LSR read and a THR
 * write. */

#include "lib/rm_uart.inc"
#include "lib/rm_print.inc"

#define BYTES 16384
#define LINE_LEN 64
#define STR(x) #x
#define XSTR(x) STR(x)

#define DEBUG_EXIT_PORT 0xf4
#define EXIT_VALUE 0x31

#define STACK_SEGMENT 0x0000
#define STACK_TOP 0x7c00	/* conventional memory, below the traditional boot sector */

	.code16
	.section .text, "ax"
	.globl start
start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds		/* strings are in this image */
	mov	$STACK_SEGMENT, %ax
	mov	%ax, %ss
	mov	$STACK_TOP, %sp

	uart_init

	rdtsc
	push	%edx			/* the start, kept on the stack across the output */
	push	%eax
	xor	%di, %di		/* bytes written */
1:	mov	%di, %ax
	and	$(LINE_LEN - 1), %ax
	cmp	$(LINE_LEN - 1), %ax
	je	2f
	mov	%di, %ax		/* '0' + i mod 63: AX = i, divided by 63 */
	xor	%dx, %dx
	mov	$(LINE_LEN - 1), %bx
	div	%bx
	mov	%dl, %al
	add	$'0', %al
	jmp	3f
2:	mov	$'\n', %al
3:	call	putc
	inc	%di
	cmp	$BYTES, %di
	jne	1b
	rdtsc
	pop	%ebx
	sub	%ebx, %eax
	pop	%ebx
	sbb	%ebx, %edx
	push	%edx
	push	%eax

	mov	$prefix, %si
	call	puts
	pop	%eax
	pop	%edx
	call	print_u64
	mov	$suffix, %si
	call	puts

	mov	$EXIT_VALUE, %al
	out	%al, $DEBUG_EXIT_PORT
1:	hlt				/* only reached without a debug-exit device */
	jmp	1b

	uart_routines
	print_u64_routine

	.section .rodata, "a"
prefix:
	.asciz	"fw-serial: ticks="
suffix:
	.ascii	" bytes="
	.ascii	XSTR(BYTES)
	.asciz	"\n"

/* The reset vector: the last 16 bytes of the image (offset FFF0h in segment F000h). */
	.section .reset, "ax"
	ljmp	$0xf000, $start
