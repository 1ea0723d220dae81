"""A firmware boot's vCPUs at power-on, against real KVM and through `splitvmm up`: the state
the SDM gives a processor after RESET (Vol. 3A, "Processor State After Reset", table
"IA-32 and Intel 64 Processor States Following Power-up, Reset, or INIT"), which QEMU's
x86_cpu_reset_hold sets too: EDX holds the processor signature (CPUID.01H:EAX)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.monitor import boot
from splitvmm.monitor.cpuid import CpuidMask
from splitvmm.monitor.layout import KVM_TSS
from splitvmm.monitor.loader import load_firmware
from splitvmm.monitor.memory import GuestMemory
from splitvmm.native.kvm import Kvm, VcpuFd
from tests.integration.conftest import run_up

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def firmware_vcpus(kvm: Kvm, tmp_path: Path) -> Iterator[list[VcpuFd]]:
    """Two vCPUs of a firmware boot, made ready by boot.prepare() as machine.py does."""
    image = tmp_path / "fw.bin"
    image.write_bytes(bytes(64 << 10))
    mem = GuestMemory(16 << 20)
    with kvm.create_vm() as vm:
        vm.set_tss_addr(KVM_TSS)
        vm.create_irqchip()
        vcpus = [vm.create_vcpu(i, kvm.vcpu_mmap_size()) for i in range(2)]
        boot.prepare(kvm, mem, vcpus, load_firmware(image), CpuidMask.parse(()))
        yield vcpus
        for v in vcpus:
            v.close()
    mem.close()


def test_firmware_boot_vcpus_start_with_their_cpu_signature_in_edx(firmware_vcpus) -> None:
    for v in firmware_vcpus:
        leaf1 = next(e for e in v.get_cpuid() if (e.function, e.index) == (1, 0))
        assert (v.vcpu_id, v.get_regs().rdx) == (v.vcpu_id, leaf1.eax)


# The reset vector saves EDX before anything touches it, then compares it with CPUID.01H:EAX:
# debug-exit status 3 (value 1) when they match, 5 (value 2) when they differ.
EDX_FIRMWARE = """
.code16
start:
  mov $1, %eax
  cpuid
  cmp %eax, %esi
  jne 1f
  mov $0x01, %al
  out %al, $0xf4
1:
  mov $0x02, %al
  out %al, $0xf4
.org 0xfff0
  mov %edx, %esi
  ljmp $0xf000, $start
.org 0x10000
"""


def test_firmware_reads_its_cpu_signature_in_edx_at_the_reset_vector(tmp_path) -> None:
    src, obj, out = tmp_path / "fw.S", tmp_path / "fw.o", tmp_path / "fw.bin"
    src.write_text(EDX_FIRMWARE)
    subprocess.run(["as", "--32", str(src), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(obj), str(out)], check=True)

    run = run_up(tmp_path, f'firmware = "{out}"')

    assert run.status == 3, run.stderr
