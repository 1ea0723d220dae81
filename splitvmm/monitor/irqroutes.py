"""The VM's GSI routing table: one owner, since KVM_SET_GSI_ROUTING replaces it whole.

The table is the PC's wiring (native/routing.py pc_default_routes: ISA IRQs and IOAPIC
pins 0-23, as KVM_CREATE_IRQCHIP made it) plus one MSI route per MSI-X vector a device
asked for. GSIs from FIRST_MSI_GSI up are handed out one per vector when the VM is built
(each gets its irqfd then); a vector's route exists only once its device asked for it
(protocol/events.py `msi`) and the monitor checked what it asked: until then a write to
its irqfd raises nothing.

Routes are asked for from whichever thread serves the device's channel (a vCPU's sync
after an MSI-X table write, the control thread): the table is rebuilt and set under one
lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from splitvmm.errors import ConfigError
from splitvmm.native.routing import IOAPIC_NUM_PINS, GsiRoute, MsiRoute, pc_default_routes
from splitvmm.protocol.control import MAX_GSI

FIRST_MSI_GSI = IOAPIC_NUM_PINS  # 24: GSIs 0-23 are the IOAPIC's pins
# x86 MSI: the address is in the LAPIC's window 0xFEExxxxx (Intel SDM vol. 3, 11.11.1), its
# high dword zero; the data's low 16 bits are the message (vector, delivery mode, trigger).
MSI_ADDRESS_START = 0xFEE00000
MSI_ADDRESS_END = 0xFEF00000
MSI_DATA_LIMIT = 1 << 16
# What a driver programs, and all a device may ask for (the MSI-X table is the device
# process's, so its request is untrusted whatever the guest wrote; QEMU, Firecracker and
# Cloud Hypervisor keep the table in the VMM). SDM vol. 3 11.11.1-2: address bits 11:4
# reserved (bit 4 is the interrupt-remapping format, which nothing here decodes) and 1:0
# zero; data bits 13:11 reserved; delivery mode (10:8) fixed or lowest priority only: SMI,
# NMI, INIT and ExtINT reach past the vectors (an INIT resets the vCPU, and the reserved 110
# is KVM's StartUp, which starts an AP at a page the device picks); and no vector below 16
# (11.5.3: illegal, a LAPIC never sets their IRR bit; KVM does).
MSI_ADDRESS_RESERVED = 0xFF3
MSI_DATA_RESERVED = 0x3800
MSI_DELIVERY_SHIFT = 8
MSI_DELIVERY_FIXED, MSI_DELIVERY_LOWEST = 0, 1
MSI_FIRST_VECTOR = 16
# The first IOAPIC pin of PCI INTx (16-23: what no ISA device uses); INTA of device d is
# pin 16 + d % 8.
PCI_INTX_FIRST_PIN = 16
PCI_INTX_PINS = 8


class RoutingVm(Protocol):
    def set_gsi_routing(self, routes: Sequence[GsiRoute]) -> None: ...


def intx_gsi(pci_device: int) -> int:
    """The GSI (IOAPIC pin) of INTA# of PCI device `pci_device` on bus 0."""
    return PCI_INTX_FIRST_PIN + pci_device % PCI_INTX_PINS


class GsiRoutes:
    """The routing table of one VM: its MSI routes, set in KVM with the PC's wiring."""

    def __init__(self, vm: RoutingVm) -> None:
        self._vm = vm
        self._next_gsi = FIRST_MSI_GSI
        self._msi: dict[int, MsiRoute] = {}
        self._lock = threading.Lock()

    def allocate(self, count: int, what: str) -> tuple[int, ...]:
        """`count` fresh GSIs for `what`'s MSI-X vectors (at build time)."""
        with self._lock:
            first = self._next_gsi
            # The table holds MAX_GSI + 1 entries, the PC's wiring among them: past that,
            # KVM_SET_GSI_ROUTING fails (EINVAL) once the last vectors are routed.
            if first - FIRST_MSI_GSI + count > MAX_GSI + 1 - len(pc_default_routes()):
                raise ConfigError(f"{what}: no GSIs left for {count} MSI-X vectors")
            self._next_gsi += count
        return tuple(range(first, first + count))

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Point `gsi` (one allocate() gave) at this message; KvmError if KVM refuses."""
        route = MsiRoute(gsi, address, data)
        with self._lock:
            if not FIRST_MSI_GSI <= gsi < self._next_gsi:
                raise ValueError(f"GSI {gsi} is no MSI GSI of this VM")
            if self._msi.get(gsi) == route:
                return
            others = [r for g, r in self._msi.items() if g != gsi]
            self._vm.set_gsi_routing([*pc_default_routes(), *others, route])
            self._msi[gsi] = route

    def check_msi(self, gsi: int, address: int, data: int) -> str:
        """'' if `gsi` is one of this VM's MSI GSIs and the message one a device may ask
        for; else why not (a snapshot's routes are untrusted, like a device's request)."""
        with self._lock:
            if not FIRST_MSI_GSI <= gsi < self._next_gsi:
                return f"GSI {gsi} is no MSI GSI of this VM"
        return msi_message_refused(address, data)

    def routes(self) -> dict[int, MsiRoute]:
        with self._lock:
            return dict(self._msi)


def msi_message_refused(address: int, data: int) -> str:
    """'' for a message a driver programs for an x86 MSI (the constants above say which);
    else what is wrong with it."""
    if not MSI_ADDRESS_START <= address < MSI_ADDRESS_END:
        return f"address {address:#x} is not an x86 MSI address (0xfee00000-0xfeefffff)"
    if address & MSI_ADDRESS_RESERVED:
        return f"address {address:#x} sets reserved bits (11:4 or 1:0)"
    if not 0 <= data < MSI_DATA_LIMIT:
        return f"data {data:#x} does not fit the 16 bits of an x86 MSI message"
    if data & MSI_DATA_RESERVED:
        return f"data {data:#x} sets reserved bits (13:11)"
    mode = data >> MSI_DELIVERY_SHIFT & 0x7
    if mode not in (MSI_DELIVERY_FIXED, MSI_DELIVERY_LOWEST):
        return f"data {data:#x}: delivery mode {mode:03b} is not fixed or lowest priority"
    if data & 0xFF < MSI_FIRST_VECTOR:
        return f"data {data:#x}: vector {data & 0xFF} is below 16 (reserved)"
    return ""


class MsiVectors:
    """One device's MSI-X vectors: vector k signals GSI gsis[k], once a route was asked."""

    def __init__(self, name: str, routes: GsiRoutes, gsis: Sequence[int]) -> None:
        self.name = name
        self._routes = routes
        self.gsis = tuple(gsis)

    def route(self, vector: int, address: int, data: int) -> str:
        """Install the route a device asked for; '' once done, else why it was refused
        (the device's request is untrusted: each value is checked first)."""
        if not 0 <= vector < len(self.gsis):
            return f"vector {vector} is past the {len(self.gsis)} MSI-X vectors of {self.name}"
        why = msi_message_refused(address, data)
        if not why:
            self._routes.set_msi(self.gsis[vector], address, data)
        return why
