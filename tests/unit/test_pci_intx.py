"""The INTx line of a PCI function whose device was left dead (monitor/pci/intx.py), through
the function's host (a BAR read, a command write), with the eventfds KVM would see."""

from __future__ import annotations

import os
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
