/* The CPL0 -> CPL3 switch (Intel SDM Vol. 2A, IRET: return to outer privilege level).
 *
 * void cpl3_switch(const struct table_ptr *gdtr,   %rdi
 *                  u64 cr3,                         %rsi
 *                  u64 user_rsp,                    %rdx
 *                  cpl3_fn fn,                      %rcx
 *                  void *arg)                       %r8
 */
#include "cpl3_selectors.h"

	.text
	.code64
	.globl cpl3_switch
cpl3_switch:
	lgdt	(%rdi)
	/* Reload CS from the new GDT with a far return, then the data segments. */
	pushq	$KERNEL_CS
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	mov	$KERNEL_DS, %ax
	mov	%ax, %ss
	mov	$(USER_DS | RPL3), %ax	/* DPL 3 data: loadable at CPL0, kept across IRET */
	mov	%ax, %ds
	mov	%ax, %es
	xor	%eax, %eax
	mov	%ax, %fs
	mov	%ax, %gs
	mov	$TSS_SEL, %ax
	ltr	%ax
	mov	%rsi, %cr3		/* the page tables with U/S set */

	/* IRET frame, from the top: SS, RSP, RFLAGS, CS, RIP.  The general registers survive
	 * IRET, so fn and arg travel in %rsi and %rdi. */
	mov	%rcx, %rsi
	mov	%r8, %rdi
	pushq	$(USER_DS | RPL3)
	pushq	%rdx
	pushq	$(RFLAGS_IOPL3 | RFLAGS_FIXED)	/* IF = 0 */
	pushq	$(USER_CS | RPL3)
	leaq	cpl3_start(%rip), %rax
	pushq	%rax
	iretq

/* First CPL3 instruction.  The stack is 16-byte aligned here, so CALL leaves it as the
 * System V ABI expects at a function's entry. */
cpl3_start:
	xor	%ebp, %ebp
	call	*%rsi
	call	cpl3_returned
