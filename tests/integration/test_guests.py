"""Every test guest through `splitvmm up`, its serial output read back from the device's file."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from splitvmm.monitor.cpuid import physical_address_bits
from splitvmm.native.kvm import Kvm
from tests.integration.conftest import run_up, vm_toml
from tests.integration.vmproc import VmProcess

pytestmark = pytest.mark.kvm


def kernel(guests, name: str, cmdline: str = "") -> str:
    return f'kernel = "{guests[name]}"\ncmdline = "{cmdline}"'


def test_hello_greets_over_serial_and_resets_with_status_0(guests, tmp_path):
    run = run_up(tmp_path, kernel(guests, "hello", "console=ttyS0 x=1"))
    assert run.status == 0, run.stderr
    assert run.serial.startswith("Hello from a splitvmm test guest!\n")
    assert "cmdline: console=ttyS0 x=1\n" in run.serial
    assert "guest reset through the i8042 controller" in run.stderr


def test_hello_resets_through_0xcf9_with_status_0(guests, tmp_path):
    """Linux's reboot=pci: the chipset's reset control register ends the VM as a reset. It
    was absent I/O, and a guest went on to its next way out (Linux's: a triple fault, which
    ends the VM as a fault)."""
    run = run_up(tmp_path, kernel(guests, "hello", "reset=cf9"))
    assert run.status == 0, run.stderr
    assert "guest reset through the reset control register (0xCF9)" in run.stderr


def test_hello_string_io_reads_all_ones_where_no_device_is_and_writes_each_byte_to_com1(
    guests, tmp_path
):
    """`rep insb` of 4 KiB from port 0x80 (unclaimed: the bus answers it in one step), and
    `rep outsb` to COM1's THR, 16 bytes (the transmit FIFO) each time THRE is set: each byte
    a write the serial device takes."""
    run = run_up(tmp_path, kernel(guests, "hello", "rep=4096"))
    assert run.status == 0, run.stderr
    assert "rep ins: 4096 of 4096 bytes read 0xff\n" in run.serial
    assert "r" * 4096 + "\nrep outs: done\n" in run.serial


def test_hello_sees_e820_map_with_ebda_ecam_and_kvm_pages_reserved(guests, tmp_path):
    run = run_up(tmp_path, kernel(guests, "hello"), memory="64M")
    entries = re.findall(r"e820: (0x[0-9a-f]+)-(0x[0-9a-f]+) (\d+)", run.serial)
    assert entries == [
        ("0x0000000000000000", "0x000000000009fc00", "1"),
        ("0x000000000009fc00", "0x0000000000100000", "2"),
        ("0x0000000000100000", "0x0000000004000000", "1"),
        ("0x00000000e0000000", "0x00000000e0100000", "2"),
        ("0x00000000feffc000", "0x00000000ff000000", "2"),  # KVM's identity map and TSS
    ]


def test_hello_large_memory_splits_ram_around_pci_hole(guests, tmp_path):
    run = run_up(tmp_path, kernel(guests, "hello"), memory="4G")
    assert "e820: 0x0000000000100000-0x00000000c0000000 1" in run.serial
    assert "e820: 0x0000000100000000-0x0000000140000000 1" in run.serial


def test_ram_past_the_guests_physical_address_bits_is_refused_naming_the_key(guests, tmp_path):
    """4G of RAM reaches 5 GiB (past the PCI hole): with CPUID telling the guest 32 physical
    address bits (vm.cpuid_mask clears the rest of this host's), it would fault there."""
    host_bits = physical_address_bits(Kvm().supported_cpuid())
    if not 32 <= host_bits < 64:
        pytest.skip(f"this host's CPUID says {host_bits} physical address bits")
    mask = f'cpuid_mask = ["0x80000008.eax:{host_bits & ~32:#x}"]\n'
    run = run_up(tmp_path, kernel(guests, "hello"), memory="4G", vm_extra=mask)
    assert run.status == 1 and "vm.memory: 4096 MiB puts RAM up to 0x140000000" in run.stderr
    assert "past the 32-bit physical addresses" in run.stderr and run.serial == ""


@pytest.mark.parametrize("status,expected", [(3, 7), (0, 1), (42, 85)])
def test_exit_status_guest_value_becomes_debug_exit_status(guests, tmp_path, status, expected):
    run = run_up(tmp_path, kernel(guests, "exit-status", f"status={status}"))
    assert (run.status, run.serial) == (expected, f"exiting with {status}\n")


@pytest.mark.parametrize("vcpus", [2, 4])
def test_smp_every_vcpu_reports_in(guests, tmp_path, vcpus):
    run = run_up(tmp_path, kernel(guests, "smp"), vcpus=vcpus)
    assert run.status == 33, run.serial + run.stderr
    online = sorted(int(n) for n in re.findall(r"^cpu (\d+) online$", run.serial, re.M))
    assert online == list(range(1, vcpus))
    assert f"smp: all {vcpus} cpus online" in run.serial


def thread_cpu_s(pid: int, name: str) -> float:
    """CPU seconds (user + system) of `pid`'s thread named `name`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == name:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime stime
    raise AssertionError(f"no thread {name} in {pid}")


def test_smp_ap_sent_an_nmi_before_its_start_costs_the_host_no_core(guests, tmp_path):
    """An NMI IPI to an AP no INIT and SIPI started stays pending in KVM, which makes every
    KVM_RUN of that AP return EAGAIN at once: its thread called KVM_RUN in a loop, a host
    core's worth (~95% of a CPU here) for the VM's life, from one guest write. Now it waits
    between them, and the AP still starts at its INIT and SIPI."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(
        vm_toml(kernel(guests, "smp", "nmi_first_ms=4000"), vcpus=2, serial_out=serial)
    )
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    try:
        vm.wait_for(r"^smp: NMI sent to the APs$", timeout=60)
        before = thread_cpu_s(vm.proc.pid, "vcpu1")
        time.sleep(2.0)
        spent = thread_cpu_s(vm.proc.pid, "vcpu1") - before
        status, err = vm.finish(timeout=60)
    finally:
        vm.kill_if_running()
    assert spent < 0.2, f"vcpu1 took {spent:.2f} s of CPU in 2 s while the guest waited"
    assert status == 33 and "smp: all 2 cpus online" in vm.text(), vm.text() + err


def test_pio_loop_round_trips_through_device_process(guests, tmp_path):
    run = run_up(tmp_path, kernel(guests, "pio-loop", "count=200"))
    assert run.status == 1, run.serial + run.stderr
    assert re.search(r"pio-loop: in median=\d+ p99=\d+", run.serial)
    assert "pio-loop: done" in run.serial


def test_firmware_hello_runs_from_reset_vector(guests, tmp_path):
    run = run_up(tmp_path, f'firmware = "{guests["firmware-hello"]}"')
    assert (run.status, run.serial) == (99, "Hello from splitvmm firmware!\n")


def test_hello_serial_output_to_unix_socket(guests, tmp_path):
    import socket
    import threading

    path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(4096):
                received.extend(chunk)

    reader = threading.Thread(target=serve)
    reader.start()
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[vm]\nname = "test"\nmemory = "64M"\n[boot]\nkernel = "{guests["hello"]}"\n'
        f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "unix:{path}"\n'
    )
    from tests.integration.vmproc import splitvmm

    result = splitvmm(tmp_path, "up", str(config))
    reader.join(timeout=10)
    server.close()
    assert result.returncode == 0, result.stderr
    assert received.startswith(b"Hello from a splitvmm test guest!\n")


def test_pci_guest_finds_host_bridge_by_cf8_and_by_mcfg_ecam(guests, tmp_path):
    run = run_up(tmp_path, kernel(guests, "pci"))
    assert run.status == 0, run.serial + run.stderr
    assert "acpi: MCFG segment 0 buses 0-0 at 0xe0000000\n" in run.serial
    assert "cf8: 00:00.0 8086:1237 class 060000 header 00\n" in run.serial
    assert "ecam: 00:00.0 8086:1237 class 060000 header 00\n" in run.serial
    assert "pci: 1 functions, both walks agree\n" in run.serial
