"""cffi builder (API, out-of-line) for the KVM UAPI.

The C compiler reads the system's <linux/kvm.h> and <asm/bootparam.h>, so every
ioctl number, constant and struct layout below comes from the headers: the
cdef only names what we use (`...;` lets the compiler fill in the rest).
"""

from cffi import FFI

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION
KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2
KVM_IRQFD KVM_IOEVENTFD KVM_SIGNAL_MSI KVM_IRQ_LINE_STATUS KVM_GET_IRQCHIP
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_MSRS KVM_SET_MSRS KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_TRANSLATE KVM_GET_TSC_KHZ
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_MSR_INDEX_LIST KVM_SET_IRQCHIP
KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK KVM_KVMCLOCK_CTRL KVM_SET_TSC_KHZ
KVM_SET_GSI_ROUTING KVM_REINJECT_CONTROL KVM_GET_DIRTY_LOG
KVM_REGISTER_COALESCED_MMIO KVM_UNREGISTER_COALESCED_MMIO
SV_KVM_GET_XSAVE2
""".split()

CONSTANTS = """
KVM_API_VERSION
KVM_CAP_IRQCHIP KVM_CAP_PIT2 KVM_CAP_IOEVENTFD KVM_CAP_IRQFD KVM_CAP_USER_MEMORY
KVM_CAP_SET_TSS_ADDR KVM_CAP_IMMEDIATE_EXIT KVM_CAP_EXT_CPUID KVM_CAP_MP_STATE
KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_READONLY_MEM KVM_CAP_SIGNAL_MSI
KVM_CAP_IRQ_ROUTING KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_REINJECT_CONTROL
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SET_TPR
KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_IOAPIC_EOI KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR
KVM_EXIT_DIRTY_RING_FULL
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
KVM_MEM_READONLY KVM_MEM_LOG_DIRTY_PAGES KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IRQFD_FLAG_DEASSIGN
KVM_IOEVENTFD_FLAG_DEASSIGN KVM_PIT_SPEAKER_DUMMY KVM_IRQFD_FLAG_RESAMPLE KVM_CAP_IRQFD_RESAMPLE
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI KVM_IOAPIC_NUM_PINS
E820_MAX_ENTRIES_ZEROPAGE CAN_USE_HEAP LOADED_HIGH XLF_KERNEL_64
KVM_CAP_TSC_DEADLINE_TIMER KVM_CPUID_FLAG_SIGNIFCANT_INDEX
X86_CR0_PE X86_CR0_ET X86_CR0_NE X86_CR0_PG X86_CR4_PAE X86_EFLAGS_FIXED
KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS KVM_CAP_ADJUST_CLOCK
KVM_CAP_KVMCLOCK_CTRL KVM_CAP_TSC_CONTROL KVM_CAP_GET_TSC_KHZ
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_CLOCK_TSC_STABLE KVM_CLOCK_REALTIME KVM_CLOCK_HOST_TSC KVM_MAX_XCRS
SV_HAVE_XSAVE2 SV_KVM_CAP_XSAVE2
KVM_CAP_COALESCED_MMIO KVM_CAP_COALESCED_PIO
""".split()

CDEF = """
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32; typedef long long __s64;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 suberror; __u32 ndata; __u64 flags;
                 __u8 insn_size; __u8 insn_bytes[15]; } emulation_failure;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
    };
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type; __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[...];
};
struct kvm_fpu { __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
                 __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_cpuid_entry2 { __u32 function; __u32 index; __u32 flags;
                          __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...; };
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_userspace_memory_region { __u32 slot; __u32 flags; __u64 guest_phys_addr;
                                     __u64 memory_size; __u64 userspace_addr; };
/* Declared whole, as cffi cannot leave its unnamed union partial: the bitmap pointer and the
   __u64 that pads it to 8 bytes on every ABI. */
struct kvm_dirty_log { __u32 slot; __u32 padding1; union { void *dirty_bitmap; __u64 padding2; }; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_reinject_control { __u8 pit_reinject; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 pad; };
/* Declared whole: cffi cannot leave the unnamed union partial. The build checks the entry's
   size, alignment and field offsets against the header; `words` stands for the union's
   pad[8] and its __u64 members (s390 adapter): 32 bytes, 8-aligned. */
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags; __u32 pad;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi;
            __u64 words[4]; } u;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_translation { __u64 linear_address; __u64 physical_address;
                         __u8 valid; __u8 writeable; __u8 usermode; ...; };
/* Snapshot state (vmstate.py). The kernel structs the monitor never looks into (xsave,
   vcpu events, debug registers, irqchip, PIT) travel as raw bytes of the header's size; only
   the fields named here are read or written. */
struct kvm_xsave { __u32 region[...]; ...; };
struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi; __u32 flags; ...;
};
struct kvm_debugregs { __u64 db[...]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_pit_channel_state { __u32 count; __s64 count_load_time; ...; };
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[...]; __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
/* kvm_irqchip's payload is a union with bitfields; we read it as bytes at the
   offsets below, which the compiler computes from the header. */
struct kvm_irqchip { __u32 chip_id; ...; };
static const unsigned long SV_IRQCHIP_CHIP_OFFSET;
static const unsigned long SV_PIC_IRR_OFFSET;
static const unsigned long SV_IOAPIC_ID_OFFSET;
static const unsigned long SV_IOAPIC_IRR_OFFSET;
static const unsigned long SV_IOAPIC_REDIRTBL_OFFSET;
static const unsigned long SV_IRQCHIP_CHIP_SIZE;
/* Coalesced port writes (KVM_REGISTER_COALESCED_MMIO with pio = 1): the zone and the ring's
   entries have unnamed unions, so they are read and written as bytes at these offsets. */
static const unsigned long SV_COALESCED_ZONE_SIZE;
static const unsigned long SV_COALESCED_ZONE_PIO_OFFSET;
static const unsigned long SV_COALESCED_RING_ENTRIES_OFFSET;
static const unsigned long SV_COALESCED_ENTRY_SIZE;
static const unsigned long SV_COALESCED_ENTRY_LEN_OFFSET;
static const unsigned long SV_COALESCED_ENTRY_DATA_OFFSET;
static const unsigned long SV_COALESCED_ENTRY_DATA_SIZE;

/* <asm/bootparam.h>: the Linux x86 zero page. */
struct setup_header {
    __u8 setup_sects; __u16 root_flags; __u32 syssize; __u16 ram_size; __u16 vid_mode;
    __u16 root_dev; __u16 boot_flag; __u16 jump; __u32 header; __u16 version;
    __u32 realmode_swtch; __u16 start_sys_seg; __u16 kernel_version; __u8 type_of_loader;
    __u8 loadflags; __u16 setup_move_size; __u32 code32_start; __u32 ramdisk_image;
    __u32 ramdisk_size; __u32 bootsect_kludge; __u16 heap_end_ptr; __u8 ext_loader_ver;
    __u8 ext_loader_type; __u32 cmd_line_ptr; __u32 initrd_addr_max; __u32 kernel_alignment;
    __u8 relocatable_kernel; __u8 min_alignment; __u16 xloadflags; __u32 cmdline_size;
    __u32 hardware_subarch; __u64 hardware_subarch_data; __u32 payload_offset;
    __u32 payload_length; __u64 setup_data; __u64 pref_address; __u32 init_size;
    __u32 handover_offset; ...;
};
struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; ...; };
struct boot_params {
    __u32 ext_ramdisk_image; __u32 ext_ramdisk_size; __u32 ext_cmd_line_ptr;
    __u64 acpi_rsdp_addr; __u8 e820_entries; struct setup_header hdr;
    struct boot_e820_entry e820_table[...];
    ...;
};

/* Thin wrappers so the variadic ioctl() is called with fixed argument types;
   cffi releases the GIL around every call, which KVM_RUN needs. */
int sv_ioctl_ptr(int fd, unsigned long request, void *arg);
int sv_ioctl_val(int fd, unsigned long request, unsigned long arg);
"""

SOURCE = """
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <asm/bootparam.h>
#include <asm/processor-flags.h>
#include <stddef.h>
#define SV_IRQCHIP_CHIP_OFFSET offsetof(struct kvm_irqchip, chip)
#define SV_IRQCHIP_CHIP_SIZE sizeof(((struct kvm_irqchip *)0)->chip)
#define SV_PIC_IRR_OFFSET offsetof(struct kvm_pic_state, irr)
#define SV_IOAPIC_ID_OFFSET offsetof(struct kvm_ioapic_state, id)
#define SV_IOAPIC_IRR_OFFSET offsetof(struct kvm_ioapic_state, irr)
#define SV_IOAPIC_REDIRTBL_OFFSET offsetof(struct kvm_ioapic_state, redirtbl)
#define SV_COALESCED_ZONE_SIZE sizeof(struct kvm_coalesced_mmio_zone)
#define SV_COALESCED_ZONE_PIO_OFFSET offsetof(struct kvm_coalesced_mmio_zone, pio)
#define SV_COALESCED_RING_ENTRIES_OFFSET offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio)
#define SV_COALESCED_ENTRY_SIZE sizeof(struct kvm_coalesced_mmio)
#define SV_COALESCED_ENTRY_LEN_OFFSET offsetof(struct kvm_coalesced_mmio, len)
#define SV_COALESCED_ENTRY_DATA_OFFSET offsetof(struct kvm_coalesced_mmio, data)
#define SV_COALESCED_ENTRY_DATA_SIZE sizeof(((struct kvm_coalesced_mmio *)0)->data)
/* KVM_GET_XSAVE2 (Linux 5.17) sizes the buffer by KVM_CAP_XSAVE2; older headers lack it and
   we fall back to KVM_GET_XSAVE's fixed 4 KiB struct kvm_xsave. */
#ifdef KVM_GET_XSAVE2
#define SV_HAVE_XSAVE2 1
#define SV_KVM_CAP_XSAVE2 KVM_CAP_XSAVE2
#define SV_KVM_GET_XSAVE2 KVM_GET_XSAVE2
#else
#define SV_HAVE_XSAVE2 0
#define SV_KVM_CAP_XSAVE2 0
#define SV_KVM_GET_XSAVE2 0
#endif
static int sv_ioctl_ptr(int fd, unsigned long request, void *arg)
{ return ioctl(fd, request, arg); }
static int sv_ioctl_val(int fd, unsigned long request, unsigned long arg)
{ return ioctl(fd, request, arg); }
"""

ffibuilder = FFI()
ffibuilder.cdef(
    CDEF
    + "".join(f"static const unsigned long {name};\n" for name in IOCTLS)
    + "".join(f"static const long {name};\n" for name in CONSTANTS)
)
ffibuilder.set_source("splitvmm.native._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
