"""INTA# of a PCI function whose device was left dead (on_crash = "leave"), which the monitor
drives from then on, as the device did (devprocs/virtio/msix.py Intx).

INTx is a level (PCI 3.0 2.2.6), through a level irqfd: KVM lowers the line at the guest's
EOI, and at its unmasking of the pin in the IOAPIC (Linux 6.4+), and signals the resample
fd, so that whoever drives the line raises it again while its cause holds. That was the
device; once it was dead, nobody did: its failure raised while the guest had the pin masked
(an IRQ it had disabled, a threaded handler's) or the line in service was lost, where an
IOAPIC delivers a line still asserted once it may.

The cause here is the failure the guest has not seen: the line is raised at the failure and
at each resample until the guest reads one of the function's BARs (its registers read
all-ones; virtio 1.2 4.1.4.5: the driver's read of the ISR deasserts), and never while the
command register's Interrupt Disable is set (PCI 3.0 6.2.2: no INTx then; Linux and FreeBSD
set it whenever they use MSI or MSI-X); clearing it raises a cause still pending, as the
device did. Nothing of this comes from the dead device: its state is gone, and what it may
still have written into its fds raises no more than it could have itself.
"""

from __future__ import annotations

import os
import threading


class LeftIntx:
    """The dead function's INTx line (the module docstring)."""

    def __init__(self, irqfd: int, resample_fd: int) -> None:
        self.irqfd, self.resample_fd = irqfd, resample_fd  # the device's: the monitor's own fds
        self._pending = True  # the failure, until the guest reads the function
        self._enabled = False  # not Interrupt Disable (the function host says, leave())
        self._lock = threading.Lock()

    def set_enabled(self, enabled: bool) -> None:
        """The command register's Interrupt Disable, as the guest wrote it (clear: enabled)."""
        with self._lock:
            self._enabled = enabled
            self._raise_if_due_locked()

    def looked(self) -> None:
        """The guest read one of the function's registers: the failure is seen."""
        with self._lock:
            self._pending = False

    def resampled(self) -> None:
        """KVM lowered the line (an EOI, an unmask) and signalled the resample fd."""
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            pass  # a spurious wake-up: the line is raised again only if due, all the same
        with self._lock:
            self._raise_if_due_locked()

    def _raise_if_due_locked(self) -> None:
        if self._pending and self._enabled:
            os.eventfd_write(self.irqfd, 1)
