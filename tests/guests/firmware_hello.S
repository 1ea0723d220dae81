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
 * isa-debug-exit the host exit status is (31h << 1) | 1 = 99. */

#define COM1 0x3f8
#define UART_TX 0
#define UART_DLL 0
#define UART_IER 1
#define UART_DLM 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LCR_DLAB 0x80
#define UART_LCR_WLEN8 0x03
#define UART_FCR_ENABLE_AND_CLEAR 0x07	/* enable FIFOs, clear receive and transmit FIFOs */
#define UART_MCR_DTR_RTS 0x03
#define UART_LSR_THRE 0x20
#define THRE_POLL_LIMIT 0xffff

#define DEBUG_EXIT_PORT 0xf4
#define EXIT_VALUE 0x31

#define STACK_SEGMENT 0x0000
#define STACK_TOP 0x7c00	/* conventional memory, below the traditional boot sector */

/* Writes an immediate byte to a UART register. */
.macro uart_out reg, value
	mov	$(COM1 + \reg), %dx
	mov	$\value, %al
	out	%al, %dx
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
	mov	$STACK_TOP, %sp

	/* 8250 programming: interrupts off, DLAB, divisor 1 (115200 baud), 8N1, FIFOs, DTR|RTS. */
	uart_out UART_IER, 0
	uart_out UART_LCR, UART_LCR_DLAB
	uart_out UART_DLL, 1
	uart_out UART_DLM, 0
	uart_out UART_LCR, UART_LCR_WLEN8
	uart_out UART_FCR, UART_FCR_ENABLE_AND_CLEAR
	uart_out UART_MCR, UART_MCR_DTR_RTS

	mov	$greeting, %si
	call	puts

	mov	$EXIT_VALUE, %al
	out	%al, $DEBUG_EXIT_PORT
1:	hlt				/* only reached without a debug-exit device */
	jmp	1b

/* Prints the NUL-terminated string at DS:SI, polling LSR.THRE before each byte. */
puts:
	lodsb
	test	%al, %al
	jz	3f
	mov	%al, %bl
	mov	$THRE_POLL_LIMIT, %cx
	mov	$(COM1 + UART_LSR), %dx
1:	in	%dx, %al
	test	$UART_LSR_THRE, %al
	jnz	2f
	loop	1b
2:	mov	$(COM1 + UART_TX), %dx
	mov	%bl, %al
	out	%al, %dx
	jmp	puts
3:	ret

	.section .rodata, "a"
greeting:
	.asciz	"Hello from splitvmm firmware!\n"

/* The reset vector: the last 16 bytes of the image (offset FFF0h in segment F000h). */
	.section .reset, "ax"
	ljmp	$0xf000, $start
