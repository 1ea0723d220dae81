"""Write-behind (monitor/writebehind.py) through `splitvmm up`: a polled 8250 guest's THR
writes cost no exit, and every byte still comes out, in order, including the last ones of a
guest that then halts for good and makes no exit again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from splitvmm.monitor.writebehind import kernel_holds_rep_outs_once
from splitvmm.native.kvm import Kvm
from tests.integration.conftest import vm_toml
from tests.integration.vmproc import VmProcess

pytestmark = pytest.mark.kvm


def _host_holds_port_writes() -> bool:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            return vm.coalesced_pio_page() > 0
        finally:
            vm.close()


@pytest.fixture(autouse=True)
def _write_behind_here() -> None:
    if not kernel_holds_rep_outs_once(os.uname().release):
        pytest.skip("write-behind needs Linux 6.0 or later on the host")
    if not _host_holds_port_writes():
        pytest.skip("this host's KVM does not coalesce port writes (no KVM_CAP_COALESCED_PIO)")


GREETING = "firmware-idle: halted\n"


def test_last_bytes_of_a_guest_that_halts_come_out_without_another_exit(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """firmware-idle polls LSR before each byte, writes it to THR, and after the newline halts
    in the kernel's irqchip with interrupts off: no exit ever delivers its last write, so the
    flusher must."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'firmware = "{guests["firmware-idle"]}"', serial_out=serial))
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    try:
        vm.wait_for(r"halted\n")
        dev = vm.device("serial0")
        status, err = vm.stop()
    finally:
        vm.kill_if_running()
    assert (vm.text(), status) == (GREETING, 128 + signal.SIGTERM), err[-2000:]
    # the UART's seven set-up writes exit (its DLL write, at THR's offset, arms nothing: DLAB
    # is set, and offset 1 mirrors DLM), then the greeting's first byte arms write-behind;
    # the others go to THR with no exit
    exits = dev["exits"]
    assert isinstance(exits, dict)
    assert dev["held_writes"] >= len(GREETING) - 1
    assert exits["writes"] <= 7 + 1, dev
