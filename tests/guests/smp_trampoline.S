/* Application-processor start-up code for the smp guest, in 16-bit real mode.
 *
 * smp.c copies the bytes from ap_trampoline_start to ap_trampoline_end to a 4 KiB-aligned
 * page below 1 MiB and names that page in the start-up IPI.  A start-up IPI with vector VV
 * starts the AP in real mode at CS:IP = VV00:0000 (Intel SDM Vol. 3A 11.6.1, "Start-Up"
 * delivery mode; MP spec B.4.2), so every address below is an offset from the start of the
 * copy, used with DS = SS = CS.  The data shared with the BSP (lock, counter, the APIC IDs
 * the APs report) lives in the copy too: the BSP finds it at the same offsets.
 *
 * Each AP: reads its APIC ID from CPUID, takes the spinlock, prints "cpu <id> online",
 * records its ID, increments the counter, releases the lock, and halts for good. */

#define COM1_THR 0x3f8		/* 8250 transmit holding register */
#define COM1_LSR 0x3fd		/* 8250 line status register */
#define UART_LSR_THRE 0x20	/* transmit holding register empty */
#define THRE_POLL_LIMIT 0xffff
#define AP_IDS_MAX 64		/* slots in ap_ids; matches MP_MAX_CPUS */

#define OFF(sym) ((sym) - ap_trampoline_start)

	.section .rodata.ap_trampoline, "a"
	.code16
	.globl ap_trampoline_start, ap_trampoline_end, ap_code16_start, ap_code16_end
	.globl ap_lock, ap_count, ap_ids

ap_trampoline_start:
ap_code16_start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	mov	%ax, %ss

	/* CPUID.01H:EBX[31:24] is this processor's initial APIC ID (SDM Vol. 2A, CPUID). */
	mov	$1, %eax
	xor	%ecx, %ecx
	cpuid
	shr	$24, %ebx		/* %bx = APIC ID */

	/* Spinlock: XCHG with memory is always locked (SDM Vol. 3A 9.1.2.1, "Automatic Locking"); while the lock
	 * is held, wait with plain reads. */
.Ltake_lock:
	mov	$1, %al
	xchg	%al, OFF(ap_lock)
	test	%al, %al
	jz	.Llocked
.Lspin:
	cmpb	$0, OFF(ap_lock)
	jne	.Lspin
	jmp	.Ltake_lock

.Llocked:
	mov	$OFF(ap_stack_top), %sp	/* one stack for all APs, used only under the lock */
	mov	$OFF(msg_cpu), %si
	call	puts
	mov	%bx, %ax
	call	putdec
	mov	$OFF(msg_online), %si
	call	puts

	mov	OFF(ap_count), %di
	cmp	$AP_IDS_MAX, %di
	jae	1f
	mov	%bl, OFF(ap_ids)(%di)	/* ap_ids[ap_count] = APIC ID */
1:	incl	OFF(ap_count)
	movb	$0, OFF(ap_lock)	/* release: x86 stores are not reordered with older stores */

.Lhalt:
	cli
	hlt
	jmp	.Lhalt

/* Sends %al to COM1 once LSR.THRE is set (bounded wait).  Clobbers %dx. */
putc:
	push	%cx
	push	%ax
	mov	$THRE_POLL_LIMIT, %cx
	mov	$COM1_LSR, %dx
1:	in	%dx, %al
	test	$UART_LSR_THRE, %al
	jnz	2f
	loop	1b
2:	pop	%ax
	mov	$COM1_THR, %dx
	out	%al, %dx
	pop	%cx
	ret

/* Prints the NUL-terminated string at DS:SI.  Clobbers %ax, %dx, %si. */
puts:
	lodsb
	test	%al, %al
	jz	1f
	call	putc
	jmp	puts
1:	ret

/* Prints %ax in decimal.  Clobbers %ax, %cx, %dx, %bp. */
putdec:
	mov	$10, %bp
	xor	%cx, %cx
1:	xor	%dx, %dx
	div	%bp			/* %ax = %dx:%ax / 10, %dx = remainder */
	push	%dx
	inc	%cx
	test	%ax, %ax
	jnz	1b
2:	pop	%ax
	add	$'0', %al
	call	putc
	loop	2b
	ret
ap_code16_end:

msg_cpu:
	.asciz	"cpu "
msg_online:
	.asciz	" online\n"

	.balign	4
ap_lock:
	.long	0			/* byte 0: 1 = held */
ap_count:
	.long	0			/* APs that have come up */
ap_ids:
	.fill	AP_IDS_MAX, 1, 0xff	/* APIC IDs, in the order the APs came up */

	.balign	16
ap_stack:
	.skip	128
ap_stack_top:
ap_trampoline_end:
	.code64
