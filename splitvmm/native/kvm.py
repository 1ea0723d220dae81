"""One class per KVM fd type (kvm-ioctls shape): Kvm (/dev/kvm), VmFd, VcpuFd.

Every struct layout and ioctl number comes from <linux/kvm.h> through the cffi
module built by _build_kvm.py. Each wrapper checks the return value and raises
KvmError naming the ioctl.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from splitvmm.errors import KvmError, KvmUnavailable
from splitvmm.native._kvm import ffi, lib
from splitvmm.native.coalesced import CoalescedRing
from splitvmm.native.exits import INTERRUPTED, UNSTARTED, Exit, RunPage
from splitvmm.native.fd import OwnedFd
from splitvmm.native.routing import IRQCHIP_IOAPIC as IRQCHIP_IOAPIC
from splitvmm.native.routing import IRQCHIP_PIC_MASTER as IRQCHIP_PIC_MASTER
from splitvmm.native.routing import IRQCHIP_PIC_SLAVE as IRQCHIP_PIC_SLAVE
from splitvmm.native.routing import GsiRoute, IrqchipRoute, MsiRoute
from splitvmm.record import Struct

KVMIO = 0xAE  # the ioctl "type" byte of every KVM ioctl (<linux/kvm.h>)
U32 = 0xFFFFFFFF

# Every KVM ioctl we use, by its <linux/kvm.h> name: for seccomp rules that name them.
# (SV_KVM_GET_XSAVE2 is the build's stand-in for a header that may lack it: 0 there.)
IOCTL_NUMBERS: Mapping[str, int] = {
    name.removeprefix("SV_"): value
    for name in dir(lib)
    if name.startswith(("KVM_", "SV_KVM_"))
    and isinstance(value := getattr(lib, name), int)
    and (value >> 8) & 0xFF == KVMIO
}

KVM_PATH = "/dev/kvm"
DIRTY_PAGE = 4096  # what one bit of a KVM dirty log stands for: a page of x86 guest memory

# Header constants the monitor's vCPU setup needs, by their header names (<linux/kvm.h>,
# <asm/processor-flags.h>): code outside native/ never imports the cffi module itself.
KVM_CAP_TSC_DEADLINE_TIMER: int = lib.KVM_CAP_TSC_DEADLINE_TIMER
KVM_CAP_XCRS: int = lib.KVM_CAP_XCRS  # 1 where the host has XSAVE; KVM_CAP_XSAVE is 1 on any
KVM_CPUID_FLAG_SIGNIFCANT_INDEX: int = lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_MP_STATE_RUNNABLE: int = lib.KVM_MP_STATE_RUNNABLE
X86_CR0_PE: int = lib.X86_CR0_PE
X86_CR0_ET: int = lib.X86_CR0_ET
X86_CR0_NE: int = lib.X86_CR0_NE
X86_CR0_PG: int = lib.X86_CR0_PG
X86_CR4_PAE: int = lib.X86_CR4_PAE
X86_EFLAGS_FIXED: int = lib.X86_EFLAGS_FIXED

# Capabilities without which we refuse to start (one clear sentence names the missing one).
REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": lib.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IRQCHIP": lib.KVM_CAP_IRQCHIP,
    "KVM_CAP_IOEVENTFD": lib.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IRQFD": lib.KVM_CAP_IRQFD,
    "KVM_CAP_IMMEDIATE_EXIT": lib.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_EXT_CPUID": lib.KVM_CAP_EXT_CPUID,
    "KVM_CAP_SET_TSS_ADDR": lib.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_MP_STATE": lib.KVM_CAP_MP_STATE,
    "KVM_CAP_REINJECT_CONTROL": lib.KVM_CAP_REINJECT_CONTROL,
    "KVM_CAP_PIT2": lib.KVM_CAP_PIT2,  # KVM_CREATE_PIT2, and the PIT's state in a snapshot
    # A snapshot's vCPU and VM state (monitor/vmstate.py): refused at start, not when a
    # `ctl snapshot` first needs them (all in Linux since 2.6.33-35)
    "KVM_CAP_VCPU_EVENTS": lib.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_DEBUGREGS": lib.KVM_CAP_DEBUGREGS,
    "KVM_CAP_ADJUST_CLOCK": lib.KVM_CAP_ADJUST_CLOCK,
}

# Snapshot state sizes, all from <linux/kvm.h>: vmstate.py refuses raw state of any other size.
# KVM_GET_XSAVE's buffer; KVM_CAP_XSAVE2 >= this
XSAVE_MIN_SIZE: int = ffi.sizeof("struct kvm_xsave")
FPU_SIZE: int = ffi.sizeof("struct kvm_fpu")
LAPIC_SIZE: int = ffi.sizeof("struct kvm_lapic_state")
VCPU_EVENTS_SIZE: int = ffi.sizeof("struct kvm_vcpu_events")
DEBUGREGS_SIZE: int = ffi.sizeof("struct kvm_debugregs")
IRQCHIP_SIZE: int = lib.SV_IRQCHIP_CHIP_SIZE  # the `chip` union of struct kvm_irqchip
PIT_STATE2_SIZE: int = ffi.sizeof("struct kvm_pit_state2")
MAX_XCRS: int = lib.KVM_MAX_XCRS
# Where the IOAPIC's redirection table starts in KVM_GET_IRQCHIP's bytes (8 bytes a pin, laid
# out as the IOAPIC's own 64-bit redirection entries).
IOAPIC_REDIRTBL_OFFSET: int = lib.SV_IOAPIC_REDIRTBL_OFFSET
# Where its ID (the ID register's bits 27:24, as a number) sits in the same bytes.
IOAPIC_ID_OFFSET: int = lib.SV_IOAPIC_ID_OFFSET
# Where each PIT channel's count_load_time (host CLOCK_MONOTONIC ns) sits in kvm_pit_state2.
PIT_LOAD_TIME_OFFSETS = tuple(
    ffi.offsetof("struct kvm_pit_state2", "channels")
    + i * ffi.sizeof("struct kvm_pit_channel_state")
    + ffi.offsetof("struct kvm_pit_channel_state", "count_load_time")
    for i in range(len(ffi.new("struct kvm_pit_state2 *").channels))
)
# A struct's named fields as plain data: an int field is its width in bits, an array of ints
# is (bits, length), a nested struct is its own layout. Derived from the header, so the
# snapshot codec checks ranges against the kernel's real types.
Layout = dict[str, "int | tuple[int, int] | Layout"]


def _layout(ctype: Any) -> Layout:
    out: Layout = {}
    for name, field in ctype.fields:
        t = field.type
        if t.kind == "struct":
            out[name] = _layout(t)
        elif t.kind == "array":
            out[name] = (ffi.sizeof(t.item) * 8, t.length)
        else:
            out[name] = ffi.sizeof(t) * 8
    return out


REGS_LAYOUT: Layout = _layout(ffi.typeof("struct kvm_regs"))
SREGS_LAYOUT: Layout = _layout(ffi.typeof("struct kvm_sregs"))


def _struct_type(cdata: Any) -> Any:
    t = ffi.typeof(cdata)
    return t.item if t.kind == "pointer" else t


def _to_plain(cdata: Any) -> dict[str, Any]:
    """A struct's named fields as nested dicts of ints (arrays as lists)."""
    out: dict[str, Any] = {}
    for name, field in _struct_type(cdata).fields:
        value = getattr(cdata, name)
        if field.type.kind == "struct":
            out[name] = _to_plain(value)
        elif field.type.kind == "array":
            out[name] = list(value)
        else:
            out[name] = value
    return out


def _fill(cdata: Any, plain: Mapping[str, Any]) -> None:
    """Writes `plain` (the shape _to_plain gives) into `cdata`; fields not named stay zero."""
    for name, field in _struct_type(cdata).fields:
        if field.type.kind == "struct":
            _fill(getattr(cdata, name), plain[name])
        elif field.type.kind == "array":
            getattr(cdata, name)[0 : field.type.length] = list(plain[name])
        else:
            setattr(cdata, name, plain[name])


def _raw_get(fd: int, ctype: str, request: int, what: str) -> bytes:
    # SAFETY: `buf` owns the struct's memory until it is copied out below.
    buf = ffi.new(f"{ctype} *")
    _ioctl_ptr(fd, request, buf, what)
    return bytes(ffi.buffer(buf))


def _raw_set(fd: int, ctype: str, data: bytes, request: int, what: str) -> None:
    # SAFETY: `buf` owns the struct's memory and lives until the ioctl returns.
    buf = ffi.new(f"{ctype} *")
    if len(data) != ffi.sizeof(buf[0]):
        raise ValueError(f"{what}: {len(data)} bytes given, {ctype} is {ffi.sizeof(buf[0])}")
    ffi.memmove(buf, data, len(data))
    _ioctl_ptr(fd, request, buf, what)


def _retried(call: Callable[[], int], what: str) -> int:
    """An ioctl's result, made again where a signal interrupted it (EINTR), as Python makes
    its own system calls again (PEP 475): the signal's handler has run by then (a stop
    signal while the monitor builds a VM sets a flag its build looks at next), and an
    interrupted ioctl did nothing (the kernel asks for a restart: Python installs no handler
    with SA_RESTART). A SIGTERM during KVM_CREATE_VM ended `up` with "Interrupted system
    call" and status 1, not a clean stop. KVM_RUN is none of these: interrupted, it is a
    kick (VcpuFd.run)."""
    while True:
        ret = call()
        if ret >= 0:
            return ret
        if ffi.errno != errno.EINTR:
            raise KvmError(ffi.errno, what)


def _ioctl_ptr(fd: int, request: int, arg: Any, what: str) -> int:
    return _retried(lambda: lib.sv_ioctl_ptr(fd, request, arg), what)


def _ioctl_val(fd: int, request: int, arg: int, what: str) -> int:
    return _retried(lambda: lib.sv_ioctl_val(fd, request, arg), what)


def _ioeventfd(eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None) -> Any:
    """struct kvm_ioeventfd for KVM_IOEVENTFD: KVM matches a deassign on all of these."""
    ioev = ffi.new("struct kvm_ioeventfd *", {"fd": eventfd, "addr": addr, "len": length})
    ioev.flags = lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
    if datamatch is not None:
        ioev.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioev.datamatch = datamatch
    return ioev


def _coalesced_zone(port: int, size: int) -> Any:
    """A struct kvm_coalesced_mmio_zone for ports (its pio member is in an unnamed union:
    written as bytes at the offset the header gives)."""
    zone = ffi.new("char[]", lib.SV_COALESCED_ZONE_SIZE)
    struct.pack_into("<QI", ffi.buffer(zone), 0, port, size)
    struct.pack_into("<I", ffi.buffer(zone), lib.SV_COALESCED_ZONE_PIO_OFFSET, 1)
    return zone


def _fill_route(entry: Any, route: GsiRoute) -> None:
    """One struct kvm_irq_routing_entry."""
    entry.gsi = route.gsi
    if isinstance(route, IrqchipRoute):
        entry.type = lib.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip, entry.u.irqchip.pin = route.irqchip, route.pin
    elif isinstance(route, MsiRoute):
        entry.type = lib.KVM_IRQ_ROUTING_MSI
        msi = entry.u.msi
        msi.address_lo, msi.address_hi = route.address & U32, route.address >> 32
        msi.data = route.data
    else:
        raise TypeError(f"GSI route {route!r} is neither an IrqchipRoute nor an MsiRoute")


def _xsave_size(check_extension: Callable[[int], int]) -> int:
    if lib.SV_HAVE_XSAVE2:
        size = check_extension(lib.SV_KVM_CAP_XSAVE2)
        if size > 0:
            return max(size, XSAVE_MIN_SIZE)
    return XSAVE_MIN_SIZE if check_extension(lib.KVM_CAP_XSAVE) > 0 else 0


class Kvm(OwnedFd):
    """/dev/kvm itself: API version, capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this host has no KVM") from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} is not accessible to this user: add it to the kvm group or run as root"
            ) from None
        super().__init__(fd)
        version = _ioctl_val(fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path} speaks KVM API {version}, we need {lib.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return _ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def require_caps(self) -> None:
        missing = [name for name, cap in REQUIRED_CAPS.items() if self.check_extension(cap) <= 0]
        if missing:
            raise KvmUnavailable(f"KVM on this host lacks {', '.join(missing)}")

    def vcpu_mmap_size(self) -> int:
        return _ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(
            lib.KVM_CAP_NR_VCPUS
        )

    def supported_cpuid(self) -> list[CpuidEntry]:
        nent = 256
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            ret = lib.sv_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == 0:
                return [CpuidEntry.from_c(buf.entries[i]) for i in range(buf.nent)]
            if ffi.errno != 7:  # E2BIG: the table is larger than our buffer; grow it
                raise KvmError(ffi.errno, "KVM_GET_SUPPORTED_CPUID")
            nent *= 2

    def xsave_size(self) -> int:
        """VmFd.xsave_size() asked of /dev/kvm: the same answer for this process (it depends on
        the process's arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) only); the API documents the VM fd."""
        return _xsave_size(self.check_extension)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves/restores for a vCPU (msrs_to_save +
        emulated_msrs). The first call with room for none learns the count (E2BIG)."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        if lib.sv_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, probe) == 0:
            return []
        if ffi.errno != errno.E2BIG:
            raise KvmError(ffi.errno, "KVM_GET_MSR_INDEX_LIST")
        n = probe.nmsrs
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        _ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def default_tsc_khz(self) -> int:
        """The TSC rate KVM gives a new vCPU here (KVM_GET_TSC_KHZ on a throwaway vCPU):
        what guest-measured ticks mean, and what a snapshot's rate is compared with."""
        with self.create_vm() as vm:
            vcpu = vm.create_vcpu(0, self.vcpu_mmap_size())
            try:
                return vcpu.tsc_khz()
            finally:
                vcpu.close()

    def create_vm(self) -> VmFd:
        return VmFd(_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM"), self)


# KVM_GET_MSRS / KVM_SET_MSRS refuse a call of MAX_IO_MSRS (256, arch/x86/kvm/x86.c, not UAPI)
# MSRs or more with E2BIG; a host listing ~100 MSRs plus the MTRRs and machine-check banks
# passes that (Firecracker splits its calls the same way).
MSRS_PER_CALL = 255


class CpuidEntry(Struct, frozen=True):
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_c(cls, e: Any) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


class ClockData(Struct, frozen=True):
    """struct kvm_clock_data: the VM's kvmclock (ns), and with which flags KVM reported it."""

    clock: int
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0


class VmFd(OwnedFd):
    """A VM: memory slots, irqchip, PIT, irqfd/ioeventfd registration, vCPU creation."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: int) -> int:
        return _ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        size: int,
        hva: int,
        readonly: bool = False,
        log_dirty: bool = False,
    ) -> None:
        """Make (or, same slot, gpa, size and hva, change the flags of) a memory slot.
        `log_dirty`: KVM logs the pages the vCPUs write to it (get_dirty_log)."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = (lib.KVM_MEM_READONLY if readonly else 0) | (
            lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        )
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = hva
        _ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The pages of the `size`-byte memory slot `slot` the vCPUs wrote since logging began
        or since the last call (KVM clears the log and write-protects them again): bit n % 8
        of byte n // 8 for its page n. KVM writes whole longs: the buffer is rounded up."""
        pages = -(-size // DIRTY_PAGE)
        bitmap = ffi.new("uint64_t[]", max(1, -(-pages // 64)))
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        _ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bytes(ffi.buffer(bitmap))[: -(-pages // 8)]

    def set_tss_addr(self, gpa: int) -> None:
        _ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, gpa: int) -> None:
        addr = ffi.new("__u64 *", gpa)
        _ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        _ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def set_pit_reinject(self, reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the in-kernel PIT re-injects the ticks a guest did
        not take in time (on after KVM_CREATE_PIT2). KVM's API documentation recommends off
        but for an OS that keeps time by counting PIT ticks (Linux 2.4); on AMD hosts it
        also keeps AVIC on (re-injection needs EOI exits, which AVIC does not give, and
        inhibits it: APICV_INHIBIT_REASON_PIT_REINJ). The switch waits out SRCU grace
        periods while it holds the PIT's lock (~15 ms here); with the PIT never
        re-injecting, the VM's close does not (monitor/machine.py)."""
        control = ffi.new("struct kvm_reinject_control *")
        control.pit_reinject = int(reinject)
        _ioctl_ptr(self.fd, lib.KVM_REINJECT_CONTROL, control, "KVM_REINJECT_CONTROL")

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """A write to `eventfd` raises GSI `gsi`. Without `resample_fd` KVM pulses the line
        (edge); with it KVM holds the line up (level) until the guest acknowledges the
        interrupt (EOI), then lowers it and signals `resample_fd`, so the device can
        raise it again if its condition still holds."""
        flags = 0 if resample_fd is None else lib.KVM_IRQFD_FLAG_RESAMPLE
        self._irqfd(eventfd, gsi, flags, resample_fd or 0)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        """Detach `eventfd` from `gsi`. KVM finishes any injection the eventfd already
        started before this returns."""
        self._irqfd(eventfd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN, 0)

    def _irqfd(self, eventfd: int, gsi: int, flags: int, resample_fd: int) -> None:
        irqfd = ffi.new(
            "struct kvm_irqfd *",
            {"fd": eventfd, "gsi": gsi, "flags": flags, "resamplefd": resample_fd},
        )
        _ioctl_ptr(self.fd, lib.KVM_IRQFD, irqfd, "KVM_IRQFD")

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        """A guest write of `length` bytes to `addr` (a port if `pio`, else a gpa), with
        `datamatch` as its value if given, signals `eventfd` inside KVM: no exit."""
        ioev = _ioeventfd(eventfd, addr, length, pio, datamatch)
        _ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, ioev, "KVM_IOEVENTFD")

    def unregister_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        """Undo register_ioeventfd with the same arguments: such writes exit again."""
        ioev = _ioeventfd(eventfd, addr, length, pio, datamatch)
        ioev.flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, ioev, "KVM_IOEVENTFD")

    def coalesced_pio_page(self) -> int:
        """The page of a vCPU's mapping that holds the VM's ring of coalesced writes, or 0
        where KVM coalesces no port writes (native/coalesced.py)."""
        if self.check_extension(lib.KVM_CAP_COALESCED_PIO) <= 0:
            return 0
        return max(0, self.check_extension(lib.KVM_CAP_COALESCED_MMIO))

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """Guest writes to ports [port, port + size) go to the coalesced ring, without an
        exit, while it has room (native/coalesced.py)."""
        zone = _coalesced_zone(port, size)
        _ioctl_ptr(self.fd, lib.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        """Writes to those ports exit again (writes already in the ring stay there). KVM waits
        out a grace period first: ~8 ms here, so not on a vCPU's thread."""
        zone = _coalesced_zone(port, size)
        _ioctl_ptr(
            self.fd, lib.KVM_UNREGISTER_COALESCED_MMIO, zone, "KVM_UNREGISTER_COALESCED_MMIO"
        )

    def set_gsi_routing(self, routes: Sequence[GsiRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replaces the whole GSI table (see routing.pc_default_routes)."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, route in enumerate(routes):
            _fill_route(table.entries[i], route)
        _ioctl_ptr(self.fd, lib.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def signal_msi(self, address: int, data: int) -> bool:
        """KVM_SIGNAL_MSI: send one MSI now. False when the guest blocked it (a masked or
        disabled LAPIC), True once delivered."""
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & U32, "address_hi": address >> 32, "data": data},
        )
        return _ioctl_ptr(self.fd, lib.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI") > 0

    def irq_line(self, irq: int, level: int) -> int:
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = level
        _ioctl_ptr(self.fd, lib.KVM_IRQ_LINE_STATUS, line, "KVM_IRQ_LINE_STATUS")
        return int(line.level)  # KVM reports back the delivery status in the same field

    def ioapic_irr(self) -> int:
        """The IOAPIC's interrupt request register: bit N set while pin N is asserted."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": IRQCHIP_IOAPIC})
        _ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        raw = ffi.buffer(chip)[lib.SV_IRQCHIP_CHIP_OFFSET + lib.SV_IOAPIC_IRR_OFFSET :][:4]
        return int.from_bytes(raw, "little")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the `chip` union (PIC master 0, PIC slave 1, IOAPIC 2) as bytes."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(chip)[lib.SV_IRQCHIP_CHIP_OFFSET :][:IRQCHIP_SIZE])

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        if len(data) != IRQCHIP_SIZE:
            raise ValueError(
                f"KVM_SET_IRQCHIP: {len(data)} bytes given, the chip is {IRQCHIP_SIZE}"
            )
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        start = lib.SV_IRQCHIP_CHIP_OFFSET
        ffi.buffer(chip)[start : start + IRQCHIP_SIZE] = data
        _ioctl_ptr(self.fd, lib.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: struct kvm_pit_state2 as bytes (needs KVM_CREATE_PIT2 first)."""
        return _raw_get(self.fd, "struct kvm_pit_state2", lib.KVM_GET_PIT2, "KVM_GET_PIT2")

    def set_pit2(self, data: bytes) -> None:
        _raw_set(self.fd, "struct kvm_pit_state2", data, lib.KVM_SET_PIT2, "KVM_SET_PIT2")

    def get_clock(self) -> ClockData:
        data = ffi.new("struct kvm_clock_data *")
        _ioctl_ptr(self.fd, lib.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return ClockData(data.clock, data.flags, data.realtime, data.host_tsc)

    def set_clock(self, clock: int, flags: int = 0, realtime: int = 0) -> None:
        """KVM_SET_CLOCK. Of the flags KVM acts on KVM_CLOCK_REALTIME only (it then advances
        `clock` by the CLOCK_REALTIME time elapsed since `realtime`); 0 sets `clock` as is."""
        data = ffi.new("struct kvm_clock_data *", {"clock": clock, "flags": flags})
        data.realtime = realtime
        _ioctl_ptr(self.fd, lib.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE state: KVM_CAP_XSAVE2's answer (> 4 KiB only when a
        dynamic feature such as AMX was permitted), 4 KiB with plain KVM_CAP_XSAVE, else 0."""
        return _xsave_size(self.check_extension)

    def create_vcpu(self, vcpu_id: int, mmap_size: int) -> VcpuFd:
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, vcpu_id, mmap_size)


class VcpuFd(OwnedFd):
    """A vCPU: its shared kvm_run page, KVM_RUN, and register state."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = RunPage(self._run_map)  # unmapped by close(), after the page is closed
        self._ring: CoalescedRing | None = None  # likewise

    def run(self) -> Exit:
        """KVM_RUN (GIL released by cffi) to the next exit, as a record (native/exits.py).

        INTERRUPTED when a signal or immediate_exit stopped it first (EINTR); UNSTARTED
        when it is an AP not started yet that something woke (EAGAIN: exits.Unstarted)."""
        if lib.sv_ioctl_val(self.fd, lib.KVM_RUN, 0) < 0:
            err = ffi.errno
            if err == errno.EINTR:
                return INTERRUPTED
            if err == errno.EAGAIN:
                return UNSTARTED
            raise KvmError(err, "KVM_RUN")
        return self._page.decode()

    def complete_read(self, data: bytes) -> None:
        """What the pending PioIn (size * count bytes) or MmioRead (size bytes) reads; the
        next run() hands it to the guest."""
        self._page.complete_read(data)

    def set_immediate_exit(self, on: bool) -> None:
        """While on, run() finishes a pending I/O exit and returns INTERRUPTED without
        entering the guest: how a kick that races with KVM_RUN's entry is never lost."""
        self._page.set_immediate_exit(on)

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        _ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: Any) -> None:
        _ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        _ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl_ptr(self.fd, lib.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        _ioctl_ptr(self.fd, lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            c = buf.entries[i]
            c.function, c.index, c.flags = e.function, e.index, e.flags
            c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid(self, capacity: int = 256) -> list[CpuidEntry]:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": capacity, "entries": capacity})
        _ioctl_ptr(self.fd, lib.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [CpuidEntry.from_c(buf.entries[i]) for i in range(buf.nent)]

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS in `msrs`' order, MSRS_PER_CALL at a time; KvmError naming the
        first MSR KVM refused."""
        items = list(msrs.items())
        for start in range(0, len(items), MSRS_PER_CALL):
            part = items[start : start + MSRS_PER_CALL]
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(part), "entries": len(part)})
            for i, (index, value) in enumerate(part):
                buf.entries[i].index = index
                buf.entries[i].data = value
            done = _ioctl_ptr(self.fd, lib.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
            if done != len(part):
                raise KvmError(22, f"KVM_SET_MSRS (MSR {part[done][0]:#x} refused)")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS, MSRS_PER_CALL at a time: the MSRs read, in order, up to the first
        one KVM could not read (as one call returns them)."""
        values: dict[int, int] = {}
        for start in range(0, len(indices), MSRS_PER_CALL):
            part = indices[start : start + MSRS_PER_CALL]
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(part), "entries": len(part)})
            for i, index in enumerate(part):
                buf.entries[i].index = index
            done = _ioctl_ptr(self.fd, lib.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
            values.update((buf.entries[i].index, buf.entries[i].data) for i in range(done))
            if done < len(part):
                break
        return values

    def get_lapic(self) -> bytearray:
        lapic = ffi.new("struct kvm_lapic_state *")
        _ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(lapic))

    def set_lapic(self, regs: bytes) -> None:
        """KVM_SET_LAPIC from exactly LAPIC_SIZE bytes (what get_lapic gives)."""
        _raw_set(self.fd, "struct kvm_lapic_state", regs, lib.KVM_SET_LAPIC, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        _ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        _ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def tsc_khz(self) -> int:
        """The guest TSC frequency, to turn guest-measured ticks into time."""
        return _ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: fails unless the host can scale the TSC (or khz is the host's)."""
        _ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell a kvmclock guest it was paused (no soft-lockup warning).
        EINVAL when the guest has not enabled kvmclock."""
        _ioctl_val(self.fd, lib.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    def get_regs_dict(self) -> dict[str, int]:
        """KVM_GET_REGS as {name: value} for the fields of struct kvm_regs (REGS_LAYOUT)."""
        return _to_plain(self.get_regs())

    def set_regs_dict(self, regs: Mapping[str, int]) -> None:
        buf = ffi.new("struct kvm_regs *")
        _fill(buf, regs)
        self.set_regs(buf)

    def get_sregs_dict(self) -> dict[str, Any]:
        """KVM_GET_SREGS as nested dicts: segments and tables by name, interrupt_bitmap a list
        (SREGS_LAYOUT); padding fields are not named."""
        return _to_plain(self.get_sregs())

    def set_sregs_dict(self, sregs: Mapping[str, Any]) -> None:
        buf = ffi.new("struct kvm_sregs *")
        _fill(buf, sregs)
        self.set_sregs(buf)

    def get_fpu_bytes(self) -> bytes:
        return _raw_get(self.fd, "struct kvm_fpu", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu_bytes(self, data: bytes) -> None:
        """KVM_SET_FPU. On an XSAVE host it writes the legacy area but not the XSAVE header's
        xstate_bv: with the SSE bit clear (a fresh vCPU) KVM_GET_FPU shows the new XMM values
        but KVM_GET_XSAVE reports SSE in its init state (zeros), as would an XRSTOR. Use
        set_xsave there."""
        _raw_set(self.fd, "struct kvm_fpu", data, lib.KVM_SET_FPU, "KVM_SET_FPU")

    def get_xsave(self, size: int = XSAVE_MIN_SIZE) -> bytes:
        """The XSAVE area, `size` bytes as VmFd.xsave_size() gives: KVM_GET_XSAVE for the
        4 KiB struct kvm_xsave, KVM_GET_XSAVE2 beyond it (same layout, dynamic features added)."""
        if size < XSAVE_MIN_SIZE or (size > XSAVE_MIN_SIZE and not lib.SV_HAVE_XSAVE2):
            raise ValueError(f"KVM_GET_XSAVE: cannot read {size} bytes of XSAVE state")
        buf = ffi.new("char[]", size)  # SAFETY: `buf` owns the memory until we copy it out
        if size == XSAVE_MIN_SIZE:
            _ioctl_ptr(self.fd, lib.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        else:
            _ioctl_ptr(self.fd, lib.SV_KVM_GET_XSAVE2, buf, "KVM_GET_XSAVE2")
        return bytes(ffi.buffer(buf))

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says: pass exactly that many."""
        if len(data) < XSAVE_MIN_SIZE:
            raise ValueError(f"KVM_SET_XSAVE: {len(data)} bytes < {XSAVE_MIN_SIZE}")
        buf = ffi.new("char[]", data)  # SAFETY: `buf` lives until the ioctl returns
        _ioctl_ptr(self.fd, lib.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS as {xcr index: value} (XCR0 is the only one x86 has today)."""
        buf = ffi.new("struct kvm_xcrs *")
        _ioctl_ptr(self.fd, lib.KVM_GET_XCRS, buf, "KVM_GET_XCRS")
        return {buf.xcrs[i].xcr: buf.xcrs[i].value for i in range(buf.nr_xcrs)}

    def set_xcrs(self, xcrs: Mapping[int, int]) -> None:
        if len(xcrs) > MAX_XCRS:
            raise ValueError(f"KVM_SET_XCRS: {len(xcrs)} XCRs > {MAX_XCRS}")
        buf = ffi.new("struct kvm_xcrs *", {"nr_xcrs": len(xcrs)})
        for i, (xcr, value) in enumerate(xcrs.items()):
            buf.xcrs[i].xcr, buf.xcrs[i].value = xcr, value
        _ioctl_ptr(self.fd, lib.KVM_SET_XCRS, buf, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> bytes:
        """KVM_GET_VCPU_EVENTS: pending/injected exception, interrupt, NMI, SMI, as bytes."""
        return _raw_get(
            self.fd, "struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS"
        )

    def set_vcpu_events(self, data: bytes) -> None:
        _raw_set(
            self.fd, "struct kvm_vcpu_events", data, lib.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS"
        )

    def get_debugregs(self) -> bytes:
        return _raw_get(self.fd, "struct kvm_debugregs", lib.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        _raw_set(self.fd, "struct kvm_debugregs", data, lib.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS")

    def translate(self, linear: int) -> int | None:
        """Guest linear -> physical address through the vCPU's page tables, or None."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        _ioctl_ptr(self.fd, lib.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr.physical_address if tr.valid else None

    def coalesced_ring(self, page: int) -> CoalescedRing:
        """The VM's ring of coalesced writes as this vCPU's mapping shows it (page: from
        VmFd.coalesced_pio_page()); closed with this fd."""
        if self._ring is None:
            self._ring = CoalescedRing(self._run_map, page)
        return self._ring

    def close(self) -> None:
        if self.fd >= 0:
            self._page.close()
            if self._ring is not None:
                self._ring.close()
            self._run_map.close()
        super().close()
