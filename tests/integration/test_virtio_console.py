"""virtio-console through `splitvmm up`: the monitor side (descriptor, fds, PCI placement,
sandboxed process, console selection). The guest used is the PCI walker
(tests/guests/pci.c), which lists every function by both configuration mechanisms; the
text round trip through the device's queues is the console guest's (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.vmproc import VmProcess, splitvmm

pytestmark = pytest.mark.kvm

LISTED = "00:01.0 1af4:1043 class 078000 header 00\n"  # the first free slot after the bridge


def console_table(output: str) -> str:
    return f'[[device]]\nname = "con0"\nmodel = "virtio-console"\noutput = "{output}"\n'


def pci_config(tmp_path: Path, guests, serial: Path | str, devices: str) -> Path:
    path = tmp_path / "vm.toml"
    path.write_text(vm_toml(f'kernel = "{guests["pci"]}"', "64M", 1, serial) + devices)
    return path


def test_virtio_console_listed_by_pci_guest_through_both_walks(guests, tmp_path):
    serial = tmp_path / "serial.log"
    cfg = pci_config(tmp_path, guests, serial, console_table(str(tmp_path / "hvc.log")))

    result = splitvmm(tmp_path, "up", str(cfg))

    text = serial.read_text(errors="replace")
    assert result.returncode == 0, text + result.stderr
    assert f"cf8: {LISTED}" in text and f"ecam: {LISTED}" in text
    assert "pci: 2 functions, both walks agree\n" in text
    assert (tmp_path / "hvc.log").exists()  # the monitor opened its output for it


def test_virtio_console_second_on_stdio_is_told_the_keyboard_is_the_first_ones(guests, tmp_path):
    cfg = pci_config(tmp_path, guests, "stdio", console_table("stdio"))
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "stdout.log", stdio=True)

    status, err = vm.finish()

    assert status == 0, vm.text() + err
    assert "device con0: its output is stdio too, but the keyboard goes to device serial0" in err
