"""Boot: put the kernel or firmware in guest memory and the vCPUs in their start state.

Kernel (bzImage or ELF): loader.py places kernel, initrd, command line and zero
page; the MP table lists every vCPU; the BSP starts at the 64-bit entry and
the APs wait for INIT/SIPI in the in-kernel LAPIC, as on a PC. Firmware: a
flat image mapped read-only at the top of 4 GiB, its tail copied into RAM below
1 MiB (layout.FIRMWARE_SHADOW); every vCPU keeps KVM's reset state, so the BSP
starts at the reset vector in real mode, with what KVM's reset leaves out of the SDM's
power-up state added (boot64.setup_power_on).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from splitvmm.config import VmConfig
from splitvmm.errors import ConfigError
from splitvmm.monitor import acpi, boot64, cpuid, layout, loader, mptable
from splitvmm.monitor.memory import GuestMemory
from splitvmm.native.kvm import Kvm, VcpuFd, VmFd
from splitvmm.native.mem import mapping_address
from splitvmm.protocol.models import MODELS, PortWindow

FIRMWARE_SLOT_BASE = 16  # memslots after RAM's (RAM uses at most a few)


class Firmware:
    """The firmware's ROM: the image in its own (unsealed, read-only to the guest) memfd
    mapping."""

    def __init__(self, vm: VmFd, image: loader.FirmwareImage) -> None:
        fd = os.memfd_create("firmware", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(image.data))
            self.map = mmap.mmap(fd, len(image.data), mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.map[:] = image.data
        rom = image.rom
        hva = mapping_address(self.map, rom.offset)
        vm.set_user_memory_region(FIRMWARE_SLOT_BASE, rom.gpa, rom.size, hva, readonly=True)

    def close(self) -> None:
        self.map.close()


def write_shadow(mem: GuestMemory, image: loader.FirmwareImage) -> None:
    """The firmware's tail into RAM below 1 MiB, as it is in the image: what a boot's first
    instruction reads (layout.FIRMWARE_SHADOW)."""
    mem.write(image.shadow.gpa, image.shadow_bytes())


def acpi_windows(cfg: VmConfig) -> list[PortWindow]:
    """The configured devices an OS finds through the DSDT (those with a PNP id)."""
    windows = [MODELS[d.model].transport for d in cfg.devices]
    return [w for w in windows if isinstance(w, PortWindow) and w.acpi_hid is not None]


def firmware_without_clock(cfg: VmConfig) -> bool:
    """A firmware boot with no CMOS clock (`vm.rtc = false`): every CMOS register then reads
    0xFF, and a PC firmware that finds no fw_cfg (none here) takes its RAM size and boot
    settings from them: SeaBIOS sees ~4 GiB of RAM that is not there."""
    return cfg.boot.firmware is not None and not any(
        w.acpi_hid == acpi.RTC_HID for w in acpi_windows(cfg)
    )


def check_physical_bits(ram_size: int, bits: int) -> None:
    """Refuse RAM the guest's CPUs cannot address: its top (past 4 GiB, once RAM passes the
    PCI hole) within the physical-address width CPUID tells them, as QEMU refuses it. An OS
    would take the e820 map's RAM and fault on reserved address bits there."""
    top = max(gpa + size for gpa, size in layout.ram_ranges(ram_size))
    if top > 1 << bits:
        limit = 1 << bits  # below 4 GiB, the RAM under the PCI hole is all that may fit
        fits = (
            min(limit, layout.MMIO32_START)
            if limit <= layout.FOUR_GIB
            else limit - (layout.FOUR_GIB - layout.MMIO32_START)
        )
        raise ConfigError(
            f"vm.memory: {ram_size >> 20} MiB puts RAM up to {top:#x}, past the {bits}-bit "
            f"physical addresses this VM's CPUs have (CPUID 0x80000008, the host's or "
            f"vm.cpuid_mask's): at most {fits >> 20} MiB fits"
        )


def check_cpu(cfg: VmConfig, kvm: Kvm) -> cpuid.CpuidMask:
    """A boot's vm.cpuid_mask, parsed, for prepare(): checked before any device process
    starts, as load_kernel's files are, with vm.memory within the physical-address width the
    masked CPUID gives (the normalizers leave 0x80000008 EAX)."""
    mask = cpuid.CpuidMask.parse(cfg.vm.cpuid_mask)
    bits = cpuid.physical_address_bits(mask.apply(kvm.supported_cpuid()))
    check_physical_bits(cfg.vm.memory, bits)
    return mask


def load_kernel(
    cfg: VmConfig, mem: GuestMemory, vcpus: int, pci_intx: Sequence[tuple[int, int]] = ()
) -> loader.LoadedKernel:
    """A kernel boot's ACPI tables, kernel, initrd, command line and zero page in guest RAM:
    all of a boot that a bad file or setting makes fail, so machine.py does it before any
    device process starts. After, a refused kernel also ended devices on their way up, and
    their words (a channel refused, a traceback) followed the error. `pci_intx`: (PCI
    device, GSI) of each PCI device's INTA#, for the ACPI tables."""
    assert cfg.boot.kernel is not None
    acpi_tables = acpi.build(vcpus, acpi_windows(cfg), pci_intx)
    mem.write(acpi_tables.base, acpi_tables.data)
    return loader.load_linux(
        mem, cfg.boot.kernel, cfg.boot.initrd, cfg.boot.cmdline, acpi_rsdp_addr=acpi_tables.base
    )


def prepare(
    kvm: Kvm,
    mem: GuestMemory,
    vcpus: list[VcpuFd],
    boots: loader.LoadedKernel | loader.FirmwareImage,
    mask: cpuid.CpuidMask,
    pci_intx: Sequence[tuple[int, int]] = (),
) -> None:
    """A fresh boot: every vCPU's CPUID (`mask`: what check_cpu() checked) and LAPIC, and the
    entry state of the kernel load_kernel() put in memory, or the firmware's shadow."""
    tables = [cpuid.setup_cpuid(kvm, v, len(vcpus), mask) for v in vcpus]
    for v in vcpus:
        boot64.setup_lapic_lints(v)
    if isinstance(boots, loader.FirmwareImage):
        write_shadow(mem, boots)
        for v, table in zip(vcpus, tables, strict=True):
            boot64.setup_power_on(v, table)
        return  # otherwise KVM's reset state (the BSP at the reset vector)
    kernel = boots
    leaf1 = next((e for e in tables[0] if e.function == 1), None)
    mptable.write_mptable(mem, len(vcpus), leaf1, pci_intx)
    boot64.write_boot_tables(mem)
    boot64.setup_vcpu_64(vcpus[0], kernel.entry)
    for ap in vcpus[1:]:
        # The MSRs firmware sets on every CPU, not the BSP only: an AP left at KVM's reset
        # values has its fast strings off (Linux then turns ERMS off for every CPU) and
        # MTRRs that differ from the BSP's (Linux warns of a BIOS that set up one CPU).
        ap.set_msrs(boot64.boot_msrs())
