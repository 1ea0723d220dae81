"""The VM stops with a clear message, never a hang, when KVM cannot go on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import run_up

pytestmark = pytest.mark.kvm

# Real-mode firmware: a short prologue that proves the guest ran, then the instruction under test.
FIRMWARE_TEMPLATE = """
.code16
  mov $0x3f8, %dx
  mov $'R', %al
  out %al, %dx
  {insn}
  mov $0x01, %al
  out %al, $0xf4
.org 0xfff0
  ljmp $0xf000, $0x0000
.org 0x10000
"""


def firmware(tmp_path: Path, insn: str) -> Path:
    src, obj, out = tmp_path / "fw.S", tmp_path / "fw.o", tmp_path / "fw.bin"
    src.write_text(FIRMWARE_TEMPLATE.format(insn=insn))
    subprocess.run(["as", "--32", str(src), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(obj), str(out)], check=True)
    return out


def test_emulation_failure_stops_vm_naming_rip_and_bytes(tmp_path):
    # popcnt is one of the instructions PVM's emulator cannot run in guest kernel mode
    # (KVM-HERE.md); on hardware KVM it runs and the guest exits through 0xf4 instead.
    fw = firmware(tmp_path, "popcnt %ax, %bx")
    run = run_up(tmp_path, f'firmware = "{fw}"')
    if run.status == 3:
        pytest.skip("this host's KVM runs popcnt in guest kernel mode (hardware virtualization)")
    assert (run.status, run.serial) == (4, "R")
    assert "could not emulate the guest instruction at RIP 0x" in run.stderr
    assert "bytes [f3 0f b8 d8" in run.stderr


def test_firmware_starts_at_reset_vector_and_exits_with_status(tmp_path):
    fw = firmware(tmp_path, "nop")
    run = run_up(tmp_path, f'firmware = "{fw}"')
    assert (run.status, run.serial) == (3, "R")


def test_triple_fault_stops_vm_with_clear_message(tmp_path):
    # ud2 at the 64-bit entry: #UD with the loader's empty IDT (limit 0) escalates to a
    # triple fault, on hardware KVM and PVM alike.
    from tests.unit.images import Seg, make_elf

    elf = tmp_path / "ud2.elf"
    elf.write_bytes(make_elf([Seg(paddr=0x200000, data=b"\x0f\x0b")], entry=0x200000))
    run = run_up(tmp_path, f'kernel = "{elf}"')
    assert run.status == 4
    assert "the guest triple-faulted (KVM_EXIT_SHUTDOWN) at RIP 0x200000" in run.stderr
