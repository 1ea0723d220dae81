/* firmware-virtio-{blk,rng,net,console}: a virtio guest as a 64 KiB BIOS-style image, so
 * that `qemu-system-x86_64 -bios firmware-virtio-blk.bin` runs the same driver as the ELF
 * guest (and splitvmm's `firmware =` boot too).  Reset and layout as firmware-hello
 * (firmware.ld: the reset vector at offset FFF0h jumps to F000:start in the image's alias below
 * 1 MiB).  It only gets to long mode and hands over; the payload (the guest's 64-bit code, linked
 * at 2 MiB like an ELF guest, fw_entry.S + fw_boot.c in place of entry.S) does the rest:
 *
 *   16-bit  lgdt, CR0.PE, far jump to 32-bit code
 *   32-bit  copy the payload from the ROM (linear F0000h + offset) to 2 MiB; page tables at
 *           1000h-6FFFh identity-mapping 4 GiB with 2 MiB pages; CR4.PAE, CR3, EFER.LME,
 *           CR0.PG; far jump to 64-bit code
 *   64-bit  data segments, jump to the payload's entry at 2 MiB
 *
 * The GDT sits in the ROM with every descriptor's accessed bit already set, so loading a
 * segment never writes to it.  A20: KVM does not emulate the A20 gate (addresses never wrap),
 * so the image does not touch port 92h.  PAYLOAD_BIN is the payload's flat binary (Makefile). */

#define LINEAR(x) (0xf0000 + (x))	/* the image's offsets as linear addresses */
#define PAYLOAD_ADDR 0x200000
#define PT_BASE 0x1000			/* PML4; PDPT at +1000h; four PDs at +2000h */
#define PTE_P_RW 0x003
#define PDE_2M 0x083			/* P | RW | PS */
#define CR0_PE 0x00000001
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define SEL_CODE32 0x08
#define SEL_CODE64 0x10			/* the ELF boot contract's CS */
#define SEL_DATA 0x18			/* and DS/ES/SS */
#define STACK_TOP 0x7c00

	.code16
	.section .text, "ax"
	.globl start
start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	gdt_ptr
	mov	%cr0, %eax
	or	$CR0_PE, %eax
	mov	%eax, %cr0
	ljmpl	$SEL_CODE32, $LINEAR(pm32)

/* 32- and 64-bit code: kept out of .text, which check_insns disassembles as 16-bit code, and
 * checked in its own mode through the stub_code32_* / stub_code64_* symbols. */
	.section .rodata.stub, "a"
	.balign 16
	.globl stub_code32_start, stub_code32_end, stub_code64_start, stub_code64_end
stub_code32_start:
	.code32
pm32:
	mov	$SEL_DATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	mov	$STACK_TOP, %esp

	mov	$LINEAR(payload), %esi
	mov	$PAYLOAD_ADDR, %edi
	mov	$((payload_end - payload + 3) / 4), %ecx
	rep movsl

	mov	$PT_BASE, %edi
	xor	%eax, %eax
	mov	$(6 * 4096 / 4), %ecx
	rep stosl
	movl	$(PT_BASE + 0x1000 + PTE_P_RW), PT_BASE
	mov	$(PT_BASE + 0x1000), %edi		/* PDPT[0..3] -> the four PDs */
	mov	$(PT_BASE + 0x2000 + PTE_P_RW), %eax
	mov	$4, %ecx
1:	mov	%eax, (%edi)
	add	$0x1000, %eax
	add	$8, %edi
	loop	1b
	mov	$(PT_BASE + 0x2000), %edi		/* 2048 x 2 MiB = 4 GiB */
	mov	$PDE_2M, %eax
	mov	$2048, %ecx
2:	mov	%eax, (%edi)
	add	$0x200000, %eax
	add	$8, %edi
	loop	2b

	mov	%cr4, %eax
	or	$CR4_PAE, %eax
	mov	%eax, %cr4
	mov	$PT_BASE, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$EFER_LME, %eax
	wrmsr
	mov	%cr0, %eax
	or	$CR0_PG, %eax
	mov	%eax, %cr0
	ljmp	$SEL_CODE64, $LINEAR(lm64)
stub_code32_end:

stub_code64_start:
	.code64
lm64:
	mov	$SEL_DATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	$PAYLOAD_ADDR, %eax
	jmp	*%rax
stub_code64_end:

	.balign 8
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* 08h: 32-bit code, base 0, 4 GiB, accessed */
	.quad	0x00af9b000000ffff	/* 10h: 64-bit code (L = 1) */
	.quad	0x00cf93000000ffff	/* 18h: data, base 0, 4 GiB, accessed */
gdt_end:
gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	LINEAR(gdt)

	.balign 16
payload:
	.incbin	PAYLOAD_BIN
payload_end:

/* The reset vector: the last 16 bytes of the image (offset FFF0h in segment F000h). */
	.section .reset, "ax"
	.code16
	ljmp	$0xf000, $start
