"""The INTx line of a PCI function whose device was left dead (monitor/pci/intx.py), through
the function's host (a BAR read, a command write), with the eventfds KVM would see."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from splitvmm.monitor.pci.intx import LeftIntx
from splitvmm.sandbox.spawn import readable
from tests.unit.test_pci_function import BAR0_BASE, COMMAND_INTX_DISABLE, COMMAND_MEMORY, Function


@pytest.fixture
def left_intx() -> Iterator[LeftIntx]:
    """The dead device's INTx irqfd and resample fd (non-blocking eventfds, as DeviceFds's)."""
    irqfd, resample = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    yield LeftIntx(irqfd, resample)
    os.close(irqfd)
    os.close(resample)


def raised(intx: LeftIntx) -> int:
    """How often the line was raised since the last look (its irqfd's count, consumed)."""
    return os.eventfd_read(intx.irqfd) if readable(intx.irqfd, 0) else 0


def resample(intx: LeftIntx) -> None:
    """KVM lowered the line (an EOI, or the guest unmasked the pin) and signalled the
    resample fd; the supervisor calls resampled()."""
    os.eventfd_write(intx.resample_fd, 1)
    intx.resampled()


def test_left_intx_is_raised_again_at_each_resample_until_a_bar_is_read(left_intx) -> None:
    """A level the guest may not have taken yet (its pin masked): KVM lowered it at the
    unmask, and only a raise after the resample delivers it. Reading the function's
    registers (virtio's ISR) deasserts it, as the device did: the next EOI ends it."""
    f = Function()
    f.host.leave(left_intx)
    at_failure = raised(left_intx)
    resample(left_intx)  # the unmask
    at_unmask = raised(left_intx)
    f.mmio.read(BAR0_BASE, 1)  # the driver's handler reads its device: all-ones
    resample(left_intx)  # its EOI
    assert (at_failure, at_unmask, raised(left_intx)) == (1, 1, 0)


def test_left_intx_is_not_raised_by_a_config_space_read(left_intx) -> None:
    """lspci reading the header is not the driver looking at its device's registers."""
    f = Function()
    f.host.leave(left_intx)
    raised(left_intx)
    f.ecam.read(f.device << 15, 4)
    resample(left_intx)
    assert raised(left_intx) == 1


def test_left_intx_waits_while_interrupt_disable_is_set_and_rises_once_cleared(
    left_intx,
) -> None:
    """PCI 3.0 6.2.2: no INTx while Interrupt Disable is set (Linux sets it whenever it uses
    MSI-X); a cause still pending asserts once it is cleared (here by its byte alone)."""
    f = Function()
    f.config_write(4, (COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_bytes(2, "little"))
    f.host.leave(left_intx)
    resample(left_intx)
    disabled = raised(left_intx)
    f.config_write(5, b"\x00")
    assert (disabled, raised(left_intx)) == (0, 1)


class NoticingLock:
    """The functions' shared decode lock, which sets `waited` when a thread must wait for it."""

    def __init__(self, waited: threading.Event) -> None:
        self._lock = threading.Lock()
        self.waited = waited

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waited.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_left_intx_stays_disabled_when_interrupt_disable_is_written_as_its_device_is_left(
    left_intx, monkeypatch
) -> None:
    """A vCPU sets Interrupt Disable (Linux enabling MSI-X) while the supervisor leaves the
    device dead: whichever goes first, the line ends disabled. leave() read the command
    register under the lock and told the line after it, so the vCPU's newer value could be
    overwritten by the one leave() read: INTx raised at every EOI while the guest had it
    disabled, on a pin another device may share."""
    f = Function()
    went_on = threading.Event()  # the vCPU's write told the line, or waits for leave()
    f.host._lock = f.host._shared.lock = NoticingLock(went_on)  # type: ignore[assignment]
    disable = (COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_bytes(2, "little")
    vcpu = threading.Thread(target=f.config_write, args=(4, disable))
    told = []
    set_enabled = left_intx.set_enabled

    def leave_paused(enabled: bool) -> None:
        told.append(enabled)
        if len(told) == 1:  # leave()'s: the vCPU writes the command register now
            vcpu.start()
            went_on.wait()
        set_enabled(enabled)
        went_on.set()

    monkeypatch.setattr(left_intx, "set_enabled", leave_paused)
    f.host.leave(left_intx)
    vcpu.join()
    raised(left_intx)  # at the failure, if it came before the write
    resample(left_intx)  # an EOI of the pin's other device
    assert raised(left_intx) == 0
