/* firmware-pio: a 64 KiB BIOS-style firmware image (16-bit real mode) that times port I/O to
 * the 8250 scratch register, so the same guest gives the same figure under splitvmm and QEMU.
 *
 * Reset and layout as firmware-hello (firmware_hello.S, firmware.ld): the reset vector at
 * offset FFF0h jumps to F000:start in the image's alias below 1 MiB.
 *
 * It initialises COM1 as the 8250 datasheet says for polled use (IER = 0, DLAB, divisor 1 =
 * 115200 baud, 8N1, FIFOs on, MCR = DTR|RTS with OUT2 off: no interrupt can reach the CPU), then
 * takes four TSC deltas, each with one rdtsc before and one after a whole loop of N passes:
 *
 *   in    N x `in %dx, %al` from 3FFh (SCR, the scratch register)
 *   out   N x `out %al, %dx` to 3FFh
 *   iir   N x `in %dx, %al` from 3FAh (IIR: with IER = 0 no interrupt is pending, so the
 *         read changes nothing; a VMM that mirrors SCR may still have to ask its UART)
 *   loop  the same loop with no I/O (the floor: the loop's own cost)
 *
 * and only then prints, one line each, the decimal totals in TSC ticks:
 *
 *   fw-pio: in ticks=<T> n=2000
 *   fw-pio: out ticks=<T> n=2000
 *   fw-pio: iir ticks=<T> n=2000
 *   fw-pio: loop ticks=<T> n=2000
 *
 * and writes 31h to the debug-exit port F4h (host status (31h << 1) | 1 = 99). All three loops
 * run at CPL0; on a PVM host every instruction of them goes through KVM's emulator, the same
 * for any VMM, so (in - loop) / N is the cost of one port read served by the VMM's UART.
 *
 * 32-bit registers (operand-size prefix, allowed in real mode) hold the TSC halves and do the
 * 64-by-32-bit divisions by 10 for the decimal output. */

#include "lib/rm_uart.inc"
#include "lib/rm_print.inc"

#define PIO_PORT (COM1 + UART_SCR)	/* 3FFh */
#define IIR_PORT (COM1 + UART_IIR)	/* 3FAh */
#define PASSES 2000
#define STR(x) #x
#define XSTR(x) STR(x)

#define DEBUG_EXIT_PORT 0xf4
#define EXIT_VALUE 0x31

#define STACK_SEGMENT 0x0000
#define STACK_TOP 0x7c00	/* conventional memory, below the traditional boot sector */
#define RESULTS 0x7000		/* 4 x 8 bytes at 0000:7000, RAM (the image itself is a ROM) */
#define RESULT_IN 0
#define RESULT_OUT 8
#define RESULT_LOOP 16
#define RESULT_IIR 24

/* Starts a measurement: TSC in EDI:ESI, CX = passes, DX = \port. DX is loaded after rdtsc,
 * which writes EDX: loaded before it, the loops went to port (TSC bits 32-47), nobody's, and
 * the VMM answered them inline (a 10 us "UART read" that was no UART's). */
.macro timing_start port=PIO_PORT
	rdtsc
	mov	%eax, %esi
	mov	%edx, %edi
	mov	$PASSES, %cx
	mov	$\port, %dx
.endm

/* Ends a measurement: stores TSC now - EDI:ESI (64 bits) at ES:RESULTS+\slot. */
.macro timing_end slot
	rdtsc
	sub	%esi, %eax
	sbb	%edi, %edx
	mov	%eax, %es:(RESULTS + \slot)
	mov	%edx, %es:(RESULTS + \slot + 4)
.endm

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
	mov	%ax, %es		/* results in low RAM */
	mov	$STACK_TOP, %sp

	uart_init

	/* N reads of the scratch register. */
	timing_start
1:	in	%dx, %al
	loop	1b
	timing_end RESULT_IN

	/* N writes of the scratch register (AL: the TSC's low byte, any value will do). */
	timing_start
1:	out	%al, %dx
	loop	1b
	timing_end RESULT_OUT

	/* N reads of IIR. */
	timing_start IIR_PORT
1:	in	%dx, %al
	loop	1b
	timing_end RESULT_IIR

	/* The same loop with no I/O. */
	timing_start
1:	loop	1b
	timing_end RESULT_LOOP

	mov	$RESULT_IN, %bx
	mov	$label_in, %si
	call	print_result
	mov	$RESULT_OUT, %bx
	mov	$label_out, %si
	call	print_result
	mov	$RESULT_IIR, %bx
	mov	$label_iir, %si
	call	print_result
	mov	$RESULT_LOOP, %bx
	mov	$label_loop, %si
	call	print_result

	mov	$EXIT_VALUE, %al
	out	%al, $DEBUG_EXIT_PORT
1:	hlt				/* only reached without a debug-exit device */
	jmp	1b

/* Prints "fw-pio: <label> ticks=<u64 at ES:RESULTS+BX> n=<PASSES>\n"; label string at DS:SI. */
print_result:
	push	%si
	mov	$prefix, %si
	call	puts
	pop	%si
	call	puts
	mov	$ticks, %si
	call	puts
	mov	%es:RESULTS(%bx), %eax
	mov	%es:(RESULTS + 4)(%bx), %edx
	call	print_u64
	mov	$suffix, %si
	call	puts
	ret

	uart_routines
	print_u64_routine

	.section .rodata, "a"
prefix:
	.asciz	"fw-pio: "
label_in:
	.asciz	"in"
label_out:
	.asciz	"out"
label_iir:
	.asciz	"iir"
label_loop:
	.asciz	"loop"
ticks:
	.asciz	" ticks="
suffix:
	.ascii	" n="
	.ascii	XSTR(PASSES)
	.asciz	"\n"

/* The reset vector: the last 16 bytes of the image (offset FFF0h in segment F000h). */
	.section .reset, "ax"
	ljmp	$0xf000, $start
