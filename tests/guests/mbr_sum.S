/* mbr-sum: a boot sector for a PC BIOS, written from the BIOS boot convention (loaded at
 * 0000:7C00, the boot drive in DL) and the INT 13h extensions of the BIOS Enhanced Disk Drive
 * Specification (EDD 3.0: AH=41h installation check, AH=42h extended read with a 16-byte disk
 * address packet), not from any VMM.
 *
 * Each pass reads SECTORS sectors from LBA 1 on (the disk after itself), CHUNK at a time, to
 * 1000:0000, folds every little-endian dword of them, in order, into a checksum (sum =
 * rol(sum, 1) + dword, so that bytes out of place change it), and prints on COM1
 *
 *   mbr-sum: pass <8 hex digits> sectors=<SECTORS> sum=<8 hex digits>
 *
 * After PASSES passes (mbr-sum: 1) it writes 31h to the debug-exit port F4h (host status
 * (31h << 1) | 1 = 99); with PASSES 0 (mbr-sum-loop) it reads on for ever. A BIOS without
 * the extensions, or a read it fails, prints "mbr-sum: no EDD" or "mbr-sum: read failed at lba
 * <8 hex digits>, status <8 hex digits>" (AH holds the BIOS's status) and writes 33h.
 *
 * Under SeaBIOS on a virtio-blk disk this runs SeaBIOS's own PCI enumeration and BAR placement
 * and its virtio 1.x driver against the VMM's devices: independent code on both sides of the
 * bus. `int` is the BIOS's interface: in real mode KVM's emulator delivers it through the IVT,
 * which a PVM host runs (check_insns.py --allow int). */

#include "lib/rm_uart.inc"

#ifndef PASSES
#define PASSES 1		/* 0: for ever */
#endif
#define SECTORS 2048		/* 1 MiB after the boot sector */
#define CHUNK 64		/* 32 KiB a read: within one segment */
#define BUF_SEG 0x1000
#define DEBUG_EXIT_PORT 0xf4
#define EXIT_OK 0x31
#define EXIT_FAILED 0x33
#define STR(x) #x
#define XSTR(x) STR(x)

	.code16
	.section .text, "ax"
	.globl	start
start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x7c00, %sp
	cld
	mov	%dl, drive
	uart_init

	mov	$0x41, %ah		/* EDD installation check */
	mov	$0x55aa, %bx
	mov	drive, %dl
	int	$0x13
	jc	no_edd
	cmp	$0xaa55, %bx
	jne	no_edd

	xor	%ebp, %ebp		/* passes done */
pass:
	xor	%ebx, %ebx		/* the checksum */
	mov	$1, %edi		/* the next LBA */
read:
	movw	$CHUNK, dap_count	/* the BIOS writes back what it read */
	mov	%edi, dap_lba
	mov	$0x42, %ah
	mov	drive, %dl
	mov	$dap, %si
	int	$0x13
	jc	read_failed
	push	%ds
	mov	$BUF_SEG, %ax
	mov	%ax, %ds
	xor	%si, %si
	mov	$(CHUNK * 512 / 4), %cx
1:	lodsl
	rol	$1, %ebx
	add	%eax, %ebx
	loop	1b
	pop	%ds
	add	$CHUNK, %edi
	cmp	$(1 + SECTORS), %edi
	jb	read

	inc	%ebp
	mov	$done, %si
	call	puts
	mov	%ebp, %eax
	call	print_hex
	mov	$sum, %si
	call	puts
	mov	%ebx, %eax
	call	print_hex
	mov	$'\n', %al
	call	putc
#if PASSES
	cmp	$PASSES, %ebp
	jb	pass
	mov	$EXIT_OK, %al
	jmp	exit
#else
	jmp	pass
#endif

no_edd:
	mov	$edd_missing, %si
	call	puts
	mov	$EXIT_FAILED, %bl
	jmp	end

read_failed:
	movzx	%ah, %ebx		/* the BIOS's status, before puts takes AX */
	mov	$failed, %si
	call	puts
	mov	%edi, %eax
	call	print_hex
	mov	$status, %si
	call	puts
	mov	%ebx, %eax
	call	print_hex
	mov	$EXIT_FAILED, %bl

end:	mov	$'\n', %al
	call	putc
	mov	%bl, %al
exit:	out	%al, $DEBUG_EXIT_PORT
2:	hlt				/* no debug-exit device */
	jmp	2b

/* Prints EAX as 8 hex digits; keeps every register but EAX and EDX. */
print_hex:
	push	%cx
	mov	%eax, %edx
	mov	$8, %cx
1:	rol	$4, %edx
	mov	%dl, %al
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	2f
	add	$('a' - '9' - 1), %al
2:	call	putc
	loop	1b
	pop	%cx
	ret

	uart_routines

	.section .data, "aw"
	.balign	4
dap:	.byte	16, 0			/* packet size, reserved */
dap_count:
	.word	CHUNK
	.word	0, BUF_SEG		/* buffer offset, segment */
dap_lba:
	.long	0, 0			/* 64-bit LBA */
drive:	.byte	0
done:	.asciz	"mbr-sum: pass "
sum:	.asciz	" sectors=" XSTR(SECTORS) " sum="
edd_missing:
	.asciz	"mbr-sum: no EDD"
failed:	.asciz	"mbr-sum: read failed at lba "
status:	.asciz	", status "
