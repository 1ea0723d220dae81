/* 64-bit entry of a firmware payload (firmware_virtio.S copies the payload to 2 MiB and jumps
 * here in long mode, identity-mapped, CS = 0x10, DS/SS = 0x18, interrupts off).  Nobody loaded
 * this image as an ELF, so .bss is not zero yet: clear it (the stack lives there too), then
 * fw_main builds the boot_params an ELF loader would have handed over. */

#define FW_STACK_SIZE 16384

	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	cli
	cld
	mov	$__bss_start, %rdi
	mov	$_end, %rcx
	sub	%rdi, %rcx
	shr	$3, %rcx		/* guest.ld aligns both ends to 8 bytes */
	xor	%eax, %eax
	rep stosq
	mov	$fw_stack_top, %rsp
	xor	%ebp, %ebp
	call	fw_main
1:	hlt
	jmp	1b

	.section .bss
	.balign 16
fw_stack:
	.skip	FW_STACK_SIZE
fw_stack_top:
