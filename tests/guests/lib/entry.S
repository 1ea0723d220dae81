/* 64-bit entry point, per the Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst,
 * "64-bit Boot Protocol"): long mode, identity-mapped, CS = __BOOT_CS, interrupts off, and
 * RSI = physical address of struct boot_params.  The loader's stack is not ours to use, so
 * switch to one in .bss first, then call guest_main(boot_params).  A guest_main that returns
 * passes its return value to the debug-exit port. */

#define DEBUG_EXIT_PORT 0xf4
#define BSP_STACK_SIZE 16384

	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	cli
	cld
	mov	$bsp_stack_top, %rsp
	xor	%ebp, %ebp
	mov	%rsi, %rdi		/* guest_main(struct boot_params *) */
	call	guest_main
	mov	$DEBUG_EXIT_PORT, %dx
	outb	%al, %dx
1:	hlt
	jmp	1b

	.section .bss
	.balign 16
bsp_stack:
	.skip	BSP_STACK_SIZE
bsp_stack_top:
