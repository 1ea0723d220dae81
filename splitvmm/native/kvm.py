"""One class per KVM fd type (kvm-ioctls shape): Kvm (/dev/kvm), VmFd, VcpuFd.

Every struct layout and ioctl number comes from <linux/kvm.h> through the cffi
module built by _build_kvm.py. Each wrapper checks the return value and raises
KvmError naming the ioctl.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

from splitvmm.errors import KvmError, KvmUnavailable
from splitvmm.native._kvm import ffi, lib

KVM_PATH = "/dev/kvm"

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
}


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise KvmError(ffi.errno, what)
    return ret


def _ioctl_ptr(fd: int, request: int, arg: Any, what: str) -> int:
    return _check(lib.sv_ioctl_ptr(fd, request, arg), what)


def _ioctl_val(fd: int, request: int, arg: int, what: str) -> int:
    return _check(lib.sv_ioctl_val(fd, request, arg), what)


class _Fd:
    """An owned fd, closed once, usable as a context manager."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Kvm(_Fd):
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

    def create_vm(self) -> VmFd:
        return VmFd(_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM"), self)


@dataclass(frozen=True, slots=True)
class CpuidEntry:
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


class VmFd(_Fd):
    """A VM: memory slots, irqchip, PIT, irqfd/ioeventfd registration, vCPU creation."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: int) -> int:
        return _ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, hva: int, readonly: bool = False
    ) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = lib.KVM_MEM_READONLY if readonly else 0
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = hva
        _ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

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

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *")
        irqfd.fd = eventfd
        irqfd.gsi = gsi
        _ioctl_ptr(self.fd, lib.KVM_IRQFD, irqfd, "KVM_IRQFD")

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        ioev = ffi.new("struct kvm_ioeventfd *")
        ioev.fd = eventfd
        ioev.addr = addr
        ioev.len = length
        ioev.flags = lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            ioev.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            ioev.datamatch = datamatch
        _ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, ioev, "KVM_IOEVENTFD")

    def irq_line(self, irq: int, level: int) -> int:
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = level
        _ioctl_ptr(self.fd, lib.KVM_IRQ_LINE_STATUS, line, "KVM_IRQ_LINE_STATUS")
        return line.level  # KVM reports back the delivery status in the same field

    def ioapic_irr(self) -> int:
        """The IOAPIC's interrupt request register: bit N set while pin N is asserted."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = 2  # KVM_IRQCHIP_IOAPIC
        _ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        raw = ffi.buffer(chip)[lib.SV_IRQCHIP_CHIP_OFFSET + lib.SV_IOAPIC_IRR_OFFSET :][:4]
        return int.from_bytes(raw, "little")

    def create_vcpu(self, vcpu_id: int, mmap_size: int) -> VcpuFd:
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, vcpu_id, mmap_size)


class VcpuFd(_Fd):
    """A vCPU: its shared kvm_run page, KVM_RUN, and register state."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # SAFETY: self._run_map owns the kvm_run page and lives as long as this object;
        # `run` is only used while it does (close() drops `run` before unmapping).
        self._run_buf = ffi.from_buffer(self._run_map)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._run_buf)

    def run(self) -> int:
        """KVM_RUN (GIL released by cffi). Returns 0, or -EINTR when kicked by a signal."""
        ret = lib.sv_ioctl_val(self.fd, lib.KVM_RUN, 0)
        if ret < 0:
            err = ffi.errno
            if err in (4, 11):  # EINTR, EAGAIN: a kick; the caller looks at immediate_exit
                return -err
            raise KvmError(err, "KVM_RUN")
        return ret

    def io_data(self, offset: int, length: int) -> memoryview:
        """The kvm_run page bytes KVM uses for a PIO exit's data (data_offset from kvm_run)."""
        return memoryview(self._run_map)[offset : offset + length]

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
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = _ioctl_ptr(self.fd, lib.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError(22, f"KVM_SET_MSRS (MSR {bad:#x} refused)")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = _ioctl_ptr(self.fd, lib.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def get_lapic(self) -> bytearray:
        lapic = ffi.new("struct kvm_lapic_state *")
        _ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(lapic))

    def set_lapic(self, regs: bytes) -> None:
        lapic = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(lapic, regs, ffi.sizeof(lapic[0]))
        _ioctl_ptr(self.fd, lib.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        _ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        _ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def tsc_khz(self) -> int:
        """The guest TSC frequency, to turn guest-measured ticks into time."""
        return _ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def translate(self, linear: int) -> int | None:
        """Guest linear -> physical address through the vCPU's page tables, or None."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        _ioctl_ptr(self.fd, lib.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr.physical_address if tr.valid else None

    def close(self) -> None:
        if self.fd >= 0:
            self.run_struct = None
            self._run_buf = None
            self._run_map.close()
        super().close()
