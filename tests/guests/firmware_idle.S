/* firmware-idle: a 64 KiB BIOS-style firmware image that prints one line on COM1 and then
 * halts for good, with interrupts off: a VM that stays up doing nothing, whose host memory
 * bench/memory.py measures under splitvmm and QEMU alike. Reset and layout as in
 * firmware_hello.S. */

#include "lib/rm_uart.inc"

#define STACK_SEGMENT 0x0000
#define STACK_TOP 0x7c00

	.code16
	.section .text, "ax"
	.globl start
start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	mov	$STACK_SEGMENT, %ax
	mov	%ax, %ss
	mov	$STACK_TOP, %sp

	uart_init

	mov	$greeting, %si
	call	puts

1:	hlt				/* IF=0: no interrupt ends it; the host kills the VM */
	jmp	1b

	uart_routines

	.section .rodata, "a"
greeting:
	.asciz	"firmware-idle: halted\n"

	.section .reset, "ax"
	ljmp	$0xf000, $start
