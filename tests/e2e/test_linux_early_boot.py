"""A stock Linux kernel (Debian's cloud kernel, from `splitvmm guest build`) through `splitvmm up`.

On hardware KVM it boots to the initramfs's /init and resets the VM. On a PVM
host (software KVM, see README) guest kernel code is emulated and the kernel
stops at its int3 self-test after a few minutes: there we check its own early
output came through our serial device and that the VM ended with the clear
emulation-failure report, not a hang.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from tests.integration.conftest import run_up

pytestmark = [pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kit")
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", "guest", "build", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    config = tomllib.loads((cache / "debian.toml").read_text())
    for key in ("kernel", "initrd"):  # named in the kit's directory, the config's own
        config["boot"][key] = str(cache / config["boot"][key])
    return config


# Linux's early ACPI table list (drivers/acpi/acpica/tbprint.c) and its choice of the MADT
# over the MP table (arch/x86/kernel/acpi/boot.c), printed long before the int3 self-test.
ACPI_TABLE_LINES = ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG")
ACPI_SMP_LINE = "ACPI: Using ACPI (MADT) for SMP configuration information"
# The MADT's IOAPIC as Linux registered it (arch/x86/kernel/apic/io_apic.c mp_register_ioapic):
# the ID its register holds (monitor/layout.py IOAPIC_ID), KVM's version, every GSI it has.
IOAPIC_LINE = "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23"


def test_linux_prints_banner_e820_and_acpi_tables_then_boots_or_stops_clearly(kit, tmp_path):
    boot = kit["boot"]
    run = run_up(
        tmp_path,
        f'kernel = "{boot["kernel"]}"\ninitrd = "{boot["initrd"]}"\ncmdline = "{boot["cmdline"]}"',
        memory="512M",
        vcpus=2,
        timeout=800,
    )
    assert "Linux version 6." in run.serial
    assert "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable" in run.serial
    assert "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable" in run.serial
    assert "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved" in run.serial
    missing = [t for t in ACPI_TABLE_LINES if f"ACPI: {t} 0x" not in run.serial]
    assert missing == [], run.serial
    assert ACPI_SMP_LINE in run.serial
    assert IOAPIC_LINE in run.serial
    if run.status == 0:  # hardware KVM: the kernel reached our /init and reset the VM
        assert "splitvmm demo guest: init running" in run.serial
        return
    assert run.status == 4, run.stderr
    assert "the host's KVM could not emulate the guest instruction at RIP 0xffffffff" in run.stderr
    assert "bytes [cc" in run.stderr  # int3: the kernel's self-test, the first it cannot pass
