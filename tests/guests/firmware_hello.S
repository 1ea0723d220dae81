/* firmware-hello: a 64 KiB BIOS-style firmware image in 16-bit real mode.
 *
 * After reset the CPU runs in real mode with CS = F000h, CS.base = FFFF0000h and IP = FFF0h,
 * so the first instruction is fetched at FFFFFFF0h, the image's last 16 bytes (Intel SDM
 * Vol. 3A, "First Instruction Executed").  The platform also aliases the image just below
 * 1 MiB (a 64 KiB image at F0000h-FFFFFh, as a PC and QEMU's -bios do), so the far jump there
 * loads CS = F000h with base F0000h and the rest runs from the alias with ordinary segments.
 *
 * It initialises COM1 (8250: 115200 8N1, FIFOs on, interrupts off), prints
 * "Hello from splitvmm firmware!" and writes 31h to the debug-exit port 0xf4: under QEMU's
 * isa-debug-exit the host exit status is (31h << 1) | 1 = 99.
 *
 * Built with -DIDLE it is firmware-idle: it prints "firmware-idle: halted" and halts for
 * good instead (interrupts off), a VM that stays up doing nothing, whose host memory
 * bench/memory.py measures under splitvmm and QEMU alike. */

#include "lib/rm_uart.inc"

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

	mov	$greeting, %si
	call	puts

#ifndef IDLE
	mov	$EXIT_VALUE, %al
	out	%al, $DEBUG_EXIT_PORT
#endif
1:	hlt				/* firmware-idle, or no debug-exit device */
	jmp	1b

	uart_routines

	.section .rodata, "a"
greeting:
#ifdef IDLE
	.asciz	"firmware-idle: halted\n"
#else
	.asciz	"Hello from splitvmm firmware!\n"
#endif

/* The reset vector: the last 16 bytes of the image (offset FFF0h in segment F000h). */
	.section .reset, "ax"
	ljmp	$0xf000, $start
